"""The Prefect 3 flows: one month (the `monthly` deployment's runs) and a backfill of many months in one flow run; a
month is one task, `apply_model` (docs/batch.md).

Each month's summary is a persisted result (JSON in S3) under a cache key of month, taxi type, model version and
input checksum: a re-run skips the months already scored (`Cached`), `force` scores them again. Months run one after
the other (each uses every core for its trees), or on a Dask cluster (`DaskTaskRunner(address=...)`), whose scheduler
gives a lost worker's month to another. Bad input fails a month at once; other failures are retried twice. A failed
month publishes nothing, and the flow fails with one sentence per month."""

from __future__ import annotations

import contextlib
from datetime import datetime

from prefect import flow, get_run_logger, task, unmapped
from prefect.filesystems import RemoteFileSystem
from prefect.runtime import flow_run
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, get_current_settings, temporary_settings
from prefect.task_runners import ThreadPoolTaskRunner

from ..aws import storage_options
from ..config import Settings, get_settings
from ..registry import ModelRef, resolve_model
from . import BACKFILL_FLOW_NAME, FLOW_NAME
from .paths import BatchPaths, month_paths, months_between, previous_month
from .reading import input_checksum
from .scoring import load_model_ref, score_month

# Imported inside functions, to keep them lazy: prefect_dask (dask.distributed, ~1 s), only for --dask.

RESULTS_BLOCK = "ride-duration-results"
HEARTBEATS_OFF = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
# A run whose worker died is scheduled again (`deploy`); one that kills every worker it runs on fails at its 4th start.
MAX_STARTS = 3


class MonthsFailed(RuntimeError):
    """Some months failed: one sentence each, naming the month."""


def month_cache_key(context, parameters) -> str | None:
    """month, taxi type, model version, input checksum; None (no caching) for an unreadable input,
    whose month then fails in `apply_model` with the sentence that says why."""
    paths, model = parameters["paths"], parameters["model"]
    try:
        checksum = input_checksum(paths, parameters["settings"])
    except (OSError, ValueError):
        return None
    return f"{paths.taxi_type}-{paths.year:04d}-{paths.month:02d}-{model.run_id}-{checksum}"


def transient(task, task_run, state) -> bool:
    """Retry a month unless its input or model is at fault (the same file fails the same way)."""
    return not isinstance(state.result(raise_on_failure=False), (ValueError, LookupError, FileNotFoundError))


@task(
    name="apply-model",
    task_run_name="{paths.label}",
    cache_key_fn=month_cache_key,
    persist_result=True,
    result_serializer="json",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=transient,
)
def apply_model(paths: BatchPaths, model: ModelRef, settings: Settings, n_jobs: int | None = -1) -> dict:
    """Score one month: the (cached) model, read, predict, write atomically; its summary."""
    logger = get_run_logger()
    pipeline, version = load_model_ref(model, settings)
    result = score_month(paths, pipeline, version, settings=settings, n_jobs=n_jobs, logger=logger)
    logger.info("%s: %d rides, RMSE %.3f min; %d rejected", paths.label, result.rows, result.rmse, result.rejected)
    return result.as_dict()


def result_storage(settings: Settings) -> RemoteFileSystem:
    """The months' summaries in S3, for every machine; a saved block (as a task's storage must be), no credentials."""
    basepath = f"s3://{settings.predictions_bucket}/_prefect-results"
    storage = RemoteFileSystem(basepath=basepath, settings=storage_options(basepath, settings))
    with contextlib.suppress(ValueError):  # not on this server yet; one read, where a save is four requests
        if ((saved := RemoteFileSystem.load(RESULTS_BLOCK)).basepath, saved.settings) == (basepath, storage.settings):
            return saved
    storage.save(RESULTS_BLOCK, overwrite=True)
    return storage


def score_months(taxi_type: str, months: list[tuple[int, int]], run_id: str | None, force: bool) -> list[dict]:
    """The months as tasks of the calling flow (its task runner runs them); their summaries."""
    settings = get_settings()
    model = resolve_model(run_id, settings)  # pinned once: every month uses this version
    get_run_logger().info("%d month(s) of %s with model %s (run %s)", len(months), taxi_type, model.uri, model.run_id)
    paths = [month_paths(taxi_type, y, m, model.run_id, settings=settings) for y, m in months]
    scorer = apply_model.with_options(result_storage=result_storage(settings), refresh_cache=force)
    futures = scorer.map(paths, model=unmapped(model), settings=unmapped(settings))
    outcomes = [future.result(raise_on_failure=False) for future in futures]
    failures = [
        str(o) if p.label in str(o) else f"{p.label}: {type(o).__name__}: {o}"
        for p, o in zip(paths, outcomes)
        if isinstance(o, BaseException)
    ]
    if failures:
        raise MonthsFailed(f"{len(failures)} of {len(months)} month(s) failed: " + "; ".join(failures))
    return outcomes


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=1))
def ride_duration_prediction(
    taxi_type: str = "green", run_id: str | None = None, run_date: datetime | None = None, force: bool = False
) -> dict:
    """Score the month before `run_date` (2021-03-02 scores February) with the model `run_id` (default:
    the services', `registry.resolve_model`). Without `run_date` (the cron's runs), the run's scheduled
    time: a run taken late or again after its worker died scores the same month."""
    if run_date is None:
        run_date = flow_run.scheduled_start_time
    if flow_run.run_count > MAX_STARTS:
        raise MonthsFailed(f"run date {run_date}: started {flow_run.run_count} times, its worker died each time")
    (summary,) = score_months(taxi_type, [previous_month(run_date)], run_id, force)
    return summary


@flow(name=BACKFILL_FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=1))
def ride_duration_prediction_backfill(
    taxi_type: str = "green",
    run_id: str | None = None,
    start_date: str = "2021-01",
    end_date: str = "2021-02",
    force: bool = False,
) -> list[dict]:
    """Every month from `start_date` to `end_date` (inclusive), one model version, a task each."""
    return score_months(taxi_type, months_between(start_date, end_date), run_id, force)


def run_backfill(*, dask: str | None = None, **parameters):
    """The backfill here (one month after the other) or, with `dask` (a scheduler's address, `tcp://host:8786`), on
    that Dask cluster's workers. Without heartbeats: only the deployment's zombie automation reads them, a backfill
    resumes from its persisted results, and Prefect's heartbeat thread (1 s sleeps) held each run's end up to 1 s."""
    backfill = ride_duration_prediction_backfill
    if dask:
        from prefect_dask import DaskTaskRunner

        backfill = backfill.with_options(task_runner=DaskTaskRunner(address=dask))
    off = get_current_settings().flows.heartbeat_frequency is None  # then no new settings: they take ~0.1 s to build
    with contextlib.nullcontext() if off else temporary_settings(updates=HEARTBEATS_OFF):
        return backfill(**parameters)
