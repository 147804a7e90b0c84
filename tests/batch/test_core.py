"""Batch scoring without the orchestrator: paths, results, atomic writes, bad input."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ride_duration import batch
from ride_duration.aws import storage_options
from ride_duration.config import get_settings
from ride_duration.utils import load_training_dataframe

from .helpers import list_keys, object_exists

RUN_ID = "0123456789abcdef0123456789abcdef"


# ----------------------------------------------------------------------------- paths (no servers)
@pytest.mark.parametrize(
    ("run_date", "expected"),
    [
        ("2021-03-02", (2021, 2)),
        (date(2021, 1, 5), (2020, 12)),  # across the year boundary
        (datetime(2021, 1, 1, 0, 0, tzinfo=timezone.utc), (2020, 12)),
        (datetime(2021, 12, 31, 23, 59), (2021, 11)),
    ],
)
def test_previous_month(run_date, expected):
    assert batch.previous_month(run_date) == expected


def test_get_paths_year_boundary_and_layout(monkeypatch):
    monkeypatch.delenv("BATCH_INPUT_PREFIX", raising=False)
    monkeypatch.setenv("PREDICTIONS_BUCKET", "nyc-duration-prediction")
    paths = batch.get_paths(date(2021, 1, 5), "green", RUN_ID)
    assert (paths.year, paths.month) == (2020, 12)
    assert paths.input_file == "https://d37ci6vzurychx.cloudfront.net/trip-data/green_tripdata_2020-12.parquet"
    assert paths.output_file == (
        f"s3://nyc-duration-prediction/taxi_type=green/year=2020/month=12/{RUN_ID}.parquet"
    )
    monkeypatch.setenv("BATCH_INPUT_PREFIX", "s3://tlc/trip-data/")
    assert batch.get_paths("2021-03-02", "green", RUN_ID).input_file == "s3://tlc/trip-data/green_tripdata_2021-02.parquet"


def test_months_and_run_dates():
    assert batch.months_between("2020-11", "2021-02") == [(2020, 11), (2020, 12), (2021, 1), (2021, 2)]
    assert batch.run_date_for(2020, 12) == datetime(2021, 1, 2, 3, 0)
    assert batch.previous_month(batch.run_date_for(2020, 12)) == (2020, 12)
    with pytest.raises(ValueError, match="before start"):
        batch.months_between("2021-02", "2021-01")


def test_generate_uuids_are_unique_version_4():
    ids = batch.generate_uuids(100_000).to_pylist()
    assert len(set(ids)) == len(ids)
    for value in ids[:1000]:
        parsed = uuid.UUID(value)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == value


# ----------------------------------------------------------------------------- results + atomic writes
@pytest.fixture(scope="module")
def feb(synthetic_months):
    return load_training_dataframe(synthetic_months[(2021, 2)])


def test_save_results_schema_and_unique_ids(feb, tmp_path):
    preds = np.full(len(feb), 10.0)
    out = tmp_path / "out" / "result.parquet"
    batch.save_results(feb, preds, RUN_ID, str(out))
    df = pd.read_parquet(out)
    assert list(df.columns) == list(batch.RESULT_COLUMNS)
    assert len(df) == len(feb) and df["ride_id"].is_unique
    assert (df["model_version"] == RUN_ID).all()
    np.testing.assert_allclose(df["diff"], feb["duration"] - 10.0)
    assert df["PULocationID"].tolist() == feb["PULocationID"].tolist()
    assert not list(out.parent.glob(".batch-*"))  # no temporary file left behind


def test_crash_mid_write_leaves_no_local_file(feb, tmp_path, monkeypatch):
    out = tmp_path / "result.parquet"
    real_write = pq.ParquetWriter.write_table

    def write_then_crash(self, table, *args, **kwargs):
        real_write(self, table, *args, **kwargs)  # some bytes really hit the disk
        raise OSError("disk full (injected)")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_then_crash)
    with pytest.raises(OSError, match="injected"):
        batch.save_results(feb, np.zeros(len(feb)), RUN_ID, str(out))
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_crash_mid_write_to_s3_keeps_previous_object(batch_stack, feb, monkeypatch):
    """A re-run for the same month and model targets the same key; if it crashes
    half-way, the key still holds the complete earlier output, never a partial one."""
    key = f"s3://{get_settings().predictions_bucket}/atomic-test/{RUN_ID}.parquet"
    batch.save_results(feb, np.full(len(feb), 1.0), RUN_ID, key)
    before = pd.read_parquet(key, storage_options=storage_options(key))

    calls = {"n": 0}
    real_build = batch.core.build_results

    def crash_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("killed mid-month (injected)")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(batch.core, "build_results", crash_on_second_batch)
    paths = batch.BatchPaths("green", 2021, 2, "unused", key)
    monkeypatch.setattr(batch.core, "open_input", lambda paths, settings=None: "in.parquet")
    monkeypatch.setattr(batch.core, "iter_month", lambda location, batch_size: iter([feb[:100], feb[100:200]]))
    with pytest.raises(MemoryError):
        batch.score_month(paths, _ConstantModel(), RUN_ID)
    after = pd.read_parquet(key, storage_options=storage_options(key))
    pd.testing.assert_frame_equal(before, after)

    # A crash with no earlier output leaves no object at all.
    fresh = key.replace("atomic-test/", "atomic-test/fresh-")
    calls["n"] = 0
    with pytest.raises(MemoryError):
        batch.score_month(dataclasses.replace(paths, output_file=fresh), _ConstantModel(), RUN_ID)
    assert not object_exists(fresh)
    assert list_keys(get_settings().predictions_bucket, "atomic-test/") == [f"atomic-test/{RUN_ID}.parquet"]


class _ConstantModel:
    def predict(self, features):
        return np.full(len(features), 12.0)


# ----------------------------------------------------------------------------- bad input
def test_missing_column_is_named(tmp_path, synthetic_months, batch_stack):
    df = pd.read_parquet(synthetic_months[(2021, 2)]).drop(columns=["trip_distance"])
    bad = tmp_path / "green_tripdata_2021-02.parquet"
    df.to_parquet(bad)
    paths = batch.month_paths("green", 2021, 2, RUN_ID, input_file=str(bad), output_file=str(tmp_path / "o.parquet"))
    with pytest.raises(ValueError, match="missing required column.*trip_distance"):
        batch.score_month(paths, _ConstantModel(), RUN_ID)
    assert not (tmp_path / "o.parquet").exists()


def test_missing_month_names_month_and_location(batch_stack, s3_input, tmp_path, monkeypatch):
    paths = batch.get_paths("2021-04-02", "green", RUN_ID)
    with pytest.raises(batch.InputNotFound, match=r"green 2021-03: s3://.*/green_tripdata_2021-03\.parquet does not exist"):
        batch.score_month(paths, _ConstantModel(), RUN_ID)
    assert not object_exists(paths.output_file)

    # Without a prefix the TLC route is used: cache, TLC_MIRROR, URL; never synthetic data.
    monkeypatch.delenv("BATCH_INPUT_PREFIX")
    monkeypatch.setenv("TLC_MIRROR", str(tmp_path))
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "cache"))
    paths = batch.get_paths("2021-04-02", "green", RUN_ID)
    with pytest.raises(batch.InputNotFound, match=rf"green 2021-03: .*{tmp_path}/green_tripdata_2021-03\.parquet"):
        batch.score_month(paths, _ConstantModel(), RUN_ID)
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

    ref = batch.resolve_model("production")
    alias = MlflowClient().get_model_version_by_alias(get_settings().model_name, "production")
    assert ref.run_id == alias.run_id and ref.uri == f"models:/{alias.name}/{alias.version}"
    model, version = batch.load_cached_model(ref.uri)
    paths = dataclasses.replace(batch.get_paths("2021-03-02", "green", ref.run_id),
                                output_file=str(tmp_path / "feb.parquet"))
    result = batch.score_month(paths, model, version, batch_size=20_000)
    expected = load_training_dataframe(real_data_dir / "green_tripdata_2021-02.parquet")
    written = pd.read_parquet(tmp_path / "feb.parquet")
    assert result.rows == len(expected) == len(written) == 61921
    assert (tmp_path / "cache" / "green_tripdata_2021-02.parquet").is_file()
    np.testing.assert_allclose(written["predicted_duration"], batch.predict_durations(model, expected))
    assert result.rmse == pytest.approx(np.sqrt(np.mean(written["diff"] ** 2)))


def test_design_matrix_equals_dictvectorizer(batch_model, trained_model, feb):
    """The column-wise fast path builds exactly DictVectorizer's matrix, drops unseen
    zone pairs like it does, and falls back (with the usual clear error) on bad rows."""
    from ride_duration.predict import make_prediction
    from ride_duration.utils import prepare_features

    pipeline = trained_model["pipeline"]
    rides = feb.copy()
    rides.loc[0, ["PULocationID", "DOLocationID"]] = [999, 998]  # unseen in training
    fast = batch.design_matrix(pipeline, rides)
    reference = pipeline[0].transform(prepare_features(rides))
    assert fast.shape == reference.shape and (fast != reference).nnz == 0
    np.testing.assert_array_equal(batch.predict_durations(pipeline, rides, n_jobs=1), make_prediction(pipeline, rides))

    bad = rides.astype({"trip_distance": object})
    bad.loc[3, "trip_distance"] = "far"
    assert batch.design_matrix(pipeline, bad) is None
    with pytest.raises(ValueError, match="ride 3: field 'trip_distance' must be a number"):
        batch.predict_durations(pipeline, bad)
