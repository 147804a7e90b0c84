"""Batch deployment (part 5): score a month of rides, orchestrated by Prefect.

- `core`: paths, reading, predicting, atomic writes (no orchestrator; fast to import).
- `flows`: the Prefect 3 task and flows (`ride_duration_prediction`, the backfill).
- `deploy`: the `monthly` deployment (cron `0 3 2 * *`), its schedule preview, serving.
- `report`: the papermill run of notebooks/05-batch-scoring.ipynb into reports/.

    python -m ride_duration.batch deploy [--no-serve] | schedule | score | backfill | report
"""

from .core import (
    BATCH_SIZE,
    REJECT_COLUMNS,
    REJECT_LIMIT,
    RESULT_COLUMNS,
    BatchPaths,
    InputNotFound,
    InputUnreadable,
    ModelRef,
    MonthResult,
    TooManyRejects,
    build_results,
    check_rejects,
    design_matrix,
    generate_uuids,
    get_paths,
    input_location,
    iter_month,
    load_cached_model,
    load_model_ref,
    month_paths,
    months_between,
    open_input,
    output_location,
    predict_durations,
    previous_month,
    read_month,
    read_month_and_rejects,
    reason_counts,
    rejects_location,
    resolve_model,
    run_date_for,
    save_rejects,
    save_results,
    score_month,
    split_rides,
    summarize,
    with_n_jobs,
)

__all__ = [
    "BATCH_SIZE", "REJECT_COLUMNS", "REJECT_LIMIT", "RESULT_COLUMNS", "BatchPaths", "InputNotFound", "InputUnreadable",
    "ModelRef", "MonthResult", "TooManyRejects", "build_results", "check_rejects", "design_matrix", "generate_uuids",
    "get_paths", "input_location", "iter_month", "load_cached_model", "load_model_ref", "month_paths", "months_between",
    "open_input", "output_location", "predict_durations", "previous_month", "read_month", "read_month_and_rejects",
    "reason_counts", "rejects_location", "resolve_model", "run_date_for", "save_rejects", "save_results",
    "score_month", "split_rides", "summarize", "with_n_jobs",
]
