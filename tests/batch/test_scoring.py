"""Batch scoring without the orchestrator: paths, results, atomic writes, bad input."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ride_duration import registry
from ride_duration.aws import storage_options
from ride_duration.batch import paths as batch_paths
from ride_duration.batch import predicting, reading, scoring, writing
from ride_duration.config import get_settings
from ride_duration.tlc import load_training_dataframe

from .helpers import list_keys, month_with_bad_rows, object_exists, rides_of_1_to_60_minutes

RUN_ID = "0123456789abcdef0123456789abcdef"


# ----------------------------------------------------------------------------- paths (no servers)
@pytest.mark.parametrize(
    ("run_date", "expected"),
    [
        ("2021-03-02", (2021, 2)),
        (date(2021, 1, 5), (2020, 12)),  # across the year boundary
        (datetime(2021, 1, 1, 0, 0, tzinfo=UTC), (2020, 12)),
        (datetime(2021, 12, 31, 23, 59), (2021, 11)),
    ],
)
def test_previous_month(run_date, expected):
    assert batch_paths.previous_month(run_date) == expected


def test_get_paths_year_boundary_and_layout(monkeypatch):
    monkeypatch.delenv("BATCH_INPUT_PREFIX", raising=False)
    monkeypatch.setenv("PREDICTIONS_BUCKET", "nyc-duration-prediction")
    paths = batch_paths.get_paths(date(2021, 1, 5), "green", RUN_ID, get_settings())
    assert (paths.year, paths.month) == (2020, 12)
    assert paths.input_file == "https://d37ci6vzurychx.cloudfront.net/trip-data/green_tripdata_2020-12.parquet"
    assert paths.output_file == (f"s3://nyc-duration-prediction/taxi_type=green/year=2020/month=12/{RUN_ID}.parquet")
    monkeypatch.setenv("BATCH_INPUT_PREFIX", "s3://tlc/trip-data/")
    assert (
        batch_paths.get_paths("2021-03-02", "green", RUN_ID, get_settings()).input_file
        == "s3://tlc/trip-data/green_tripdata_2021-02.parquet"
    )


def test_months_and_run_dates():
    assert batch_paths.months_between("2020-11", "2021-02") == [(2020, 11), (2020, 12), (2021, 1), (2021, 2)]
    assert batch_paths.run_date_for(2020, 12) == datetime(2021, 1, 2, 3, 0)
    assert batch_paths.previous_month(batch_paths.run_date_for(2020, 12)) == (2020, 12)
    with pytest.raises(ValueError, match="before start"):
        batch_paths.months_between("2021-02", "2021-01")


def test_generate_uuids_are_unique_version_4():
    ids = predicting.generate_uuids(100_000).to_pylist()
    assert len(set(ids)) == len(ids)
    for value in ids[:1000]:
        parsed = uuid.UUID(value)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == value


# ----------------------------------------------------------------------------- results + atomic writes
@pytest.fixture(scope="module")
def feb(synthetic_months):
    return load_training_dataframe(synthetic_months[(2021, 2)], get_settings())


def test_save_results_schema_and_unique_ids(feb, tmp_path):
    preds = np.full(len(feb), 10.0)
    out = tmp_path / "out" / "result.parquet"
    scoring.save_results(feb, preds, RUN_ID, str(out), get_settings())
    df = pd.read_parquet(out)
    assert list(df.columns) == list(predicting.RESULT_COLUMNS)
    assert len(df) == len(feb) and df["ride_id"].is_unique
    assert (df["model_version"] == RUN_ID).all()
    np.testing.assert_allclose(df["diff"], feb["duration"] - 10.0)
    assert df["PULocationID"].tolist() == feb["PULocationID"].tolist()
    assert not list(out.parent.glob(".batch-*"))  # no temporary file left behind


def test_crash_mid_write_leaves_no_local_file(feb, tmp_path, monkeypatch):
    out = tmp_path / "result.parquet"
    real_write = writing.Stage.write

    def write_then_crash(self, frame):
        real_write(self, frame)  # the rows really hit the staged file on disk
        raise OSError("disk full (injected)")

    monkeypatch.setattr(writing.Stage, "write", write_then_crash)
    with pytest.raises(OSError, match="injected"):
        scoring.save_results(feb, np.zeros(len(feb)), RUN_ID, str(out), get_settings())
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_crash_mid_write_to_s3_keeps_previous_object(batch_stack, feb, monkeypatch):
    """A re-run for the same month and model targets the same key; if it crashes
    half-way, the key still holds the complete earlier output, never a partial one."""
    key = f"s3://{get_settings().predictions_bucket}/atomic-test/{RUN_ID}.parquet"
    scoring.save_results(feb, np.full(len(feb), 1.0), RUN_ID, key, get_settings())
    before = pd.read_parquet(key, storage_options=storage_options(key, get_settings()))

    calls = {"n": 0}
    real_build = scoring.build_results

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("killed mid-month (injected)")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(scoring, "build_results", crash_on_second_batch)
    paths = batch_paths.BatchPaths("green", 2021, 2, "unused", key)
    monkeypatch.setattr(scoring, "open_input", lambda paths, settings: "in.parquet")
    monkeypatch.setattr(
        scoring, "iter_month", lambda location, settings, batch_size, **_: iter([feb[:100], feb[100:200]])
    )
    with pytest.raises(MemoryError):
        scoring.score_month(paths, _ConstantModel(), RUN_ID, settings=get_settings())
    after = pd.read_parquet(key, storage_options=storage_options(key, get_settings()))
    pd.testing.assert_frame_equal(before, after)

    # A crash with no earlier output leaves no object at all.
    fresh = key.replace("atomic-test/", "atomic-test/fresh-")
    calls["n"] = 0
    with pytest.raises(MemoryError):
        scoring.score_month(
            dataclasses.replace(paths, output_file=fresh), _ConstantModel(), RUN_ID, settings=get_settings()
        )
    assert not object_exists(fresh)
    assert list_keys(get_settings().predictions_bucket, "atomic-test/") == [f"atomic-test/{RUN_ID}.parquet"]


class _ConstantModel:
    def predict(self, features):
        return np.full(len(features), 12.0)


def test_the_log_names_an_input_inside_the_checkout_relative_to_it(synthetic_months, tmp_path, caplog):
    """A flow run's log is shown in the Prefect UI and the notebooks: it names no machine's folders."""
    repo = Path(__file__).resolve().parents[2]
    folder = repo / ".local" / f"test-input-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        source = shutil.copy(synthetic_months[(2021, 2)], folder / "green_tripdata_2021-02.parquet")
        paths = batch_paths.month_paths(
            "green", 2021, 2, RUN_ID, settings=get_settings(), input_file=str(source),
            output_file=str(tmp_path / "o.parquet"),
        )  # fmt: skip
        with caplog.at_level(logging.INFO, logger="test.score"):
            scoring.score_month(
                paths, _ConstantModel(), RUN_ID, settings=get_settings(), logger=logging.getLogger("test.score")
            )
    finally:
        shutil.rmtree(folder)
    relative = f"green 2021-02: reading .local/{folder.name}/green_tripdata_2021-02.parquet"
    assert relative in caplog.messages, caplog.messages
    assert not [m for m in caplog.messages if str(repo) in m]


# ----------------------------------------------------------------------------- bad input
def test_missing_column_is_named(tmp_path, synthetic_months, batch_stack):
    df = pd.read_parquet(synthetic_months[(2021, 2)]).drop(columns=["trip_distance"])
    bad = tmp_path / "green_tripdata_2021-02.parquet"
    df.to_parquet(bad)
    paths = batch_paths.month_paths(
        "green", 2021, 2, RUN_ID, settings=get_settings(), input_file=str(bad), output_file=str(tmp_path / "o.parquet")
    )
    with pytest.raises(
        reading.InputUnreadable, match=rf"^green 2021-02: {bad} is missing required column\(s\): trip_distance$"
    ):
        scoring.score_month(paths, _ConstantModel(), RUN_ID, settings=get_settings())
    assert not (tmp_path / "o.parquet").exists()


def test_missing_month_names_month_and_location(batch_stack, s3_input, tmp_path, monkeypatch):
    paths = batch_paths.get_paths("2021-04-02", "green", RUN_ID, get_settings())
    with pytest.raises(
        reading.InputNotFound, match=r"green 2021-03: s3://.*/green_tripdata_2021-03\.parquet does not exist"
    ):
        scoring.score_month(paths, _ConstantModel(), RUN_ID, settings=get_settings())
    assert not object_exists(paths.output_file)

    # Without a prefix the TLC route is used: cache, TLC_MIRROR, URL; never synthetic data.
    monkeypatch.delenv("BATCH_INPUT_PREFIX")
    monkeypatch.setenv("TLC_MIRROR", str(tmp_path))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "cache"))
    paths = batch_paths.get_paths("2021-04-02", "green", RUN_ID, get_settings())
    with pytest.raises(reading.InputNotFound, match=rf"green 2021-03: .*{tmp_path}/green_tripdata_2021-03\.parquet"):
        scoring.score_month(paths, _ConstantModel(), RUN_ID, settings=get_settings())
    assert not (tmp_path / "cache" / "green_tripdata_2021-03.synthetic.parquet").exists()


def test_mirror_input_scores_like_direct_prediction(batch_stack, batch_model, real_data_dir, tmp_path, monkeypatch):
    """The TLC route (checksummed copy from TLC_MIRROR into the data cache), in
    several batches, and the model resolved from the alias to its run id."""
    if real_data_dir is None:
        pytest.skip("TLC_MIRROR with the real months is not set")
    monkeypatch.delenv("BATCH_INPUT_PREFIX", raising=False)
    monkeypatch.setenv("TLC_MIRROR", str(real_data_dir))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "cache"))
    from mlflow.tracking import MlflowClient

    ref = registry.resolve_model("production", get_settings())
    alias = MlflowClient().get_model_version_by_alias(get_settings().model_name, "production")
    assert ref.run_id == alias.run_id and ref.uri == f"models:/{alias.name}/{alias.version}"
    model, version = scoring.load_model_ref(ref, get_settings())
    paths = dataclasses.replace(
        batch_paths.get_paths("2021-03-02", "green", ref.run_id, get_settings()),
        output_file=str(tmp_path / "feb.parquet"),
    )
    result = scoring.score_month(paths, model, version, batch_size=20_000, settings=get_settings())
    month = load_training_dataframe(
        real_data_dir / "green_tripdata_2021-02.parquet", get_settings()
    )  # the course's 61,921
    expected, rejects = reading.split_rides(month)
    written = pd.read_parquet(tmp_path / "feb.parquet")
    # Real February 2021: 26 rides over 500 miles (up to 102,621) are rejected, like any invalid ride.
    assert len(month) == result.rows + result.rejected == 61921
    assert result.rows == len(expected) == len(written) == 61895
    assert result.rejected_by_reason == {"field 'trip_distance' must be between 0 and 500 miles": 26}
    # `row` is the ride's row in the file (load_training_dataframe numbers the rides it keeps).
    kept = rides_of_1_to_60_minutes(real_data_dir / "green_tripdata_2021-02.parquet")
    assert pd.read_parquet(result.rejects_file)["row"].tolist() == [kept[i] for i in rejects["row"]]
    assert (tmp_path / "cache" / "green_tripdata_2021-02.parquet").is_file()
    np.testing.assert_allclose(written["predicted_duration"], scoring.predict_durations(model, expected))
    assert result.rmse == pytest.approx(np.sqrt(np.mean(written["diff"] ** 2)))


def test_design_matrix_equals_dictvectorizer(batch_model, trained_model, feb):
    """The column-wise fast path builds exactly DictVectorizer's matrix, drops unseen
    zone pairs like it does, and falls back (with the usual clear error) on bad rows."""
    from ride_duration.features import prepare_features
    from ride_duration.predict import make_prediction

    pipeline = trained_model["pipeline"]
    rides = feb.copy()
    vocabulary = pipeline[0].vocabulary_
    unseen = next((pu, do) for pu in range(1, 266) for do in range(1, 266) if f"PU_DO={pu}_{do}" not in vocabulary)
    rides.loc[0, ["PULocationID", "DOLocationID"]] = unseen  # valid zones, a pair unseen in training
    fast = predicting.design_matrix(pipeline, rides)
    reference = pipeline[0].transform(prepare_features(rides))
    assert fast.shape == reference.shape and (fast != reference).nnz == 0
    np.testing.assert_array_equal(
        scoring.predict_durations(pipeline, rides, n_jobs=1), make_prediction(pipeline, rides)
    )

    bad = rides.astype({"trip_distance": object})
    bad.loc[3, "trip_distance"] = "far"
    assert predicting.design_matrix(pipeline, bad) is None
    with pytest.raises(ValueError, match="ride 3: field 'trip_distance' must be a number"):
        scoring.predict_durations(pipeline, bad)


def test_predict_durations_never_lets_invalid_rides_reach_the_model(trained_model, feb, monkeypatch):
    """A distance of 1e39 used to reach the forest and fail with sklearn's float32 message,
    naming no ride; a negative distance was scored. Both are refused, naming the ride."""
    pipeline = trained_model["pipeline"]
    seen = []
    real = predicting.design_matrix
    monkeypatch.setattr(predicting, "design_matrix", lambda model, df: seen.append(len(df)) or real(model, df))
    for value, shown in ((1e39, "1e+39"), (-5.0, "-5.0")):
        rides = feb.copy()
        rides.loc[7, "trip_distance"] = value
        with pytest.raises(ValueError) as info:
            scoring.predict_durations(pipeline, rides)
        assert str(info.value) == f"ride 7: field 'trip_distance' must be between 0 and 500 miles, got {shown}"
    assert seen == []  # the fast path never saw them


# ----------------------------------------------------------------------------- bad rows: rejected, not fatal
def _feb_paths(tmp_path, input_file, name="out"):
    bucket = get_settings().predictions_bucket
    return batch_paths.month_paths(
        "green",
        2021,
        2,
        RUN_ID,
        settings=get_settings(),
        input_file=str(input_file),
        output_file=f"s3://{bucket}/rejects-test/{name}/month=02/{RUN_ID}.parquet",
    )


def _read_s3(uri):
    """One object (boto3: s3fs would serve a replaced object's cached listing) or a folder."""
    if uri.endswith("/"):
        return pd.read_parquet(uri, storage_options=storage_options(uri, get_settings()))
    import io

    from ride_duration.aws import s3_client, split_s3_uri

    bucket, key = split_s3_uri(uri)
    return pd.read_parquet(io.BytesIO(s3_client(get_settings()).get_object(Bucket=bucket, Key=key)["Body"].read()))


def test_bad_rows_are_rejected_and_the_month_is_scored(batch_stack, trained_model, synthetic_months, tmp_path):
    """One null PULocationID used to abort a month, one 1e39 distance aborted it with
    sklearn's float32 message, negative distances were scored. Now: the valid rides are
    scored, the others are written with their reason to the rejects object beside the
    output, counted in the summary, and a re-run replaces both objects."""
    source = synthetic_months[(2021, 2)]
    kept = rides_of_1_to_60_minutes(source)
    bad = {
        kept[10]: {"PULocationID": None},
        kept[500]: {"trip_distance": 1e39},
        **{kept[i]: {"trip_distance": -1.5} for i in (20, 900, 1500)},
        kept[2000]: {"DOLocationID": 0},
    }
    month = month_with_bad_rows(source, tmp_path / "green_tripdata_2021-02.parquet", bad)
    paths = _feb_paths(tmp_path, month)
    pipeline = trained_model["pipeline"]
    # Batches of 500: some have the null zone (arrow gives pandas a float column), some not.
    result = scoring.score_month(paths, pipeline, RUN_ID, batch_size=500, settings=get_settings())

    assert result.rows == len(kept) - 6 and result.rejected == 6
    assert result.rejected_by_reason == {
        "field 'trip_distance' must be between 0 and 500 miles": 4,
        "field 'PULocationID' is missing": 1,
        "field 'DOLocationID' must be a TLC zone id between 1 and 265": 1,
    }
    assert result.rejects_file == f"{paths.output_file.rpartition('/')[0]}/_{RUN_ID}.rejects.parquet"
    rejects = _read_s3(result.rejects_file)
    assert list(rejects.columns) == list(reading.REJECT_COLUMNS)
    assert rejects["row"].tolist() == sorted(bad)
    assert (
        dict(zip(rejects["row"], rejects["reason"]))[kept[500]]
        == "field 'trip_distance' must be between 0 and 500 miles"
    )
    assert rejects.loc[rejects["row"] == kept[500], "trip_distance"].item() == 1e39
    assert rejects.loc[rejects["row"] == kept[10], "PULocationID"].isna().all()

    written = _read_s3(paths.output_file)
    assert len(written) == result.rows and (written["trip_distance"] >= 0).all()
    assert written["PULocationID"].dtype == "int64" and written["PULocationID"].between(1, 265).all()
    valid = reading.split_rides(load_training_dataframe(month, get_settings()))[0]
    np.testing.assert_allclose(written["predicted_duration"], scoring.predict_durations(pipeline, valid))
    assert result.rmse == pytest.approx(np.sqrt(np.mean(written["diff"] ** 2)))
    # The `_` prefix keeps the rejects out of the predictions dataset read as a folder.
    folder = paths.output_file.rpartition("/")[0] + "/"
    assert len(_read_s3(folder)) == result.rows

    # Re-run on the repaired month: the same keys, replaced; the stale rejects object is gone.
    again = scoring.score_month(
        dataclasses.replace(paths, input_file=str(source)), pipeline, RUN_ID, settings=get_settings()
    )
    assert again.rejected == 0 and again.rejects_file is None and again.rows == len(kept)
    prefix = folder.removeprefix(f"s3://{get_settings().predictions_bucket}/")
    assert list_keys(get_settings().predictions_bucket, prefix) == [f"{prefix}{RUN_ID}.parquet"]
    assert len(_read_s3(paths.output_file)) == len(kept)


def test_more_than_one_percent_bad_rows_fails_the_month_and_publishes_nothing(
    batch_stack, trained_model, synthetic_months, tmp_path
):
    source = synthetic_months[(2021, 2)]
    kept = rides_of_1_to_60_minutes(source)
    n_bad = len(kept) // 50  # 2%
    month = month_with_bad_rows(
        source, tmp_path / "green_tripdata_2021-02.parquet", {row: {"trip_distance": -2.0} for row in kept[:n_bad]}
    )
    paths = _feb_paths(tmp_path, month, name="too-many")
    share = f"{n_bad / len(kept):.1%}"
    with pytest.raises(reading.TooManyRejects) as info:
        scoring.score_month(paths, trained_model["pipeline"], RUN_ID, batch_size=500, settings=get_settings())
    assert str(info.value) == (
        f"green 2021-02: {n_bad} of {len(kept):,} rides of 1-60 minutes in {month} ({share}) break the ride contract, "
        f"above the 1% limit ({n_bad} with field 'trip_distance' must be between 0 and 500 miles); nothing was published"
    )
    assert list_keys(get_settings().predictions_bucket, "rejects-test/too-many/") == []

    # Just under the limit is still a month: 28 of 2,865 rides (0.98%).
    at_limit = month_with_bad_rows(
        source, tmp_path / "limit.parquet", {row: {"trip_distance": -2.0} for row in kept[: len(kept) // 100]}
    )
    result = scoring.score_month(
        _feb_paths(tmp_path, at_limit, name="at-limit"), trained_model["pipeline"], RUN_ID, settings=get_settings()
    )
    assert result.rejected == len(kept) // 100 and result.rows == len(kept) - result.rejected


@pytest.mark.parametrize("where", ["local", "s3"])
def test_truncated_parquet_names_file_and_month(batch_stack, synthetic_months, tmp_path, where):
    data = synthetic_months[(2021, 2)].read_bytes()
    truncated = tmp_path / "green_tripdata_2021-02.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    location = str(truncated)
    if where == "s3":
        from ride_duration.aws import s3_client

        bucket = get_settings().predictions_bucket
        s3_client(get_settings()).upload_file(location, bucket, "truncated/green_tripdata_2021-02.parquet")
        location = f"s3://{bucket}/truncated/green_tripdata_2021-02.parquet"
    paths = batch_paths.month_paths(
        "green", 2021, 2, RUN_ID, settings=get_settings(), input_file=location, output_file=str(tmp_path / "o.parquet")
    )
    with pytest.raises(reading.InputUnreadable) as info:
        scoring.score_month(paths, _ConstantModel(), RUN_ID, settings=get_settings())
    assert str(info.value).startswith(f"green 2021-02: {location} could not be read as parquet: ")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "o.parquet").exists()


# ----------------------------------------------------------------------------- the model: found like the services
def test_missing_artifacts_say_so_and_where(batch_stack, trained_model, monkeypatch):
    """A registry entry whose S3 objects are gone (the local S3 crashed): the error says the
    artifacts are missing, under which bucket/prefix, on which endpoint; not "holds no MLflow model"."""
    from ride_duration.aws import s3_client, split_s3_uri
    from ride_duration.registry import ModelNotFound, load_model, resolve_model
    from ride_duration.train import log_to_mlflow

    monkeypatch.setenv("MODEL_NAME", "ArtifactsGoneModel")  # leave the session's production model alone
    logged = log_to_mlflow(trained_model["result"], register=True, settings=get_settings())
    bucket, prefix = split_s3_uri(logged.s3_uri)
    for key in list_keys(bucket, prefix):
        s3_client(get_settings()).delete_object(Bucket=bucket, Key=key)
    endpoint = get_settings().mlflow_s3_endpoint_url
    expected = f"the model's artifacts are missing: no objects under {logged.s3_uri} in S3 at {endpoint}"
    for uri in (f"models:/ArtifactsGoneModel/{logged.registered_version}", logged.s3_uri):
        with pytest.raises(ModelNotFound) as info:
            load_model(uri, settings=get_settings())
        assert str(info.value).startswith(expected), str(info.value)
    monkeypatch.setenv("MODEL_ID", logged.model_id)
    monkeypatch.setenv("EXPERIMENT_ID", logged.experiment_id)
    with pytest.raises(ModelNotFound, match="the model's artifacts are missing: no objects under s3://"):
        resolve_model(None, get_settings())


def test_model_carries_its_training_data_provenance(trained_model, tmp_path):
    """`load_model` sets `model.training_data` from the MLmodel file's metadata (None if absent)."""
    import skops.io
    import yaml

    from ride_duration.registry import TRUSTED_TYPES, load_model

    provenance = {"train": {"file": "green_tripdata_2021-01.parquet", "sha256": "b8e2c9", "synthetic": False}}
    for name, metadata in (("with", {"training_data": provenance}), ("without", None)):
        folder = tmp_path / name
        folder.mkdir()
        skops.io.dump(trained_model["pipeline"], folder / "model.skops")
        mlmodel = {
            "run_id": RUN_ID,
            "flavors": {
                "sklearn": {
                    "pickled_model": "model.skops",
                    "serialization_format": "skops",
                    "skops_trusted_types": TRUSTED_TYPES,
                }
            },
        }
        if metadata:
            mlmodel["metadata"] = metadata
        (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        model, version = load_model(str(folder), settings=get_settings())
        assert version == RUN_ID
        assert model.training_data == (provenance if metadata else None)
