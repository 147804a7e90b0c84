"""The warm worker's pieces that need no server: how a job's environment becomes the run's
settings and variables, its own settings as the jobs' variables, its heartbeat period, its
place among Prefect's worker types, the engine's suspension watch it skips, and asking again
after losing a run to another worker.
(It taking months, running them in its own process and dying mid-month: test_pool.py.)"""

from __future__ import annotations

import contextvars
import os
import threading

import pytest

# Prefect is imported by the tests, not at collection: it reads PREFECT_API_URL once, at import,
# and the batch tests set it for their own server first (conftest.py).


@pytest.fixture(scope="module")
def worker():
    from ride_duration.batch import worker

    return worker


@pytest.fixture(scope="module")
def settings():
    import prefect.settings

    return prefect.settings


@pytest.fixture(scope="module")
def run_env():
    from ride_duration.batch.deploy import RUN_ENV

    return RUN_ENV


def test_job_environment_applies_prefect_settings_in_context_and_variables_for_the_run(
    monkeypatch, worker, settings, run_env
):
    monkeypatch.delenv("RIDE_TEST_VARIABLE", raising=False)
    monkeypatch.setenv("RIDE_TEST_KEPT", "before")
    before = settings.get_current_settings()
    env = {**run_env, "RIDE_TEST_VARIABLE": "x", "RIDE_TEST_KEPT": "during", "PREFECT__FLOW_RUN_ID": "abc"}
    seen = {}
    with worker.job_environment(env):
        seen["block"] = settings.PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK.value()
        # The flow engine's heartbeat thread is off: the worker sends the heartbeats.
        seen["heartbeat"] = settings.PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value()
        seen["variables"] = (os.environ.get("RIDE_TEST_VARIABLE"), os.environ["RIDE_TEST_KEPT"])
        seen["plumbing"] = os.environ.get("PREFECT__FLOW_RUN_ID")
        # Threads the engine starts copy the context, and with it the run's settings.
        context = contextvars.copy_context()
        thread = threading.Thread(
            target=context.run,
            args=(lambda: seen.update(thread=settings.PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK.value()),),
        )
        thread.start()
        thread.join()
    assert seen == {
        "block": "remote-file-system/ride-duration-results",
        "heartbeat": None,
        "variables": ("x", "during"),
        "plumbing": None,
        "thread": "remote-file-system/ride-duration-results",
    }
    # Afterwards: the worker's own settings and environment again.
    assert settings.get_current_settings() is before
    assert "RIDE_TEST_VARIABLE" not in os.environ and os.environ["RIDE_TEST_KEPT"] == "before"


def test_job_environment_is_restored_when_the_run_raises(monkeypatch, worker, settings, run_env):
    monkeypatch.delenv("RIDE_TEST_VARIABLE", raising=False)
    try:
        with worker.job_environment({"RIDE_TEST_VARIABLE": "x", **run_env}):
            raise KeyError("the run failed")
    except KeyError:
        pass
    assert "RIDE_TEST_VARIABLE" not in os.environ
    assert settings.PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK.value() != "remote-file-system/ride-duration-results"


def test_heartbeat_period_comes_from_the_job_and_respects_prefects_minimum(worker, settings, run_env):
    assert worker.heartbeat_seconds(run_env) == 30
    assert worker.heartbeat_seconds({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "5"}) == 30  # Prefect's minimum
    assert worker.heartbeat_seconds({"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "90"}) == 90
    assert (
        worker.heartbeat_seconds({}) == settings.PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 180
    )  # Prefect's default


def test_it_serves_process_pools_without_replacing_prefects_process_worker(worker):
    from prefect.utilities.dispatch import lookup_type
    from prefect.workers.base import BaseWorker
    from prefect.workers.process import ProcessWorker

    assert worker.WarmProcessWorker.type == "process"  # takes runs from the `ride-duration` process pool
    assert lookup_type(BaseWorker, "process") is ProcessWorker
    assert lookup_type(BaseWorker, "process-warm") is worker.WarmProcessWorker
    assert worker.WarmProcessWorker()._limit == 1  # one month at a time, as `--limit 1` for Prefect's


def test_the_workers_settings_become_job_variables_once_per_settings_object(monkeypatch, worker, settings):
    from prefect.workers.process import ProcessJobConfiguration

    assert worker.WarmProcessWorker.job_configuration is worker.WarmJobConfiguration
    prefects = ProcessJobConfiguration._base_environment.__func__
    calls = []
    monkeypatch.setattr(
        ProcessJobConfiguration, "_base_environment", classmethod(lambda c: calls.append(1) or prefects(c))
    )
    monkeypatch.setattr(worker, "_settings_environment", (None, {}))
    warm = worker.WarmJobConfiguration

    first = warm._base_environment()
    assert first == prefects(ProcessJobConfiguration) and len(calls) == 1
    first["RIDE_TEST_ADDED_BY_A_RUN"] = "x"  # the caller adds a run's variables to what it gets
    assert warm._base_environment() == prefects(ProcessJobConfiguration) and len(calls) == 1
    # Other settings (a profile, a test's temporary ones) are other objects: serialised anew.
    with settings.temporary_settings(updates={settings.PREFECT_WORKER_QUERY_SECONDS: 7}):
        assert warm._base_environment()["PREFECT_WORKER_QUERY_SECONDS"] == "7.0" and len(calls) == 2
    assert warm._base_environment() == prefects(ProcessJobConfiguration) and len(calls) == 3


def test_runs_it_executes_skip_the_engines_suspension_watch_and_other_flows_keep_it(monkeypatch, worker):
    import contextlib
    import inspect

    import prefect.flow_engine as engine

    # The engine looks the watch up by this name in its module at every run: the hook holds only while it does.
    assert "observe_flow_run_suspension(" in inspect.getsource(
        engine.BaseFlowRunEngine.setup_flow_run_suspension_request
    )
    assert engine.observe_flow_run_suspension is worker._observe_suspension_unless_warm
    watched = []

    @contextlib.contextmanager
    def prefects_watch(flow_run_id, request):  # stands in for the thread and subscription it starts
        watched.append(flow_run_id)
        yield

    monkeypatch.setattr(worker, "_observe_suspension", prefects_watch)

    def run(flow_run_id: str, warm: bool) -> None:
        if warm:
            worker._warm_run.set(True)  # as `execute_flow_run` does, in its thread's context
        with engine.observe_flow_run_suspension(flow_run_id, None):
            pass

    contextvars.copy_context().run(run, "another flow", False)
    contextvars.copy_context().run(run, "a month the worker took", True)
    run("another flow, after", False)  # the warm run's mark stayed in its own context
    assert watched == ["another flow", "another flow, after"]


def test_a_run_another_worker_took_first_makes_it_ask_again_soon(worker, monkeypatch):
    """Two workers that saw the same run due both propose Pending; the server gives it to one.
    The other asks for the next run 0.1 s later instead of at its next poll (a second)."""
    import anyio
    from prefect.workers.process import ProcessWorker

    answers = iter([False, True])  # the server's: taken by another worker, then given to this one

    async def propose(self, flow_run) -> bool:
        return next(answers)

    monkeypatch.setattr(ProcessWorker, "_propose_pending_state", propose)
    warm = worker.WarmProcessWorker(name="test-worker")
    polls = []

    async def poll_now(after: float = 0) -> None:
        polls.append(after)

    monkeypatch.setattr(warm, "_poll_now", poll_now)

    async def main() -> list[bool]:
        async with anyio.create_task_group() as group:
            warm._runs_task_group = group
            return [await warm._propose_pending_state(None), await warm._propose_pending_state(None)]

    assert anyio.run(main) == [False, True]
    assert polls == [0.1]  # once, for the run it lost


def test_it_subscribes_again_when_the_servers_event_stream_fails_and_asks_only_when_idle(worker, monkeypatch):
    """The subscription to the server's events is what makes it take a waiting month at once
    (the real one: test_pool.py). A stream that could not be opened or broke (the server
    restarting) is opened again after a pause, the poll finding runs meanwhile; each event asks
    for runs, unless the worker is busy with a month (it asks when the month ends)."""
    import types

    import anyio

    warm = worker.WarmProcessWorker(name="test-worker")
    polls, filters = [], []
    idle, busy = types.SimpleNamespace(available_tokens=1), types.SimpleNamespace(available_tokens=0)
    sessions = iter([(idle, 2), RuntimeError("server restarting"), (busy, 1)])

    class Stream:  # stands in for Prefect's events subscriber, one connection per instance
        def __init__(self, filter, reconnect_on_clean_close) -> None:
            filters.append((filter, reconnect_on_clean_close))
            self.session = next(sessions, None)
            if self.session is None:  # every session played: end the test's worker
                warm._wake_scope.cancel()
                self.session = RuntimeError("no more")

        async def __aenter__(self):
            if isinstance(self.session, Exception):
                raise self.session
            warm._limiter, self.left = self.session
            return self

        async def __aexit__(self, *exc_info) -> None:
            return None

        def __aiter__(self):
            return self

        async def __anext__(self):
            await anyio.sleep(0.01)  # the asked-for poll runs before the next event
            if not self.left:
                raise ConnectionError("stream closed")
            self.left -= 1
            return "a run scheduled in the pool"

    async def get_and_submit_flow_runs() -> None:
        polls.append(warm._limiter.available_tokens)

    monkeypatch.setattr(worker, "get_events_subscriber", Stream)
    monkeypatch.setattr(worker, "WAKE_RETRY_SECONDS", 0.01)
    monkeypatch.setattr(warm, "get_and_submit_flow_runs", get_and_submit_flow_runs)
    warnings = []
    monkeypatch.setattr(warm._logger, "warning", lambda message, *args: warnings.append(message % args))

    async def main() -> None:
        async with anyio.create_task_group() as group:
            warm._runs_task_group = group
            warm._wake_scope = anyio.CancelScope()
            await warm._wake_on_scheduled_runs()

    anyio.run(main)
    assert polls == [1, 1]  # two events while idle; none for the one that came while busy
    assert len(filters) == 4 and all(again for _, again in filters)  # subscribed again after each failure
    wanted = filters[0][0]
    assert wanted.event.prefix == ["prefect.flow-run."]
    assert wanted.resource.labels.root == {"prefect.state-type": "SCHEDULED"}
    assert wanted.any_resource.labels.root["prefect.resource.name"] == "ride-duration"
    assert len(warnings) == 4 and "server restarting" in warnings[1]
