"""A run of the `monthly` deployment whose machine dies: its worker and the run's process SIGKILLed
after its first heartbeat. The zombie automation (`deploy.zombie_automation`) schedules it again
after 45 s of silence and a second stock worker scores the month, once.

About 80 s, most of it the silence: marked `slow`, so `make test` leaves it out and
`make test-slow` runs it."""

from __future__ import annotations

import os
import time

import pytest
import requests

from .helpers import list_keys, wait_for

pytestmark = pytest.mark.slow


def test_a_run_whose_worker_died_is_scheduled_again_and_scored_once(batch_stack, batch_model, s3_input):
    from prefect import get_client
    from prefect.deployments import run_deployment

    from ride_duration.batch import FULL_NAME
    from ride_duration.batch.deploy import SILENT_AFTER, create_deployment
    from ride_duration.batch.paths import run_date_for
    from ride_duration.config import get_settings
    from workbench import workers

    create_deployment("green")  # the run finds the production model, as the course's do
    poll = {"PREFECT_WORKER_QUERY_SECONDS": "1"}  # a documented worker setting: quicker to take the run
    (first,) = workers.start(1, stack=batch_stack, env=poll)
    api = os.environ["PREFECT_API_URL"].rstrip("/")
    try:
        run = run_deployment(FULL_NAME, parameters={"run_date": run_date_for(2021, 2), "force": True}, timeout=0)

        def flow_run():
            with get_client(sync_client=True) as client:
                return client.read_flow_run(run.id)

        def heartbeats() -> int:  # the server's events API: the automation sees the same events
            events = {"name": ["prefect.flow-run.heartbeat"]}
            query = {"filter": {"event": events, "resource": {"id": [f"prefect.flow-run.{run.id}"]}}, "limit": 1}
            response = requests.post(f"{api}/events/filter", json=query, timeout=10)
            response.raise_for_status()
            return response.json()["total"]

        wait_for(lambda: flow_run().state.is_running(), 120, "the run on the first worker")
        wait_for(heartbeats, 30, "the run's first heartbeat")
        workers.kill(first.pid)  # the worker and the run's process, as when the machine dies
        killed = time.monotonic()
        workers.stop(batch_stack)  # its pid file
        workers.start(1, stack=batch_stack, env=poll)
        final = wait_for(lambda: (r := flow_run()).state.is_final() and r, 180, "the run scored again", every=0.5)
        silent = time.monotonic() - killed
    finally:
        workers.stop(batch_stack)

    assert final.state.is_completed(), final.state.message
    assert final.run_count == 2 and silent > SILENT_AFTER.total_seconds()
    with get_client(sync_client=True) as client:
        names = [state.name for state in client.read_flow_run_states(run.id)]
    assert names.count("Running") == 2 and "AwaitingRetry" in names
    assert names.index("AwaitingRetry") > names.index("Running")
    bucket = get_settings().predictions_bucket
    assert list_keys(bucket, "taxi_type=green/year=2021/month=02/") == [
        f"taxi_type=green/year=2021/month=02/{batch_model.run_id}.parquet"
    ]
