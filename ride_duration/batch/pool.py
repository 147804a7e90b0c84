"""Months on the work pool, from the client's side: submit a run, wait for runs, read results.

The `monthly` deployment lives on the process work pool `ride-duration` (`deploy`). Any
number of workers on any number of machines take its runs (`prefect worker start --pool
ride-duration`, or this package's warm worker; `make workers N=2` starts local ones). A run
scores the month before its scheduled time, so a backfill submits each month as the cron
would have run it (`run_date_for`: 2021-03-02 03:00 UTC scores
February); a month taken late, or taken again after its worker died, scores the same month.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC
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
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFlowRunFuture
from prefect.states import Scheduled

from . import FULL_NAME, WORK_POOL
from .paths import run_date_for


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


# The state a backfill's months wait in: Scheduled, under a name of its own. Prefect's late-runs
# service marks runs still "Scheduled" 15 s after their time "Late", and a backfill's months are
# scheduled years ago by design: it would rewrite every waiting month while the workers write
# (SQLite: one writer at a time), and call a backfill late. Workers take runs of any Scheduled name.
BACKFILL_STATE = "Backfill"


def submit_months(
    taxi_type: str, model_uri: str, months: list[tuple[int, int]], *, backfill_id: UUID | str
) -> list[FlowRun]:
    """One run of the deployment per (year, month), scheduled when the cron would have run
    it (in the past: due now), tagged with the backfill (`backfill_tag`), not waited for.

    Not `run_deployment(as_subflow=True)`: that also records each run as a task of the calling
    flow, one more write per month racing the workers' (on Prefect's stock SQLite setup it was
    refused at once and retried, stalling backfills up to 14 s). Each month has an idempotency
    key: a submission retried after a lost answer gets the run the server already made, not a
    second one."""
    tags = [backfill_tag(backfill_id)]
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(FULL_NAME)
        runs = []
        for year, month in months:
            label = f"{year:04d}-{month:02d}"
            scheduled = Scheduled(scheduled_time=run_date_for(year, month).replace(tzinfo=UTC), name=BACKFILL_STATE)
            run = client.create_flow_run_from_deployment(
                deployment.id,
                parameters={"taxi_type": taxi_type, "run_id": model_uri},
                state=scheduled,
                name=f"{taxi_type}-{label}",
                tags=tags,
                idempotency_key=f"{tags[0]}:{label}",
            )
            runs.append(run)
    return runs


def wait_for_runs(
    ids: list[UUID],
    timeout: float | None = None,
    poll: float = 2.0,
    on_final: Callable[[FlowRun], None] | None = None,
) -> list[FlowRun]:
    """Wait until every run is in a final state; the runs in the order of `ids`.
    `on_final(run)` is called once per run as soon as it is seen final (reading a month's
    result while the other months still run).

    The runs are read when the server's events say one of them reached a final state
    (Prefect's futures: one websocket for the process) and every `poll` seconds regardless,
    so an event missed while that websocket reconnects costs at most `poll` s. A run whose
    worker died is rescheduled by the server (see `deploy`) and taken by another worker: it
    is still the same run, waited for here once."""
    deadline = None if timeout is None else time.monotonic() + timeout
    wanted = FlowRunFilter(id=FlowRunFilterId(any_=list(ids)))
    seen: set[UUID] = set()
    ended = threading.Event()
    for run_id in ids:
        PrefectFlowRunFuture(run_id).add_done_callback(lambda _: ended.set())
    with get_client(sync_client=True) as client:
        while True:
            ended.clear()  # before the read: an end the read misses wakes the wait below
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
            ended.wait(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))


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
