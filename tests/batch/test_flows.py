"""The Prefect flows in this process against a real Prefect server, S3 and MLflow (the work pool: test_pool.py)."""

from __future__ import annotations

import os
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

    # Idempotent: the same month and model again -> the same single object, replaced.
    again = ride_duration_prediction(taxi_type="green", run_id=batch_model.run_id, run_date="2021-03-02")
    assert again["output_file"] == result["output_file"]
    assert list_keys(bucket, "taxi_type=green/year=2021/month=02/") == [expected_key]
    assert not _read(result["output_file"])["ride_id"].isin(written["ride_id"]).any()

    with _client() as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.state.is_completed() and run.parameters["run_date"].startswith("2021-03-02")


def test_local_backfill_scores_the_months_here_as_subflows(batch_stack, batch_model, s3_input):
    """--local: no workers; each month is a subflow of the backfill in this process, one
    after the other, with the model version resolved once."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from ride_duration.batch.flows import ride_duration_prediction_backfill

    state = ride_duration_prediction_backfill(
        taxi_type="green",
        run_id="production",
        start_date="2021-01",
        end_date="2021-02",
        workers=False,
        return_state=True,
    )
    assert state.is_completed(), state.message
    results = state.result()
    assert [(r["year"], r["month"]) for r in results] == [(2021, 1), (2021, 2)]
    for r in results:
        assert object_exists(r["output_file"]) and f"month={r['month']:02d}/" in r["output_file"]
        assert len(_read(r["output_file"])) == r["rows"] > 0
        assert r["model_version"] == batch_model.run_id

    children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id]))
    with _client() as client:
        months = sorted(client.read_flow_runs(flow_run_filter=children), key=lambda run: run.start_time)
    assert [run.parameters["run_date"][:10] for run in months] == ["2021-02-02", "2021-03-02"]
    assert all(run.state.is_completed() and run.deployment_id is None for run in months)
    assert months[0].end_time <= months[1].start_time  # one after the other


def test_stack_prefect_server_batches_its_writes(batch_stack):
    """The stack's Prefect server commits task-run events in batches (fewer SQLite
    lock collisions with subflow creation); read back from the running server."""
    import httpx

    settings = httpx.get(f"{os.environ['PREFECT_API_URL']}/admin/settings", timeout=10).json()
    services = settings["server"]["services"]
    assert services["task_run_recorder"]["batch_size"] == 100
    assert services["task_run_recorder"]["flush_interval"] == 1.0
    assert services["event_persister"]["batch_size"] == 500


def test_missing_month_fails_clearly_and_writes_nothing(batch_stack, batch_model, s3_input, capsys):
    from ride_duration.batch import cli
    from ride_duration.batch.flows import ride_duration_prediction_backfill

    with pytest.raises(RuntimeError) as info:
        ride_duration_prediction_backfill(
            taxi_type="green", run_id=batch_model.run_id, start_date="2021-02", end_date="2021-03", workers=False
        )
    message = str(info.value)
    assert "1 of 2 month(s) failed" in message
    assert f"no input for green 2021-03: {s3_input}/green_tripdata_2021-03.parquet does not exist" in message
    assert list_keys(get_settings().predictions_bucket, "taxi_type=green/year=2021/month=03/") == []

    # The thin CLI: exit 1 and one sentence naming the month.
    assert cli.score_main(["--year", "2021", "--month", "3", "--run-id", batch_model.run_id]) == 1
    assert "error: no input for green 2021-03" in capsys.readouterr().err


def test_cli_backfill_local_prints_each_month_and_runs_without_a_heartbeat_thread(
    batch_stack, batch_model, s3_input, capsys, monkeypatch
):
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    from ride_duration.batch import cli, flows

    args = ["--start", "2021-02", "--end", "2021-02", "--local", "--run-id", batch_model.run_id]
    assert cli.backfill_main(args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    output = f"s3://{get_settings().predictions_bucket}/taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    assert line.startswith("2021-02 ") and line.endswith(f"-> {output}") and object_exists(output)

    # The flow the CLI runs sees no heartbeat setting (nothing watches a backfill's; Prefect joins the
    # thread at the end in 1 s steps); outside it Prefect's default is back.
    seen = {}

    def backfill(**kwargs):
        seen.update(kwargs, heartbeat=PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value())
        return []

    monkeypatch.setattr(flows, "ride_duration_prediction_backfill", backfill)
    assert cli.backfill_main(args) == 0
    assert seen["heartbeat"] is None and seen["workers"] is False
    assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 180


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
    from ride_duration.batch import cli, scoring

    _dead_tracking_server(monkeypatch)
    monkeypatch.setenv("MODEL_ID", batch_model.model_id)
    monkeypatch.setenv("EXPERIMENT_ID", batch_model.experiment_id)
    monkeypatch.setattr(scoring, "_models", {})  # no model cached in this process: it must come from S3
    bucket = get_settings().predictions_bucket
    key = f"taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    from ride_duration.aws import s3_client

    s3_client(get_settings()).delete_object(Bucket=bucket, Key=key)

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
