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
from datetime import UTC, datetime
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterParentFlowRunId,
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


def submit_run(scheduled_time: datetime, parameters: dict | None = None, *, as_subflow: bool = False) -> FlowRun:
    """A run of the deployment scheduled at `scheduled_time` (in the past: due now), not waited for.
    `as_subflow`: linked to the calling flow run (the backfill's months are its children in the UI)."""
    # _sync: in Jupyter's event loop Prefect would return the coroutine of the async variant.
    return run_deployment(
        FULL_NAME, parameters=parameters, scheduled_time=scheduled_time, timeout=0, as_subflow=as_subflow, _sync=True
    )


def submit_month(taxi_type: str, model_uri: str, year: int, month: int, *, as_subflow: bool = False) -> FlowRun:
    """A run scoring (year, month), scheduled when the cron would have run it."""
    scheduled = run_date_for(year, month).replace(tzinfo=UTC)
    return submit_run(scheduled, {"taxi_type": taxi_type, "run_id": model_uri}, as_subflow=as_subflow)


def wait_for_runs(ids: list[UUID], timeout: float | None = None, poll: float = 0.5) -> list[FlowRun]:
    """Poll the server until every run is in a final state; the runs in the order of `ids`.

    A run whose worker died is rescheduled by the server (see `deploy`) and taken by another
    worker: it is still the same run, waited for here once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    wanted = FlowRunFilter(id=FlowRunFilterId(any_=list(ids)))
    with get_client(sync_client=True) as client:
        while True:
            runs = {run.id: run for run in client.read_flow_runs(flow_run_filter=wanted)}
            if len(runs) == len(ids) and all(run.state.is_final() for run in runs.values()):
                return [runs[i] for i in ids]
            if deadline is not None and time.monotonic() > deadline:
                pending = [f"{r.name} ({r.state.name})" for r in runs.values() if not r.state.is_final()]
                raise TimeoutError(f"after {timeout:.0f} s, still not finished: {', '.join(pending)}; are workers up?")
            time.sleep(poll)


def month_runs(backfill_run_id: UUID) -> list[FlowRun]:
    """The runs a backfill submitted (its children), in the order of the months they score."""
    children = FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[backfill_run_id]))
    with get_client(sync_client=True) as client:
        return sorted(client.read_flow_runs(flow_run_filter=children), key=lambda run: run.expected_start_time)


def run_history(flow_run_id: UUID) -> list[tuple[str, str]]:
    """(state name, message) of every state the run went through, oldest first."""
    with get_client(sync_client=True) as client:
        states = sorted(client.read_flow_run_states(flow_run_id), key=lambda state: state.timestamp)
    return [(state.name, state.message or "") for state in states]
