"""The month loop: read a batch, split off its rejects, predict, stage; publish once at the end.
No orchestrator here: the flows, the notebook and the benchmark score a month the same way."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from ..config import Settings, in_checkout
from ..registry import ModelRef, load_model
from .paths import BatchPaths, rejects_location

# The notebook's steps are named from this module too (notebooks/05-batch-scoring.ipynb).
from .predicting import build_results, predict_durations, predict_valid  # noqa: F401
from .reading import (  # noqa: F401
    BATCH_SIZE,
    REJECT_LIMIT,
    check_rejects,
    iter_month,
    open_input,
    read_month_and_rejects,
    reason_counts,
    reasons_text,
    split_rides,
)
from .writing import publish_month, save_rejects, save_results, staged  # noqa: F401

log = logging.getLogger(__name__)
_models: dict[str, tuple] = {}
_models_lock = threading.Lock()


def load_model_ref(ref: ModelRef, settings: Settings):
    """`(model, version)` of a pinned model, loaded once per process and run id: months scored
    in threads share it (predicting only reads the fitted trees) and save a 35 MB download each."""
    with _models_lock:
        if ref.run_id not in _models:
            _models[ref.run_id] = load_model(ref.uri, settings=settings)
        return _models[ref.run_id]


@dataclass(frozen=True)
class MonthResult:
    """`rows` and `rmse` are over the rides scored; `rejected` rides (by reason) are in `rejects_file`."""

    taxi_type: str
    year: int
    month: int
    rows: int
    rmse: float
    mean_diff: float
    output_file: str
    model_version: str
    seconds: float
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    rejects_file: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(paths: BatchPaths, result: pd.DataFrame, rejects: pd.DataFrame | None = None) -> dict:
    """A month scored step by step (the notebook) in the figures of `MonthResult`, JSON-able."""
    diff, n = result["diff"].to_numpy(dtype=float), 0 if rejects is None else len(rejects)
    month = {"taxi_type": paths.taxi_type, "year": paths.year, "month": paths.month, "rows": len(result)}
    figures = {"rmse": round(float(np.sqrt(np.mean(diff**2))), 3), "mean_diff": round(float(diff.mean()), 3)}
    where = {"model_version": str(result["model_version"].iloc[0]), "output_file": paths.output_file}
    rejected = {"rejected": n, "rejected_by_reason": reason_counts(rejects) if n else {}}
    return month | figures | where | rejected | {"rejects_file": rejects_location(paths.output_file) if n else None}


def score_month(paths: BatchPaths, model, model_version: str, *, settings: Settings, batch_size=BATCH_SIZE, n_jobs=-1,
                logger=None) -> MonthResult:  # fmt: skip
    """Read, predict and stage one month in batches, then publish it; nothing is published on failure.
    Rides that break the contract are not scored: they go to `rejects_location(output)` with
    their reason, and the month fails only when they are more than REJECT_LIMIT of it."""
    logger = logger or log
    start = time.perf_counter()
    location = open_input(paths, settings)
    logger.info("%s: reading %s", paths.label, in_checkout(location))
    rows, squared, total_diff, reasons = 0, 0.0, 0.0, Counter()
    with staged(paths.output_file) as results, staged(rejects_location(paths.output_file)) as rejects:
        for df in iter_month(location, settings, batch_size, label=paths.label):
            valid, rejected = split_rides(df)
            if len(rejected):
                rejects.write(rejected)
                reasons.update(reason_counts(rejected))
            if valid.empty:
                continue
            result = build_results(valid, predict_valid(model, valid, n_jobs), model_version)
            results.write(result)
            diff = result["diff"].to_numpy()
            rows, squared, total_diff = rows + len(result), squared + float(diff @ diff), total_diff + float(diff.sum())
        check_rejects(paths, location, rows, reasons)
        rejects_file = publish_month(paths.label, results, rejects, paths.output_file, settings)
    seconds, rejected = time.perf_counter() - start, sum(reasons.values())
    logger.info("%s: wrote %d predictions to %s in %.1f s", paths.label, rows, paths.output_file, seconds)
    if rejected:
        logger.warning(
            "%s: rejected %d of %d rides (%.2f%%, limit %.0f%%): %s; written to %s",
            *(paths.label, rejected, rows + rejected, 100 * rejected / (rows + rejected), 100 * REJECT_LIMIT),
            *(reasons_text(reasons), rejects_file),
        )
    rmse, mean_diff = float(np.sqrt(squared / rows)), total_diff / rows
    month = (paths.taxi_type, paths.year, paths.month, rows, rmse, mean_diff, paths.output_file, model_version)
    return MonthResult(*month, seconds, rejected, dict(reasons.most_common()), rejects_file)
