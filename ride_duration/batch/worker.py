"""A process-pool worker that runs each month inside its own, long-lived process.

Prefect's process worker starts a new Python process for every flow run: before a month
reads its first ride, that process imports Prefect and the flow's modules and loads the
model again, seconds of work for a second of scoring. This worker is the same Prefect
worker (`ProcessWorker`: it polls the same `process` work pool, takes runs through the
server, reports their states and heartbeats), except that it executes the run it takes
in a thread of its own process with Prefect's flow engine, the way `python -m
prefect.engine` would in a new one. Imports and the model (cached per process by
`scoring.load_cached_model`) stay loaded from one month to the next, and it asks for the
next run as soon as one ends, as soon as another worker took the one it reached for, and as
soon as the server's events say a run was scheduled in its pool, instead of at its next poll
(which stays, as the fallback). It loads the model the `monthly` deployment's runs will use
before it takes its first run (`preload_model`), so the first month after a start does not
pay for it either.

What stays as with Prefect's process worker:
- any mix of these and stock workers (`prefect worker start --pool ride-duration`) can
  serve the pool;
- one run at a time per worker (as `--limit 1`), with the job's environment (the deployment's
  job variables) applied for the run: its PREFECT_ settings as Prefect settings, the rest as
  the process's environment variables;
- a worker killed mid-month takes its month down with it; the run stops sending
  heartbeats and the server's automation schedules it again (`deploy`).

What differs: a run cannot be cancelled from the UI while it scores (there is no process
of its own to stop; it ends at the month's end); a flow that leaks memory or state does so
in the worker (the flows here keep only the model cache); the worker itself sends the
heartbeats of its runs (the engine's heartbeat thread makes every run wait up to a second
at its end) and skips the engine's watch for a "suspend" (see below). SIGTERM or Ctrl-C stop
it taking runs and let the current month finish.

    python -m ride_duration.batch worker --pool ride-duration --name machine-1
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import signal
from collections.abc import Iterator
from typing import Any

import anyio

# What a month may need beyond the flow's modules, imported when the worker starts rather than
# by its first month: MLflow to find a model, scikit-learn and skops to load one, s3fs to
# read and write S3 (seconds on first use, each).
import mlflow  # noqa: F401
import prefect.context
import prefect.flow_engine
import prefect.settings
import s3fs  # noqa: F401
import sklearn.ensemble  # noqa: F401
import skops.io  # noqa: F401
from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.events import emit_event
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.flow_engine import MINIMUM_HEARTBEAT_INTERVAL, load_flow, run_flow
from prefect.logging.loggers import flow_run_logger, get_logger
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, Settings, get_current_settings
from prefect.workers.process import ProcessJobConfiguration, ProcessWorker, ProcessWorkerResult

from ..config import get_settings
from ..registry import resolve_model
from . import (
    FULL_NAME,
    WORK_POOL,
    flows,  # noqa: F401  (imported now: the first month should not pay for it)
)
from .scoring import load_model_ref


@functools.lru_cache(maxsize=8)
def _settings_with(updates: tuple[tuple[str, str | None], ...]) -> Settings:
    """The worker's Prefect settings with a job's updates; built once per distinct job
    environment (a rebuild validates every setting again, ~0.15 s)."""
    return get_current_settings().copy_with_update(updates={getattr(prefect.settings, k): v for k, v in updates})


@contextlib.contextmanager
def job_environment(env: dict[str, str | None]) -> Iterator[None]:
    """The run's environment in this thread: PREFECT_ variables Prefect knows become settings
    of this context (inherited by the threads the engine starts); others are set in the
    process for the run's duration (one run at a time: `limit=1`). The engine's heartbeat
    thread is off: the worker sends the run's heartbeats (`WarmProcessWorker._send_heartbeats`)."""
    updates, variables = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": None}, {}
    for name, value in env.items():
        if value is None or name.startswith("PREFECT__"):  # PREFECT__: the process worker's own plumbing
            continue
        if name.startswith("PREFECT_") and hasattr(prefect.settings, name):
            updates.setdefault(name, value)
        else:
            variables[name] = value
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        context = prefect.context.get_settings_context()
        with prefect.context.SettingsContext(profile=context.profile, settings=_settings_with(tuple(updates.items()))):
            yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# Set in the thread that executes a run the worker took (`execute_flow_run`).
_warm_run = contextvars.ContextVar("warm_run", default=False)
_observe_suspension = prefect.flow_engine.observe_flow_run_suspension


@contextlib.contextmanager
def _observe_suspension_unless_warm(*args: Any, **kwargs: Any) -> Iterator[None]:
    """Prefect's engine watches every deployment run for a "suspend" from the UI with a thread
    of its own, an event-loop and a subscription to the server's events, set up for each run
    and joined at its end in 0.2 s steps: ~0.2 s of every month, for a request honoured only
    between tasks (a month is one task). Runs this worker executes skip it, as they cannot be
    cancelled mid-month either; any other flow in the process keeps it."""
    if _warm_run.get():
        yield
        return
    with _observe_suspension(*args, **kwargs):
        yield


prefect.flow_engine.observe_flow_run_suspension = _observe_suspension_unless_warm


def execute_flow_run(flow_run: FlowRun, env: dict[str, str | None]) -> str:
    """Run one flow run to its final state here, as `python -m prefect.engine <id>` does
    in a new process (after its `load_flow_run`); the name of that state."""
    _warm_run.set(True)  # this thread's context only (anyio runs it in a copy of the caller's)
    with job_environment(env):
        run_logger = flow_run_logger(flow_run=flow_run)
        flow = load_flow(flow_run)
        state = run_flow(flow, flow_run=flow_run, error_logger=run_logger, return_type="state")
    return state.name


def heartbeat_seconds(env: dict[str, str | None]) -> int | None:
    """The run's heartbeat period: its job's PREFECT_FLOWS_HEARTBEAT_FREQUENCY, else this process's."""
    value = env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") or PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
    return max(int(value), MINIMUM_HEARTBEAT_INTERVAL) if value else None


# After the server's events stream failed for good: the pause before subscribing again.
WAKE_RETRY_SECONDS = 10

# The last settings object turned into environment variables, and the result (see below).
_settings_environment: tuple[Settings | None, dict[str, str]] = (None, {})


class WarmJobConfiguration(ProcessJobConfiguration):
    """Prefect's process job configuration, except that the worker's own settings become
    environment variables once per settings object, not for every run: Prefect serialises
    every one of its settings for each run it prepares (~35 ms of CPU, the largest share of
    the worker's own time between two months), and a worker's settings do not change."""

    @classmethod
    def _base_environment(cls) -> dict[str, str]:
        global _settings_environment
        current = get_current_settings()
        if _settings_environment[0] is not current:
            _settings_environment = (current, super()._base_environment())
        return dict(_settings_environment[1])  # a copy: the caller adds the run's variables


class WarmProcessWorker(ProcessWorker):
    """Takes runs from a process work pool and runs them in this process (see the module)."""

    type = "process"  # the pool's type: this worker serves process pools like the stock one
    job_configuration = WarmJobConfiguration

    @classmethod
    def __dispatch_key__(cls) -> str:
        # Its own key in Prefect's registry of worker types: "process" stays Prefect's worker.
        return "process-warm"

    def __init__(self, work_pool_name: str = WORK_POOL, **kwargs: Any) -> None:
        # One run at a time: a run's environment variables are set in the process (`job_environment`).
        super().__init__(work_pool_name=work_pool_name, limit=1, **kwargs)
        self._wake_pending = False  # a poll the server's events asked for is under way

    async def setup(self) -> None:
        await super().setup()
        self._wake_scope = anyio.CancelScope()
        self._runs_task_group.start_soon(self._wake_on_scheduled_runs)

    async def teardown(self, *exc_info: Any) -> None:
        self._wake_scope.cancel()
        await super().teardown(*exc_info)

    def scheduled_runs_filter(self) -> EventFilter:
        """The server's events that mean "a run is waiting in this pool": a flow run entering a
        SCHEDULED state (created from a deployment, a backfill's month, a month rescheduled
        after its worker died), related to this work pool."""
        in_pool = ResourceSpecification(
            {"prefect.resource.role": "work-pool", "prefect.resource.name": self._work_pool_name}
        )
        return EventFilter(
            event=EventNameFilter(prefix=["prefect.flow-run."]),
            resource=EventResourceFilter(labels=ResourceSpecification({"prefect.state-type": "SCHEDULED"})),
            any_resource=EventAnyResourceFilter(labels=in_pool),
        )

    async def _wake_on_scheduled_runs(self) -> None:
        """Ask for runs when the server says one was scheduled in this pool, not at the next
        poll: a backfill's first month starts at once, and the poll (PREFECT_WORKER_QUERY_SECONDS,
        a write on the server each time) is only the fallback: for runs that become due later
        (the cron's, created ahead of time) and while the events stream is down."""
        with self._wake_scope:
            while True:
                try:
                    # Reconnects by itself (also after a clean close: a server restart), up to 10 times.
                    async with get_events_subscriber(
                        filter=self.scheduled_runs_filter(), reconnect_on_clean_close=True
                    ) as events:
                        async for _ in events:
                            # Busy: it asks anyway when its month ends. A burst of submissions wakes it once.
                            if self._limiter.available_tokens and not self._wake_pending:
                                self._wake_pending = True
                                self._runs_task_group.start_soon(self._poll_on_wake)
                except Exception as exc:  # noqa: BLE001  (the poll still finds every run meanwhile)
                    self._logger.warning(
                        "not woken by the server's events (%s: %s); polling until subscribed again in %s s",
                        exc.__class__.__name__,
                        exc,
                        WAKE_RETRY_SECONDS,
                    )
                await anyio.sleep(WAKE_RETRY_SECONDS)

    async def _poll_on_wake(self) -> None:
        try:
            await self._poll_now()
        finally:
            self._wake_pending = False

    async def run(
        self,
        flow_run,
        configuration: ProcessJobConfiguration,
        task_status: anyio.abc.TaskStatus[int] | None = None,
    ) -> ProcessWorkerResult:
        if task_status is not None:
            task_status.started(os.getpid())
        env = dict(configuration.env)
        status = 0
        async with anyio.create_task_group() as beats:
            if (period := heartbeat_seconds(env)) is not None:
                beats.start_soon(self._send_heartbeats, flow_run, period)
            try:
                # Read again with the worker's open client (the engine's `load_flow_run` opens a new one).
                current = await self.client.read_flow_run(flow_run.id)
                await anyio.to_thread.run_sync(execute_flow_run, current, env)
            except Exception:  # the engine itself failed (a flow's error is a Failed state, not this)
                self._logger.exception("flow run %s could not be executed", flow_run.id)
                status = 1
            beats.cancel_scope.cancel()
        # The slot is freed when this returns: ask for the next run then, not at the next poll.
        self._runs_task_group.start_soon(self._poll_now)
        return ProcessWorkerResult(status_code=status, identifier=str(os.getpid()))

    async def _send_heartbeats(self, flow_run, period: int) -> None:
        """The run's heartbeats, from this process, while the run is not final: the events the
        flow engine would send from a thread of the run's own process. The engine's thread
        is turned off because it makes every run wait up to a second for it at the end."""
        resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.name": flow_run.name}
        related = [{"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow"}]
        if flow_run.deployment_id:
            deployment = f"prefect.deployment.{flow_run.deployment_id}"
            related.append({"prefect.resource.id": deployment, "prefect.resource.role": "deployment"})
        while True:
            emit_event(event="prefect.flow-run.heartbeat", resource=resource, related=related)
            await anyio.sleep(period)
            # As the engine does: no heartbeat once the run is final (the server's view). Not
            # asked before the first one: the run is starting (a read per month saved).
            if (await self.client.read_flow_run(flow_run.id)).state.is_final():
                return

    async def _propose_pending_state(self, flow_run) -> bool:
        taken = await super()._propose_pending_state(flow_run)
        if not taken:
            # Another worker took it first (both saw it due): ask for the next one now, not at the
            # next poll, a second later. Not at once: a run refused for another reason would loop.
            self._runs_task_group.start_soon(self._poll_now, 0.1)
        return taken

    async def _poll_now(self, after: float = 0) -> None:
        await anyio.sleep(after)
        await self.get_and_submit_flow_runs()


def preload_model(deployment: str = FULL_NAME) -> str:
    """Load into this process's model cache the model that runs of `deployment` would use (its
    `run_id` parameter, else what the services use, resolved here and now), so that the first
    month after the worker starts does not load it (a backfill pinned to the same version
    finds it cached too). A month that names another version loads its own, as before. Best
    effort: what was loaded, or why nothing was; never an error (a worker may start before
    any model exists)."""
    try:
        with get_client(sync_client=True) as client:
            try:
                run_id = client.read_deployment_by_name(deployment).parameters.get("run_id")
            except ObjectNotFound:
                run_id = None
        settings = get_settings()
        ref = resolve_model(run_id, settings)
        load_model_ref(ref, settings)
    except Exception as exc:  # noqa: BLE001  (anything: the first month would load it, or fail and say why)
        return f"no model loaded ahead of the first month ({exc.__class__.__name__}: {exc})"
    return f"model {ref.uri} (run {ref.run_id}) loaded ahead of the first month"


def serve(pool: str = WORK_POOL, name: str | None = None) -> None:
    """Run a warm worker until SIGINT or SIGTERM. Either stops it taking runs; the month it
    is scoring finishes first (a stop from `kill -9` or a dead machine is the heartbeats' case)."""

    # Before the worker announces itself: a worker that is online can take a month at once.
    get_logger("worker.preload").info(preload_model())

    async def main() -> None:
        worker = WarmProcessWorker(work_pool_name=pool, name=name)
        async with anyio.create_task_group() as group:

            async def stop_on_signal() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        worker._logger.info(
                            "%s: finishing the current month, taking no more", signal.Signals(signum).name
                        )
                        group.cancel_scope.cancel()

            group.start_soon(stop_on_signal)
            await worker.start()
            group.cancel_scope.cancel()

    anyio.run(main)
