"""The Prefect flows in this process against a real Prefect server, S3 and MLflow (faults: test_faults.py)."""

from __future__ import annotations

import time

import pandas as pd
import pytest

from ride_duration.aws import storage_options
from ride_duration.config import get_settings
from ride_duration.tlc import load_training_dataframe

from .helpers import list_keys, object_exists


def _read(uri: str) -> pd.DataFrame:
    return pd.read_parquet(uri, storage_options=storage_options(uri, get_settings()))


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


def task_states(flow_run_id, count: int, timeout: float = 20) -> list[str]:
    """The final state names of a flow run's `count` task runs, by task run name (the server
    records task states from events, in batches: they may lag the flow's end by a second)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + timeout
    while True:
        with _client() as client:
            found = sorted(client.read_task_runs(flow_run_filter=runs), key=lambda r: r.name)
        if len(found) == count and all(r.state and r.state.is_final() for r in found) or time.monotonic() > deadline:
            return [r.state.name if r.state else None for r in found]
        time.sleep(0.2)


def test_flow_end_to_end(batch_stack, batch_model, s3_input, synthetic_months):
    from ride_duration.batch.flows import ride_duration_prediction

    state = ride_duration_prediction(
        taxi_type="green", run_id=batch_model.run_id, run_date="2021-03-02", return_state=True
    )
    assert state.is_completed(), state.message
    result = state.result()
    bucket = get_settings().predictions_bucket
    expected_key = f"taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    assert result["output_file"] == f"s3://{bucket}/{expected_key}"
    written = _read(result["output_file"])
    expected = load_training_dataframe(synthetic_months[(2021, 2)], get_settings())
    assert len(written) == result["rows"] == len(expected)  # the 1-60 min filter, nothing lost
    assert written["ride_id"].is_unique and (written["model_version"] == batch_model.run_id).all()
    assert 2 < result["rmse"] < 15  # synthetic month, model trained on January
    assert result["rmse"] == pytest.approx((written["diff"] ** 2).mean() ** 0.5)

    # The same month, model and input again: its persisted summary, nothing rescored.
    again = ride_duration_prediction(taxi_type="green", run_id=batch_model.run_id, run_date="2021-03-02")
    assert again == result and _read(result["output_file"])["ride_id"].equals(written["ride_id"])
    # force: scored again, the one object replaced.
    ride_duration_prediction(taxi_type="green", run_id=batch_model.run_id, run_date="2021-03-02", force=True)
    assert list_keys(bucket, "taxi_type=green/year=2021/month=02/") == [expected_key]
    assert not _read(result["output_file"])["ride_id"].isin(written["ride_id"]).any()

    with _client() as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_completed() and run.parameters["run_date"].startswith("2021-03-02")


def test_backfill_is_one_flow_run_with_a_task_per_month_and_skips_scored_months(batch_stack, batch_model, s3_input):
    from ride_duration.batch.flows import ride_duration_prediction_backfill

    def backfill(**options):
        state = ride_duration_prediction_backfill(
            taxi_type="green",
            run_id="production",
            start_date="2021-01",
            end_date="2021-02",
            return_state=True,
            **options,
        )
        assert state.is_completed(), state.message
        return state.result(), task_states(state.state_details.flow_run_id, 2)

    first, _ = backfill(force=True)
    assert [(r["year"], r["month"]) for r in first] == [(2021, 1), (2021, 2)]
    for r in first:
        assert len(_read(r["output_file"])) == r["rows"] > 0 and r["model_version"] == batch_model.run_id

    again, states = backfill()
    assert again == first and states == ["Cached", "Cached"]
    _, states = backfill(force=True)
    assert states == ["Completed", "Completed"]


def test_missing_month_fails_clearly_and_writes_nothing(batch_stack, batch_model, s3_input, capsys):
    from ride_duration.batch import cli
    from ride_duration.batch.flows import MonthsFailed, ride_duration_prediction_backfill

    with pytest.raises(MonthsFailed) as info:
        ride_duration_prediction_backfill(
            taxi_type="green", run_id=batch_model.run_id, start_date="2021-02", end_date="2021-03"
        )
    assert str(info.value).startswith(
        f"1 of 2 month(s) failed: no input for green 2021-03: {s3_input}/green_tripdata_2021-03.parquet does not exist"
    )
    assert list_keys(get_settings().predictions_bucket, "taxi_type=green/year=2021/month=03/") == []

    # The thin CLI: exit 1 and one sentence naming the month.
    assert cli.score_main(["--year", "2021", "--month", "3", "--run-id", batch_model.run_id]) == 1
    assert "error: 1 of 1 month(s) failed: no input for green 2021-03" in capsys.readouterr().err


def test_cli_backfill_prints_each_month(batch_stack, batch_model, s3_input, capsys):
    from ride_duration.batch import cli

    args = ["--start", "2021-02", "--end", "2021-02", "--run-id", batch_model.run_id]
    assert cli.backfill_main(args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    output = f"s3://{get_settings().predictions_bucket}/taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    assert line.startswith("2021-02 ") and line.endswith(f"-> {output}") and object_exists(output)


# ----------------------------------------------------------------------------- which model, tracking server down
def _dead_tracking_server(monkeypatch) -> str:
    from workbench.stack import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    return dead


@pytest.fixture
def restore_tracking_uri():
    """The session server again for later tests. Read before the test: this fixture's teardown runs before
    monkeypatch's, while MLFLOW_TRACKING_URI still names the dead server."""
    import mlflow

    uri = get_settings().mlflow_tracking_uri
    yield
    mlflow.set_tracking_uri(uri)


def test_model_id_and_experiment_id_score_a_month_with_the_tracking_server_down(
    batch_stack, batch_model, s3_input, monkeypatch, capsys, restore_tracking_uri
):
    """MODEL_ID + EXPERIMENT_ID: batch reads the model straight from S3, as the services do;
    the tracking server is never asked (it is down), and outputs are named by the same run id."""
    from ride_duration.batch import cli, scoring

    _dead_tracking_server(monkeypatch)
    monkeypatch.setenv("MODEL_ID", batch_model.model_id)
    monkeypatch.setenv("EXPERIMENT_ID", batch_model.experiment_id)
    monkeypatch.setattr(scoring, "_models", {})  # no model cached in this process: it must come from S3
    bucket = get_settings().predictions_bucket
    key = f"taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    from ride_duration.aws import s3_client

    s3_client(get_settings()).delete_object(Bucket=bucket, Key=key)

    assert cli.score_main(["--year", "2021", "--month", "2", "--force"]) == 0, capsys.readouterr().err
    assert f"model {batch_model.s3_uri} (run {batch_model.run_id})" in capsys.readouterr().err
    assert object_exists(f"s3://{bucket}/{key}")
    assert (_read(f"s3://{bucket}/{key}")["model_version"] == batch_model.run_id).all()


def test_alias_with_the_tracking_server_down_fails_in_seconds_naming_it(
    batch_stack, batch_model, s3_input, monkeypatch, capsys, restore_tracking_uri
):
    """Used to fail after 254 s of MLflow's HTTP retries."""
    from ride_duration.batch import cli

    dead = _dead_tracking_server(monkeypatch)
    for name in ("MODEL_URI", "MODEL_ID", "EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    start = time.monotonic()
    assert cli.score_main(["--year", "2021", "--month", "2"]) == 1
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: model models:/NYCRideDurationModel@production is looked up on the MLflow tracking server at {dead}, "
        "which is not answering; start it (`make services-up`) or point MLFLOW_TRACKING_URI at your server, "
        "or set MODEL_ID + EXPERIMENT_ID to load the model straight from S3"
    )
