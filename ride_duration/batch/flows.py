"""The Prefect 3 flows: one month, and a backfill of many months.

2022 -> now: `@flow`/`@task` look the same, but Prefect 3 dropped the Orion
`DeploymentSpec`/`Deployment.build_from_flow` (see `deploy`), task runners are
`ThreadPoolTaskRunner` (no more `SequentialTaskRunner`), and the scheduled time
of a run is read with `prefect.runtime.flow_run.scheduled_start_time`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import date, datetime

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from ..registry import ModelRef, resolve_model
from .paths import BatchPaths, get_paths, months_between, run_date_for
from .scoring import load_model_ref, score_month

FLOW_NAME = "ride-duration-prediction"
BACKFILL_FLOW_NAME = "ride-duration-prediction-backfill"
# Months scored at once in a backfill: one per core on the course machine.
BACKFILL_WORKERS = 2

# Month subflow runs are created one at a time, then run in parallel: on the local
# server's SQLite, two subflows created at the same instant make it answer one with
# 503 "database is locked", and the client waits 2 s before retrying. Creating a
# subflow run takes ~0.1 s. The lock is released as soon as the month's flow starts.
_creating_subflow = threading.Lock()
_this_thread = threading.local()  # .holds_lock: this thread's month has not started yet


def _subflow_started() -> None:
    if getattr(_this_thread, "holds_lock", False):
        _this_thread.holds_lock = False
        _creating_subflow.release()


# NO_CACHE: the default cache key would hash the inputs; the work is a side effect
# (an S3 object) that must be redone when asked.
@task(name="apply-model", cache_policy=NO_CACHE)
def apply_model(
    input_file: str, output_file: str, model: ModelRef, taxi_type: str, year: int, month: int, n_jobs: int | None = -1
) -> dict:
    """Score one month: load the (cached) model, read, predict, write atomically."""
    logger = get_run_logger()
    paths = BatchPaths(taxi_type, year, month, input_file, output_file)
    logger.info("loading model %s (run %s)", model.uri, model.run_id)
    pipeline, version = load_model_ref(model)
    result = score_month(paths, pipeline, version, n_jobs=n_jobs, logger=logger)
    logger.info(
        "%s: %d rides scored, RMSE %.3f min; %d rejected", paths.label, result.rows, result.rmse, result.rejected
    )
    return result.as_dict()


@flow(name=FLOW_NAME)
def ride_duration_prediction(
    taxi_type: str = "green", run_id: str | None = None, run_date: datetime | None = None, n_jobs: int | None = -1
) -> dict:
    """Score the month before `run_date` with the model `run_id`: a run id, an alias, a
    `models:/` or S3 URI; default: what the services use (MODEL_URI, MODEL_ID +
    EXPERIMENT_ID straight from S3, else the registry alias; `predict.resolve_model`).

    Without `run_date` the run uses its SCHEDULED start time, the orchestrator's
    date, not the worker's clock: a run scheduled for 2021-03-02 03:00 that starts
    late (worker down, queue full, a manual retry days later) still scores
    February, and re-running it later gives the same month.
    """
    _subflow_started()
    logger = get_run_logger()
    if run_date is None:
        run_date = flow_run.scheduled_start_time
        logger.info("no run_date given: using the scheduled start time %s", run_date)
    model = resolve_model(run_id)
    paths = get_paths(run_date, taxi_type, model.run_id)
    logger.info("run date %s -> scoring %s with model %s (run %s)", run_date, paths.label, model.uri, model.run_id)
    return apply_model(paths.input_file, paths.output_file, model, taxi_type, paths.year, paths.month, n_jobs)


@task(name="score-month", cache_policy=NO_CACHE)
def score_month_subflow(taxi_type: str, run_id: str, run_date: datetime, n_jobs: int | None) -> dict:
    """A task whose only job is to call the month's flow, so the task runner can
    run months in threads; each month is still its own (sub)flow run.

    The subflow runs without its own heartbeat: it lives in the backfill's process,
    whose flow run already sends one (what zombie detection watches), and Prefect
    3.9 waits up to a second for a flow's heartbeat thread to wake up when the flow
    ends, about a second per month otherwise (measured in `make bench-batch`).
    """
    _creating_subflow.acquire()
    _this_thread.holds_lock = True
    try:
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            return ride_duration_prediction(taxi_type=taxi_type, run_id=run_id, run_date=run_date, n_jobs=n_jobs)
    finally:
        _subflow_started()  # the flow never started (e.g. it could not be created)


@flow(name=BACKFILL_FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=BACKFILL_WORKERS))
def ride_duration_prediction_backfill(
    taxi_type: str = "green",
    run_id: str | None = None,
    start_date: date | str = "2021-01",
    end_date: date | str = "2021-02",
    parallel: bool = True,
    n_jobs: int | None = None,
) -> list[dict]:
    """Score every month from `start_date` to `end_date` (inclusive), one subflow each.

    Parallel is safe here because the model is resolved to one version and loaded
    once before the months start; predicting only reads it; each month writes its
    own key; and the forest predicts with one thread per month so two months use
    the two cores instead of fighting over them. `n_jobs` overrides the forest's
    threads per month (default: 1 when parallel, every core when sequential).

    Month subflow runs are created one at a time (see `_creating_subflow`), then
    run side by side.
    """
    logger = get_run_logger()
    months = months_between(start_date, end_date)
    model = resolve_model(run_id)
    load_model_ref(model)  # once, before the threads start
    logger.info("backfill %s: %d month(s) with model run %s", taxi_type, len(months), model.run_id)
    # The pinned URI (not the alias, nor a run id the tracking server would have to
    # look up): every month uses the version resolved above, loaded from the cache.
    args = [(taxi_type, model.uri, run_date_for(y, m)) for y, m in months]
    if parallel:
        futures = [score_month_subflow.submit(*a, n_jobs=n_jobs or 1) for a in args]
        states = [f.wait() or f.state for f in futures]
    else:
        states = [score_month_subflow(*a, n_jobs=n_jobs or -1, return_state=True) for a in args]
    results, failures = [], []
    for (y, m), state in zip(months, states):
        if state.is_completed():
            results.append(state.result())
        else:
            failures.append(f"{y:04d}-{m:02d}: {state.message}")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(months)} month(s) failed: " + "; ".join(failures))
    return results


@contextlib.contextmanager
def prefect_log_level(level: int = logging.CRITICAL):
    """Temporarily raise Prefect's log level (a notebook showing an expected failure
    without a wall of ERROR lines; the message is still in the exception and the UI)."""
    logger = logging.getLogger("prefect")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)
