"""The Prefect flows against a real Prefect server, S3 (moto) and MLflow."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

import pandas as pd
import pytest

from ride_duration.aws import storage_options
from ride_duration.config import get_settings
from ride_duration.tlc import load_training_dataframe

from .helpers import list_keys, object_exists


def _read(uri: str) -> pd.DataFrame:
    return pd.read_parquet(uri, storage_options=storage_options(uri))


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


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
    expected = load_training_dataframe(synthetic_months[(2021, 2)])
    assert len(written) == result["rows"] == len(expected)  # the 1-60 min filter, nothing lost
    assert written["ride_id"].is_unique and (written["model_version"] == batch_model.run_id).all()
    assert 2 < result["rmse"] < 15  # synthetic month, model trained on January
    assert result["rmse"] == pytest.approx((written["diff"] ** 2).mean() ** 0.5)

    # Idempotent: the same month and model again -> the same single object, replaced.
    again = ride_duration_prediction(taxi_type="green", run_id=batch_model.run_id, run_date="2021-03-02")
    assert again["output_file"] == result["output_file"]
    assert list_keys(bucket, "taxi_type=green/year=2021/month=02/") == [expected_key]
    assert not _read(result["output_file"])["ride_id"].isin(written["ride_id"]).any()

    with _client() as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_completed() and run.parameters["run_date"].startswith("2021-03-02")


def test_backfill_two_months_runs_months_in_parallel(batch_stack, batch_model, s3_input):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    from ride_duration.batch.flows import ride_duration_prediction_backfill

    state = ride_duration_prediction_backfill(
        taxi_type="green", run_id="production", start_date="2021-01", end_date="2021-02", return_state=True
    )
    assert state.is_completed(), state.message
    results = state.result()
    assert [(r["year"], r["month"]) for r in results] == [(2021, 1), (2021, 2)]
    for r in results:
        assert object_exists(r["output_file"]) and f"month={r['month']:02d}/" in r["output_file"]
        assert len(_read(r["output_file"])) == r["rows"] > 0

    # Each month is its own subflow run of the backfill ...
    backfill_id = state.state_details.flow_run_id
    with _client() as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[backfill_id]))
        )
        # The local server commits task runs in batches, at most a second late.
        deadline = time.monotonic() + 15
        while True:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[backfill_id])))
            months = sorted(
                (t for t in tasks if t.name.startswith("score-month") and t.end_time), key=lambda t: t.start_time
            )
            if len(months) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    subflows = [c for c in children if c.parameters.get("run_date")]
    assert len(subflows) == 2 and all(c.state.is_completed() for c in subflows)
    # ... and the two months were in flight at the same time: the task runs that
    # wrap the subflows overlap. (Subflow runs are created one at a time, so the
    # subflows' own start/end times need not overlap for tiny months.)
    assert len(months) == 2
    assert months[1].start_time < months[0].end_time, "the two months did not run at the same time"


def test_stack_prefect_server_batches_its_writes(batch_stack):
    """The stack's Prefect server commits task-run events in batches (fewer SQLite
    lock collisions with subflow creation); read back from the running server."""
    import httpx

    settings = httpx.get(f"{os.environ['PREFECT_API_URL']}/admin/settings", timeout=10).json()
    services = settings["server"]["services"]
    assert services["task_run_recorder"]["batch_size"] == 100
    assert services["task_run_recorder"]["flush_interval"] == 1.0
    assert services["event_persister"]["batch_size"] == 500


def test_subflow_that_cannot_start_releases_the_creation_lock(batch_stack):
    """Subflow runs are created one at a time (flows._creating_subflow); a month
    whose flow never starts must not leave the lock held, or the next month waits forever."""
    from ride_duration.batch import flows

    with pytest.raises(Exception, match="run_date"):
        flows.score_month_subflow.fn("green", "not-a-run-id", "not a date", 1)
    assert flows._creating_subflow.acquire(timeout=5), "creation lock still held"
    flows._creating_subflow.release()


def test_missing_month_fails_clearly_and_writes_nothing(batch_stack, batch_model, s3_input, capsys):
    from ride_duration.batch import cli
    from ride_duration.batch.flows import ride_duration_prediction_backfill

    with pytest.raises(RuntimeError) as info:
        ride_duration_prediction_backfill(
            taxi_type="green", run_id=batch_model.run_id, start_date="2021-02", end_date="2021-03"
        )
    message = str(info.value)
    assert "1 of 2 month(s) failed" in message
    assert f"no input for green 2021-03: {s3_input}/green_tripdata_2021-03.parquet does not exist" in message
    assert list_keys(get_settings().predictions_bucket, "taxi_type=green/year=2021/month=03/") == []

    # The thin CLI: exit 1 and one sentence naming the month.
    assert cli.score_main(["--year", "2021", "--month", "3", "--run-id", batch_model.run_id]) == 1
    assert "error: no input for green 2021-03" in capsys.readouterr().err


def test_deployment_read_back_and_schedule_preview(batch_stack, batch_model, capsys):
    from ride_duration.batch import cli
    from ride_duration.batch.deploy import create_deployment, preview_schedule, read_deployment

    create_deployment("green", batch_model.run_id)
    deployment = read_deployment("ride-duration-prediction/monthly")
    assert deployment.name == "monthly"
    assert deployment.tags == ["ml"]
    assert deployment.parameters == {"taxi_type": "green", "run_id": batch_model.run_id}
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
        ("0 3 2 * *", "UTC", True)
    ]
    after = datetime(2021, 11, 15, tzinfo=UTC)
    assert preview_schedule(3, after=after) == [
        datetime(2021, 12, 2, 3, 0, tzinfo=UTC),
        datetime(2022, 1, 2, 3, 0, tzinfo=UTC),
        datetime(2022, 2, 2, 3, 0, tzinfo=UTC),
    ]
    # The command learners run: it (re)creates the deployment and prints the next 3 runs.
    assert cli.main(["schedule", "--model", batch_model.run_id]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "next run:" in line]
    assert len(lines) == 3 and all(line.endswith("-02 03:00 UTC") for line in lines)


def test_served_run_uses_scheduled_start_time(batch_stack, batch_model, s3_input, tmp_path):
    """A run of the deployment scheduled for 2021-03-02 03:00, executed (late, now)
    by a real runner (`python -m ride_duration.batch deploy` = flow.serve), scores
    February 2021: the scheduled time, not the worker's clock, decides the month."""
    from ride_duration.aws import s3_client
    from ride_duration.batch.deploy import start_runner, stop_runner, trigger_run, wait_for_run

    bucket = get_settings().predictions_bucket
    key = f"taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    s3_client().delete_object(Bucket=bucket, Key=key)  # written by an earlier test
    runner = start_runner(batch_model.run_id, log_path=tmp_path / "runner.log")
    try:
        scheduled = datetime(2021, 3, 2, 3, 0, tzinfo=UTC)
        flow_run = trigger_run(scheduled)
        run = wait_for_run(flow_run.id, timeout=120)
        assert run.state.is_completed(), f"{run.state}: {run.state.message}\n{(tmp_path / 'runner.log').read_text()}"
        assert run.expected_start_time == scheduled
        assert run.parameters == {"taxi_type": "green", "run_id": batch_model.run_id}  # no run_date given
        assert object_exists(f"s3://{bucket}/{key}")
        assert list_keys(bucket, "taxi_type=green/year=2021/month=03/") == []
    finally:
        stop_runner(runner)


# ----------------------------------------------------------------------------- which model, tracking server down
def _dead_tracking_server(monkeypatch) -> str:
    from workbench.stack import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    return dead


@pytest.fixture
def restore_tracking_uri():
    yield
    import mlflow

    mlflow.set_tracking_uri(get_settings().mlflow_tracking_uri)  # the session server again for later tests


def test_model_id_and_experiment_id_score_a_month_with_the_tracking_server_down(
    batch_stack, batch_model, s3_input, monkeypatch, capsys, restore_tracking_uri
):
    """MODEL_ID + EXPERIMENT_ID: batch reads the model straight from S3, as the services do;
    the tracking server is never asked (it is down), and outputs are named by the same run id."""
    from ride_duration.batch import cli, core

    _dead_tracking_server(monkeypatch)
    monkeypatch.setenv("MODEL_ID", batch_model.model_id)
    monkeypatch.setenv("EXPERIMENT_ID", batch_model.experiment_id)
    monkeypatch.setattr(core, "_models", {})  # no model cached in this process: it must come from S3
    bucket = get_settings().predictions_bucket
    key = f"taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    from ride_duration.aws import s3_client

    s3_client().delete_object(Bucket=bucket, Key=key)

    assert cli.score_main(["--year", "2021", "--month", "2"]) == 0, capsys.readouterr().err
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
