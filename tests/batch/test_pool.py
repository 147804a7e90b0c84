"""The `monthly` deployment on a process work pool, run by two real workers of both kinds
(workbench.workers: a warm `python -m ride_duration.batch worker` and Prefect's `prefect worker
start`) against the test stack's Prefect server: months spread over the workers, re-runs
replace, a failed month is named, a worker killed mid-month."""

from __future__ import annotations

import contextvars
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from ride_duration.aws import s3_client, storage_options
from ride_duration.config import get_settings
from ride_duration.registry import resolve_model
from ride_duration.tlc import load_training_dataframe, write_synthetic_month
from workbench import workers

from .conftest import INPUT_BUCKET
from .helpers import list_keys


def _read(uri: str) -> pd.DataFrame:
    return pd.read_parquet(uri, storage_options=storage_options(uri, get_settings()))


def _client():
    from prefect import get_client

    return get_client(sync_client=True)


def _month_runs(backfill_state) -> list:
    from ride_duration.batch.pool import month_runs

    return month_runs(backfill_state.state_details.flow_run_id)


WARM_POLL = 600


@pytest.fixture(scope="module")
def two_workers(batch_stack, batch_model, s3_input):
    """The deployment, and two workers started after BATCH_INPUT_PREFIX is set (they inherit it):
    worker 1 warm (months in its own process), worker 2 Prefect's process worker. The warm one
    polls every 10 minutes: it finds runs only when the server's events say one is waiting, or
    when its month ends (as it would with a poll that never happens to fall at the right time)."""
    from ride_duration.batch.deploy import create_deployment

    create_deployment(get_settings())
    try:
        workers.start(1, stack=batch_stack, kind="warm", env={"PREFECT_WORKER_QUERY_SECONDS": str(WARM_POLL)})
        started = workers.start(2, stack=batch_stack, kind="process")  # all workers up to 2: worker 2 is new
        assert [w.kind for w in started] == ["warm", "process"]
        yield started
    finally:  # also when starting failed: no worker outlives the test stack
        workers.stop(batch_stack)


def test_deploy_puts_the_monthly_deployment_on_a_process_pool(batch_stack, batch_model, capsys):
    from prefect.client.schemas.objects import StateType
    from prefect.filesystems import RemoteFileSystem

    from ride_duration.batch import cli, deploy, pool

    first = deploy.create_deployment(get_settings(), "green", batch_model.run_id)
    # The command learners run does the same again: nothing is duplicated.
    assert cli.main(["deploy", "--model", batch_model.run_id]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "next run:" in line]
    assert len(lines) == 3 and all(line.endswith("-02 03:00 UTC") for line in lines)
    with _client() as client:
        deployment = client.read_deployment_by_name("ride-duration-prediction/monthly")
        work_pool = client.read_work_pool("ride-duration")
        pools = [p.name for p in client.read_work_pools()]
        automations = client.read_automations_by_name(deploy.ZOMBIE_AUTOMATION)
    assert deployment.id == first and pools.count("ride-duration") == 1
    assert (deployment.work_pool_name, work_pool.type) == ("ride-duration", "process")
    # A module path: workers import the flow from the package installed where they run.
    assert deployment.entrypoint == "ride_duration.batch.flows.ride_duration_prediction"
    assert deployment.job_variables == {
        "env": {
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": "remote-file-system/ride-duration-results",
        }
    }
    assert deployment.parameters == {"taxi_type": "green", "run_id": batch_model.run_id}
    assert deployment.tags == ["ml"]
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
        ("0 3 2 * *", "UTC", True)
    ]
    assert deploy.preview_schedule(3, after=datetime(2021, 11, 15, tzinfo=UTC)) == [
        datetime(2021, 12, 2, 3, 0, tzinfo=UTC),
        datetime(2022, 1, 2, 3, 0, tzinfo=UTC),
        datetime(2022, 2, 2, 3, 0, tzinfo=UTC),
    ]
    # One automation, watching this deployment's runs only: silent 45 s -> scheduled again.
    assert len(automations) == 1
    trigger, (action,) = automations[0].trigger, automations[0].actions
    assert (trigger.posture, trigger.within, trigger.after) == (
        "Proactive",
        timedelta(seconds=45),
        {"prefect.flow-run.heartbeat"},
    )
    assert trigger.match_related.root["prefect.resource.id"] == [f"prefect.deployment.{deployment.id}"]
    assert (action.type, action.state, action.name) == ("change-flow-run-state", StateType.SCHEDULED, "AwaitingRetry")
    # The runs' results (each month's summary) go to S3 as JSON, readable from any machine.
    storage = RemoteFileSystem.load("ride-duration-results")
    assert storage.basepath == f"s3://{get_settings().predictions_bucket}/_prefect-results"
    assert pool.online_workers() == []  # none started yet


def test_backfill_months_run_on_the_pool_workers_and_reruns_replace(two_workers, batch_stack, synthetic_months):
    from ride_duration.batch.flows import ride_duration_prediction_backfill
    from ride_duration.batch.pool import run_history, submit_months, wait_for_runs

    state = ride_duration_prediction_backfill(
        taxi_type="green", run_id="production", start_date="2021-01", end_date="2021-02", timeout=180, return_state=True
    )
    assert state.is_completed(), state.message
    results = state.result()
    assert [(r["year"], r["month"]) for r in results] == [(2021, 1), (2021, 2)]
    for r in results:
        expected = load_training_dataframe(synthetic_months[(r["year"], r["month"])], get_settings())
        written = _read(r["output_file"])
        assert r["rows"] == len(written) == len(expected) and written["ride_id"].is_unique

    # Each month is a run of the deployment, named by its month, tagged with the backfill's run,
    # scheduled when the cron would have run it (no run_date: the month comes from that time);
    # it waited as "Backfill", a Scheduled state Prefect's late-runs service does not rewrite.
    runs = _month_runs(state)
    assert [run.name for run in runs] == ["green-2021-01", "green-2021-02"]
    assert [run.expected_start_time for run in runs] == [
        datetime(2021, 2, 2, 3, tzinfo=UTC),
        datetime(2021, 3, 2, 3, tzinfo=UTC),
    ]
    assert [run_history(run.id)[0][0] for run in runs] == ["Backfill", "Backfill"]
    # A submission sent again for the same backfill (a retry after a lost answer) gets the same runs.
    backfill_id, model_uri = state.state_details.flow_run_id, runs[0].parameters["run_id"]
    again = submit_months("green", model_uri, [(2021, 1), (2021, 2)], backfill_id=backfill_id)
    assert [run.id for run in again] == [run.id for run in runs] and len(_month_runs(state)) == 2
    assert all(run.work_pool_name == "ride-duration" and run.state.is_completed() for run in runs)
    assert all("run_date" not in run.parameters and run.run_count == 1 for run in runs)
    # Each month taken once, by a worker of the pool (which one is a race: the warm worker asks
    # for the next month as soon as one ends, and may take both). The warm worker runs a month in
    # its own process; Prefect's starts a new one. (The kill test below makes them share a month.)
    warm, stock = two_workers
    # The warm worker loaded the deployment's model (the production alias here) before its first run.
    production = resolve_model("production", get_settings())
    assert (
        f"model {production.uri} (run {production.run_id}) loaded ahead of the first month" in warm.log_path.read_text()
    )
    taken = workers.runs_taken(batch_stack)
    assert all(len(taken[str(run.id)]) == 1 for run in runs)
    for run in runs:
        (name,) = taken[str(run.id)]
        assert name in (warm.name, stock.name)
        if name == warm.name:
            assert run.infrastructure_pid == str(warm.pid)
        else:
            assert run.infrastructure_pid not in (None, str(stock.pid))

    # Again for February, with March missing: February's object is replaced (same key, new
    # ride ids), March is named as failed and writes nothing.
    feb = results[1]["output_file"]
    feb_before = _read(feb)
    with pytest.raises(RuntimeError) as info:
        ride_duration_prediction_backfill(
            taxi_type="green", run_id="production", start_date="2021-02", end_date="2021-03", timeout=180
        )
    assert str(info.value).startswith("1 of 2 month(s) failed: 2021-03: ")
    assert "no input for green 2021-03" in str(info.value)
    bucket, prefix = get_settings().predictions_bucket, "taxi_type=green/year=2021/"
    run_id = results[1]["model_version"]
    assert [k for k in list_keys(bucket, prefix) if k.endswith(f"/{run_id}.parquet")] == [
        f"{prefix}month=01/{run_id}.parquet",
        f"{prefix}month=02/{run_id}.parquet",
    ]
    again = _read(feb)
    assert len(again) == results[1]["rows"] and not again["ride_id"].isin(feb_before["ride_id"]).any()

    # Waiting wakes on the server's events: with a poll of 5 minutes it still returns as the month ends.
    (run,) = submit_months("green", model_uri, [(2021, 1)], backfill_id=uuid.uuid4())
    start = time.monotonic()
    (done,) = wait_for_runs([run.id], poll=300)
    assert done.state.is_completed() and time.monotonic() - start < 120


def test_the_warm_worker_takes_a_run_as_soon_as_the_server_says_it_is_scheduled(two_workers, batch_stack):
    """Prefect's worker finds runs by polling; the warm one is told: it subscribes to the
    server's events for runs scheduled in its pool and asks for them then."""
    from ride_duration.batch.pool import submit_months, wait_for_runs

    warm, stock = two_workers
    production = resolve_model("production", get_settings())
    with workers.paused(batch_stack, stock.index):  # so that only the warm worker can take it
        (run,) = submit_months("green", production.uri, [(2021, 1)], backfill_id=uuid.uuid4())
        (done,) = wait_for_runs([run.id], timeout=120)
    assert done.state.is_completed()
    assert workers.runs_taken(batch_stack)[str(run.id)] == [warm.name]
    with _client() as client:
        states = sorted(client.read_flow_run_states(run.id), key=lambda state: state.timestamp)
    scheduled, taken = (next(s.timestamp for s in states if s.name == name) for name in ("Backfill", "Pending"))
    assert (taken - scheduled).total_seconds() < 10  # its next poll: up to WARM_POLL s away


def test_worker_killed_mid_month_the_other_worker_scores_it_once(two_workers, batch_stack, batch_model, tmp_path):
    """SIGKILL the warm worker (a machine dies) after the month's first batch: the server hears
    no heartbeat from it for 45 s and schedules the run again; the other worker (Prefect's,
    frozen until then so that the warm one takes the month) scores it; one object at the final
    key; the backfill reports the month once."""
    from ride_duration.batch.flows import ride_duration_prediction_backfill
    from ride_duration.batch.pool import run_history

    warm, stock = two_workers
    # Big enough to be caught in the middle: 3 batches of up to 250,000 rides. May: no other test uses it.
    big = write_synthetic_month(tmp_path / "green_tripdata_2021-05.parquet", 2021, 5, n_rows=700_000)
    s3 = s3_client(get_settings())
    s3.upload_file(str(big), INPUT_BUCKET, "trip-data/green_tripdata_2021-05.parquet")
    bucket, prefix = get_settings().predictions_bucket, "taxi_type=green/year=2021/month=05/"
    outcome = {}

    def backfill():
        outcome["state"] = ride_duration_prediction_backfill(
            taxi_type="green",
            run_id=batch_model.run_id,
            start_date="2021-05",
            end_date="2021-05",
            timeout=240,
            return_state=True,
        )

    # In this test's context: it holds Prefect's settings for the test server (conftest.py).
    thread = threading.Thread(target=contextvars.copy_context().run, args=(backfill,))
    try:
        with workers.paused(batch_stack, stock.index):
            thread.start()
            victim = workers.wait_for_line(batch_stack, "green 2021-05: scored ", timeout=120)  # its first batch
            assert victim.name == warm.name
            assert workers.kill(batch_stack, victim.index) == [warm.pid]  # the month ran inside it
            assert list_keys(bucket, prefix) == []  # the killed attempt published nothing
        thread.join(timeout=300)
        assert not thread.is_alive(), "the backfill did not finish"
    finally:
        s3.delete_object(Bucket=INPUT_BUCKET, Key="trip-data/green_tripdata_2021-05.parquet")

    state = outcome["state"]
    assert state.is_completed(), state.message
    (may,) = state.result()  # reported once
    assert (may["year"], may["month"], may["rows"]) == (2021, 5, len(load_training_dataframe(big, get_settings())))
    assert list_keys(bucket, prefix) == [f"{prefix}{batch_model.run_id}.parquet"]  # one object, no partial one
    assert len(_read(may["output_file"])) == may["rows"]

    (run,) = _month_runs(state)
    assert run.run_count == 2 and run.state.is_completed()
    history = run_history(run.id)
    assert any(name == "AwaitingRetry" and "no heartbeat for 45 s" in message for name, message in history)
    assert [w.name for w in workers.workers(batch_stack)] == [stock.name]
    assert workers.runs_taken(batch_stack)[str(run.id)] == [warm.name, stock.name]


def test_preload_says_why_it_loaded_nothing_and_never_fails(batch_stack, monkeypatch):
    """A worker may start before any model exists, or with the tracking server down: it says so
    and starts; the first month then loads its model, or fails naming why."""
    from ride_duration.batch.worker import preload_model

    monkeypatch.delenv("MODEL_URI", raising=False)
    monkeypatch.delenv("MODEL_ID", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    said = preload_model("no-such-flow/no-such-deployment")
    assert said.startswith("no model loaded ahead of the first month (ModelNotFound: ")
    assert "http://127.0.0.1:9" in said
