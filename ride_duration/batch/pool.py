"""Months on the work pool, from the client's side: submit a run, wait for runs, read results.

The `monthly` deployment lives on the process work pool `ride-duration` (`deploy`). Any
number of workers on any number of machines take its runs (`prefect worker start --pool
ride-duration`; `make workers N=2` starts local ones): each run is a new process on a
worker. A run scores the month before its scheduled time, so a backfill submits each
month as the cron would have run it (`run_date_for`: 2021-03-02 03:00 UTC scores
February); a month taken late, or taken again after its worker died, scores the same month.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
    WorkerFilter,
    WorkerFilterStatus,
)
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from .paths import run_date_for

FLOW_NAME = "ride-duration-prediction"
DEPLOYMENT_NAME = "monthly"
FULL_NAME = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
WORK_POOL = "ride-duration"


class NoWorkers(RuntimeError):
    """No worker polls the work pool: submitted months would wait forever."""


def online_workers(pool: str = WORK_POOL) -> list[str]:
    """Names of the workers the server has a recent heartbeat from, in `pool`."""
    online = WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
    with get_client(sync_client=True) as client:
        try:
            return sorted(w.name for w in client.read_workers_for_work_pool(pool, worker_filter=online))
        except ObjectNotFound:
            return []


def require_workers(pool: str = WORK_POOL) -> list[str]:
    names = online_workers(pool)
    if not names:
        raise NoWorkers(
            f"no worker polls the work pool {pool!r}: start some (`make workers N=2`, or `prefect worker start "
            f"--pool {pool}` on any machine with this package), or score in this process with --local"
        )
    return names


def backfill_tag(backfill_run_id: UUID | str) -> str:
    """The tag every month run of one backfill carries (the UI's filter for its months)."""
    return f"backfill:{backfill_run_id}"


def submit_run(scheduled_time: datetime, parameters: dict | None = None, *, tags: list[str] | None = None) -> FlowRun:
    """A run of the deployment scheduled at `scheduled_time` (in the past: due now), not waited for.

    Not `as_subflow`: that also records the run as a task of the calling flow, a write the local
    server's SQLite refuses at once while the workers write ("database is locked", retried after
    2, 4, 8 s: backfills stalled up to 14 s). A backfill tags its months instead (`backfill_tag`)."""
    # _sync: in Jupyter's event loop Prefect would return the coroutine of the async variant.
    return run_deployment(
        FULL_NAME,
        parameters=parameters,
        scheduled_time=scheduled_time,
        timeout=0,
        tags=tags,
        as_subflow=False,
        _sync=True,
    )


def submit_month(taxi_type: str, model_uri: str, year: int, month: int, *, tags: list[str] | None = None) -> FlowRun:
    """A run scoring (year, month), scheduled when the cron would have run it."""
    scheduled = run_date_for(year, month).replace(tzinfo=UTC)
    return submit_run(scheduled, {"taxi_type": taxi_type, "run_id": model_uri}, tags=tags)


def wait_for_runs(
    ids: list[UUID],
    timeout: float | None = None,
    poll: float = 1.0,
    on_final: Callable[[FlowRun], None] | None = None,
) -> list[FlowRun]:
    """Poll the server until every run is in a final state; the runs in the order of `ids`.
    `on_final(run)` is called once per run as soon as it is seen final (reading a month's
    result while the other months still run).

    A run whose worker died is rescheduled by the server (see `deploy`) and taken by another
    worker: it is still the same run, waited for here once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    wanted = FlowRunFilter(id=FlowRunFilterId(any_=list(ids)))
    seen: set[UUID] = set()
    with get_client(sync_client=True) as client:
        while True:
            runs = {run.id: run for run in client.read_flow_runs(flow_run_filter=wanted)}
            for run in runs.values():
                if run.state.is_final() and run.id not in seen:
                    seen.add(run.id)
                    if on_final is not None:
                        on_final(run)
            if len(seen) == len(ids):
                return [runs[i] for i in ids]
            if deadline is not None and time.monotonic() > deadline:
                pending = [f"{r.name} ({r.state.name})" for r in runs.values() if not r.state.is_final()]
                raise TimeoutError(f"after {timeout:.0f} s, still not finished: {', '.join(pending)}; are workers up?")
            time.sleep(poll)


def month_runs(backfill_run_id: UUID) -> list[FlowRun]:
    """The runs a backfill submitted (tagged with `backfill_tag`), in the order of the months they score."""
    tagged = FlowRunFilter(tags=FlowRunFilterTags(all_=[backfill_tag(backfill_run_id)]))
    with get_client(sync_client=True) as client:
        return sorted(client.read_flow_runs(flow_run_filter=tagged), key=lambda run: run.expected_start_time)


def run_history(flow_run_id: UUID) -> list[tuple[str, str]]:
    """(state name, message) of every state the run went through, oldest first."""
    with get_client(sync_client=True) as client:
        states = sorted(client.read_flow_run_states(flow_run_id), key=lambda state: state.timestamp)
    return [(state.name, state.message or "") for state in states]
