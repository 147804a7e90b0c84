"""The Prefect 3 flows: one month, and a backfill of many months.

A month is one run of `ride_duration_prediction`. The backfill submits one run of the
`monthly` deployment per month to the work pool, where workers on any number of machines
execute them (`pool`, `deploy`); with `workers=False` it scores the months here, one after
the other, as subflows (a learner without workers: `backfill --local`).

2022 -> now: `@flow`/`@task` look the same, but Prefect 3 dropped the Orion
`DeploymentSpec`/`Deployment.build_from_flow` (see `deploy`), agents became workers
polling work pools, and the scheduled time of a run is read with
`prefect.runtime.flow_run.scheduled_start_time`.
"""

from __future__ import annotations

import contextlib
import logging
from datetime import date, datetime

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

from ..config import Settings, get_settings
from ..registry import ModelRef, resolve_model
from . import FLOW_NAME
from .paths import BatchPaths, get_paths, months_between, run_date_for
from .pool import require_workers, submit_months, wait_for_runs
from .scoring import load_model_ref, score_month

BACKFILL_FLOW_NAME = "ride-duration-prediction-backfill"
# A month whose worker died is taken again by another worker (see `deploy`); one that kills
# every worker it runs on (out of memory, say) fails at its third start instead of looping.
MAX_STARTS = 3


# NO_CACHE: the default cache key would hash the inputs; the work is a side effect
# (an S3 object) that must be redone when asked.
@task(name="apply-model", cache_policy=NO_CACHE)
def apply_model(paths: BatchPaths, model: ModelRef, settings: Settings, n_jobs: int | None = -1) -> dict:
    """Score one month: load the (cached) model, read, predict, write atomically."""
    logger = get_run_logger()
    logger.info("loading model %s (run %s)", model.uri, model.run_id)
    pipeline, version = load_model_ref(model, settings)
    result = score_month(paths, pipeline, version, settings=settings, n_jobs=n_jobs, logger=logger)
    logger.info(
        "%s: %d rides scored, RMSE %.3f min; %d rejected", paths.label, result.rows, result.rmse, result.rejected
    )
    return result.as_dict()


# The summary is kept as JSON (not pickle) where the run's environment says: S3 for runs on
# the work pool (`deploy.RUN_ENV`), so a backfill on another machine can read it back.
@flow(name=FLOW_NAME, persist_result=True, result_serializer="json")
def ride_duration_prediction(
    taxi_type: str = "green", run_id: str | None = None, run_date: datetime | None = None, n_jobs: int | None = -1
) -> dict:
    """Score the month before `run_date` with the model `run_id`: a run id, an alias, a
    `models:/` or S3 URI; default: what the services use (MODEL_URI, MODEL_ID +
    EXPERIMENT_ID straight from S3, else the registry alias; `registry.resolve_model`).

    Without `run_date` the run uses its SCHEDULED start time, the orchestrator's
    date, not the worker's clock: a run scheduled for 2021-03-02 03:00 that starts
    late (worker down, queue full, a retry after its worker died) still scores
    February, and re-running it later gives the same month.
    """
    logger = get_run_logger()
    settings = get_settings()
    if run_date is None:
        run_date = flow_run.scheduled_start_time
        logger.info("no run_date given: using the scheduled start time %s", run_date)
    model = resolve_model(run_id, settings)
    paths = get_paths(run_date, taxi_type, model.run_id, settings)
    if flow_run.run_count > MAX_STARTS:
        raise RuntimeError(f"{paths.label}: start {flow_run.run_count}; its worker died {MAX_STARTS} times, giving up")
    logger.info("run date %s -> scoring %s with model %s (run %s)", run_date, paths.label, model.uri, model.run_id)
    return apply_model(paths, model, settings, n_jobs)


@flow(name=BACKFILL_FLOW_NAME)
def ride_duration_prediction_backfill(
    taxi_type: str = "green",
    run_id: str | None = None,
    start_date: date | str = "2021-01",
    end_date: date | str = "2021-02",
    workers: bool = True,
    timeout: float | None = None,
) -> list[dict]:
    """Score every month from `start_date` to `end_date` (inclusive) with one model version.

    `workers=True`: one run of the `monthly` deployment per month, scheduled at the time
    the cron would have run it, executed by the work pool's workers (as many at once as
    there are workers), waited for (`timeout` s at most, None: no limit); the months' runs
    carry the tag `backfill:<this run's id>` (`pool.month_runs`; a filter in the UI).
    `workers=False`: each month is a subflow here, one after the other, the forest on every core.
    """
    logger = get_run_logger()
    months = months_between(start_date, end_date)
    settings = get_settings()
    # The pinned URI (not the alias): every month uses the version resolved here.
    model = resolve_model(run_id, settings)
    logger.info("backfill %s: %d month(s) with model %s (run %s)", taxi_type, len(months), model.uri, model.run_id)
    if workers:
        logger.info("work pool workers online: %s", ", ".join(require_workers()))
        # Tagged with this run's id: its months, found with `pool.month_runs` and in the UI.
        runs = submit_months(taxi_type, model.uri, months, backfill_id=flow_run.id)
        # Each month's summary is read from S3 as soon as its run ends, while the others still run.
        summaries = {}

        def read_summary(run) -> None:
            if run.state.is_completed():
                summaries[run.id] = run.state.result(_sync=True)  # _sync: called from Jupyter too (see deploy)

        finished = wait_for_runs([run.id for run in runs], timeout, on_final=read_summary)
        outcomes = [(run.state, summaries.get(run.id)) for run in finished]
    else:
        load_model_ref(model, settings)  # once, before the first month
        # Subflows here live in this run's process, whose own heartbeat is the one that
        # matters; Prefect 3.9 waits up to a second for a flow's heartbeat thread at its end.
        with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            states = [
                ride_duration_prediction(taxi_type, model.uri, run_date_for(y, m), return_state=True) for y, m in months
            ]
        outcomes = [(state, state.result(_sync=True) if state.is_completed() else None) for state in states]
    results, failures = [], []
    for (y, m), (state, summary) in zip(months, outcomes):
        if state.is_completed():
            results.append(summary)
        else:
            failures.append(f"{y:04d}-{m:02d}: {state.message}")
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(months)} month(s) failed: " + "; ".join(failures))
    return results


def run_backfill(**kwargs):
    """`ride_duration_prediction_backfill(**kwargs)` as the CLI runs it: without the engine's
    heartbeat thread. No automation watches a backfill's heartbeats (the one `deploy` makes
    is for the months' runs), and Prefect 3.9 joins that thread at the flow's end in 1 s
    steps: every backfill ended up to a second after its last month."""
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return ride_duration_prediction_backfill(**kwargs)


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
