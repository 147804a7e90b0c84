"""Batch scoring without an orchestrator: reading a month, predicting, writing atomically.

Everything Prefect, papermill and the benchmark run is here, so each of them
scores a month the same way. Prefect is not imported by this module.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError

from ..aws import s3_client, split_s3_uri, storage_options
from ..config import Settings
from ..features import (
    DATETIME_COLUMNS,
    FEATURE_FIELDS,
    REQUIRED_COLUMNS,
    TARGET,
    InvalidRide,
    add_duration,
    check_ride,
    pu_do_column,
    ride_problems,
)
from ..predict import make_prediction
from ..registry import ModelRef, load_model
from ..tlc import DataUnavailable, fetch_month, official_url
from .paths import BatchPaths, rejects_location

# Imported inside functions, to keep them lazy: scipy and sklearn (only for the pipeline's
# design matrix, built once per month).

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "ride_id",
    "lpep_pickup_datetime",
    "PULocationID",
    "DOLocationID",
    "trip_distance",
    "actual_duration",
    "predicted_duration",
    "diff",
    "model_version",
)
# Rows per read/predict/write step: bounds memory for yellow-taxi-sized months.
BATCH_SIZE = 250_000
# A month fails when more than this share of its rides of 1-60 minutes break the
# ride contract (utils.ride_problems): a few bad rows are rejected and reported,
# a file that is mostly garbage is not scored at all.
REJECT_LIMIT = 0.01
# A rejected ride: its row in the input file, its columns as read, its duration, why.
REJECT_COLUMNS = ("row", *REQUIRED_COLUMNS, TARGET, "reason")


class InputNotFound(FileNotFoundError):
    """The month's input file does not exist where it was looked for."""


class InputUnreadable(ValueError):
    """The month's input exists but is not a readable parquet with the needed columns."""


class TooManyRejects(ValueError):
    """More than REJECT_LIMIT of the month's rides break the ride contract."""


def summarize(paths: BatchPaths, result: pd.DataFrame, rejects: pd.DataFrame | None = None) -> dict:
    """The month's figures as plain JSON-able values (the report's `summary`).

    `rows` and `rmse` are over the rides scored; `rejected` counts the rides the
    contract refused (`rejected_by_reason`), written to `rejects_file`."""
    diff = result["diff"].to_numpy(dtype=float)
    n_rejected = 0 if rejects is None else len(rejects)
    return {
        "taxi_type": paths.taxi_type,
        "year": paths.year,
        "month": paths.month,
        "rows": len(result),
        "rmse": round(float(np.sqrt(np.mean(diff**2))), 3),
        "mean_diff": round(float(diff.mean()), 3),
        "model_version": str(result["model_version"].iloc[0]),
        "output_file": paths.output_file,
        "rejected": n_rejected,
        "rejected_by_reason": reason_counts(rejects) if n_rejected else {},
        "rejects_file": rejects_location(paths.output_file) if n_rejected else None,
    }


def reason_counts(rejects: pd.DataFrame) -> dict[str, int]:
    """Rejected rides per reason, most frequent first."""
    return {str(k): int(v) for k, v in rejects["reason"].value_counts().items()}


# ----------------------------------------------------------------------------- model
# `ModelRef` and `resolve_model` live in ride_duration.registry: batch finds its model
# exactly as the web service and the stream do.


_models: dict[str, tuple] = {}
_models_lock = threading.Lock()


def load_cached_model(uri: str, settings: Settings, key: str | None = None):
    """`load_model` once per process and `key` (default: the URI; pinned models only).

    Months scored in parallel threads share one model object: predicting only
    reads the fitted trees, so sharing is safe and saves a 35 MB download each.
    """
    key = key or uri
    with _models_lock:
        if key not in _models:
            _models[key] = load_model(uri, settings=settings)
        return _models[key]


def load_model_ref(ref: ModelRef, settings: Settings):
    """The model of a pinned `ModelRef`, cached by its run id (however it was named)."""
    return load_cached_model(ref.uri, settings, key=ref.run_id)


# ----------------------------------------------------------------------------- input
@functools.cache
def _s3(settings: Settings):
    """One S3 client per settings in this process (boto3 clients are thread-safe): making one
    loads botocore's service data, ~0.2 s, twice per month otherwise (predictions and rejects)."""
    return s3_client(settings)


def open_input(paths: BatchPaths, settings: Settings) -> str:
    """A readable location for the month's input, or InputNotFound naming month and place."""
    location = paths.input_file
    if location == official_url(paths.taxi_type, paths.year, paths.month):
        # The data cache, then TLC_MIRROR, then the URL; never synthetic data for scoring.
        try:
            return str(
                fetch_month(
                    paths.taxi_type, paths.year, paths.month, settings=settings, allow_synthetic=False, progress=False
                )
            )
        except DataUnavailable as exc:
            raise InputNotFound(f"no input for {paths.label}: {exc}") from exc
    if location.startswith("s3://"):
        _head_s3_input(paths, location, settings)
    elif "://" not in location and not Path(location).is_file():
        raise InputNotFound(f"no input for {paths.label}: {location} does not exist")
    return location


def _head_s3_input(paths: BatchPaths, location: str, settings: Settings) -> None:
    """InputNotFound for a missing object; InputUnreadable for any other refusal (403, no endpoint)."""
    bucket, key = split_s3_uri(location)
    try:
        _s3(settings).head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise InputNotFound(f"no input for {paths.label}: {location} does not exist ({exc})") from exc
        raise InputUnreadable(f"{paths.label}: {location} could not be read: {exc}") from exc
    except BotoCoreError as exc:
        raise InputUnreadable(f"{paths.label}: {location} could not be read: {exc}") from exc


@contextlib.contextmanager
def _parquet_file(location: str, settings: Settings):
    with fsspec.open(location, "rb", **(storage_options(location, settings) or {})) as f:
        yield pq.ParquetFile(f)


def _check_schema(schema: pa.Schema, where: str) -> None:
    """Missing columns, or pickup/dropoff times that are not timestamps: one sentence."""
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    if missing:
        raise InputUnreadable(f"{where} is missing required column(s): {', '.join(missing)}")
    for column in DATETIME_COLUMNS:
        if not pa.types.is_timestamp(schema.field(column).type):
            raise InputUnreadable(f"{where}: column {column!r} holds {schema.field(column).type}, not timestamps")


_ROW = "__row__"  # the file's row numbers, carried through the duration filter


def iter_month(location: str, settings: Settings, batch_size: int = BATCH_SIZE, label: str | None = None):
    """DataFrames of at most `batch_size` rides with `duration`, filtered to 1-60 min.

    Only the five needed columns are read, one batch at a time. Each frame's index
    is the ride's row number in the file (rejects and errors name it). A file that
    is not a readable parquet with those columns (truncated, corrupt, a refused S3
    read) raises InputUnreadable naming the month (`label`) and the file.
    """
    where = f"{label}: {location}" if label else location
    try:
        with _parquet_file(location, settings) as pf:
            _check_schema(pf.schema_arrow, where)
            offset = 0
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(REQUIRED_COLUMNS)):
                frame = batch.to_pandas().assign(**{_ROW: np.arange(offset, offset + batch.num_rows)})
                offset += batch.num_rows
                df = add_duration(frame)
                df.index = pd.Index(df.pop(_ROW).to_numpy(), name=None)
                yield df
    except InputUnreadable:
        raise
    except (pa.ArrowException, OSError, ClientError, BotoCoreError) as exc:
        raise InputUnreadable(f"{where} could not be read as parquet: {exc}") from exc


def split_rides(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rides the contract accepts, rejected rides with their `reason`): `utils.ride_problems`,
    the definition the web service and the stream apply to each ride."""
    problems = ride_problems(df)
    bad = problems.notna().to_numpy()
    if not bad.any():
        return df, _rejects_frame(df.iloc[:0], problems.iloc[:0])
    return df[~bad], _rejects_frame(df[bad], problems[bad])


def _rejects_frame(df: pd.DataFrame, reasons: pd.Series) -> pd.DataFrame:
    columns = {"row": df.index.to_numpy(dtype="int64")}
    for name in (*REQUIRED_COLUMNS, TARGET):
        values = df[name]
        # One schema for every batch: an int column with a null comes back from
        # arrow as float in one batch and int in the next.
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        columns[name] = values.to_numpy(dtype=float, na_value=np.nan) if numeric else values.to_numpy()
    columns["reason"] = reasons.astype(str).to_numpy()
    return pd.DataFrame(columns, columns=list(REJECT_COLUMNS))


def read_month_and_rejects(
    location: str, settings: Settings, label: str | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole month at once (notebooks): (valid rides of 1-60 minutes, rejected rides)."""
    pairs = [split_rides(df) for df in iter_month(location, settings, label=label)]
    if not pairs:  # a file without rows
        return pd.DataFrame(columns=[*REQUIRED_COLUMNS, TARGET]), pd.DataFrame(columns=list(REJECT_COLUMNS))
    return _concat([v for v, _ in pairs]), _concat([r for _, r in pairs])


def read_month(location: str, settings: Settings, label: str | None = None) -> pd.DataFrame:
    """The month's valid rides of 1-60 minutes at once; `iter_month` for the streaming path."""
    return read_month_and_rejects(location, settings, label)[0]


def _concat(frames) -> pd.DataFrame:
    return frames[0] if len(frames) == 1 else pd.concat(frames)


def check_rejects(paths: BatchPaths, location: str, scored: int, reasons: dict[str, int]) -> None:
    """Fail the month (TooManyRejects) when more than REJECT_LIMIT of its rides of 1-60
    minutes break the contract, or when there is nothing to score."""
    rejected = sum(reasons.values())
    total = scored + rejected
    if total == 0:
        raise ValueError(f"{paths.label}: {location} has no rides of 1 to 60 minutes; nothing was published")
    share = rejected / total
    if share > REJECT_LIMIT:
        raise TooManyRejects(
            f"{paths.label}: {rejected:,} of {total:,} rides of 1-60 minutes in {location} ({share:.1%}) break "
            f"the ride contract, above the {REJECT_LIMIT:.0%} limit ({_reasons_text(reasons)}); nothing was published"
        )


def _reasons_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n:,} with {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- predict + results
def with_n_jobs(model, n_jobs: int | None):
    """A shallow copy of the pipeline whose forest predicts in `n_jobs` threads.

    The fitted trees are shared, not copied; only the copy's `n_jobs` differs, so
    months scored in parallel threads never mutate the model they share (the
    pipeline's forest has n_jobs=None after training: one thread).
    """
    if n_jobs is None or not hasattr(model, "steps") or not hasattr(model.steps[-1][1], "n_jobs"):
        return model
    name, forest = model.steps[-1]
    forest = copy.copy(forest)
    forest.n_jobs = n_jobs
    fast = copy.copy(model)
    fast.steps = [*model.steps[:-1], (name, forest)]
    return fast


def design_matrix(model, df: pd.DataFrame):
    """What the pipeline's DictVectorizer makes of `prepare_features(df)`, built with
    column operations instead of one Python dict per ride (a third of the time of a
    month, and it holds the GIL, so months in threads could not overlap).

    Only for rides that passed the contract (`predict_durations` checks, `score_month`
    splits the rejects off first). None when this fast path does not apply (another
    model layout, non-numeric or missing values): callers then use `make_prediction`.
    tests/batch/test_scoring.py checks equality with `DictVectorizer.transform`.
    """
    # Here, not at the top: reading, validating and writing a month need neither (the notebook's first steps).
    from scipy import sparse
    from sklearn.feature_extraction import DictVectorizer

    steps = getattr(model, "steps", None)
    if not steps or len(steps) != 2 or not isinstance(steps[0][1], DictVectorizer):
        return None
    frame = df[["PULocationID", "DOLocationID", "trip_distance"]]
    for column in frame.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values) or values.isna().any():
            return None
        if column != "trip_distance" and pd.api.types.is_float_dtype(values) and (values % 1 != 0).any():
            return None
    vectorizer = steps[0][1]
    sep, vocabulary = vectorizer.separator, vectorizer.vocabulary_
    n = len(frame)
    pu_do = f"PU_DO{sep}" + pu_do_column(frame)
    one_hot = pu_do.map(vocabulary).to_numpy(dtype=float)  # NaN: a zone pair unseen in training, dropped
    known = ~np.isnan(one_hot)
    rows = [np.flatnonzero(known)]
    cols = [one_hot[known].astype(np.int64)]
    data = [np.ones(int(known.sum()))]
    if "trip_distance" in vocabulary:
        rows.append(np.arange(n))
        cols.append(np.full(n, vocabulary["trip_distance"]))
        data.append(frame["trip_distance"].to_numpy(dtype=float))
    shape = (n, len(vectorizer.feature_names_))
    return sparse.coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=shape).tocsr()


def predict_durations(model, df: pd.DataFrame, n_jobs: int | None = -1) -> np.ndarray:
    """Predicted minutes for rides that all satisfy the ride contract, else InvalidRide
    naming the first bad ride (its row) and field: `split_rides` first to score the rest.
    Batch is throughput-bound, so the trees run in `n_jobs` threads."""
    problems = ride_problems(df)
    if problems.notna().any():
        raise _first_invalid(df, problems)
    return _predict_valid(model, df, n_jobs)


def _first_invalid(df: pd.DataFrame, problems: pd.Series) -> InvalidRide:
    """The scalar contract's sentence (with the value) for the first row `ride_problems` refused."""
    position = int(np.flatnonzero(problems.notna().to_numpy())[0])
    label = df.index[position]
    # Python scalars, so the message shows `1e+39`, not `np.float64(1e+39)`.
    ride = {column: _scalar(df[column].iloc[position]) for column in FEATURE_FIELDS}
    try:
        check_ride(ride, label)
    except InvalidRide as exc:
        return exc
    return InvalidRide(f"ride {label}: {problems.iloc[position]}")


def _scalar(value):
    return value.item() if isinstance(value, np.generic) else value


def _predict_valid(model, df: pd.DataFrame, n_jobs: int | None) -> np.ndarray:
    model = with_n_jobs(model, n_jobs)
    X = design_matrix(model, df)
    if X is None:
        return make_prediction(model, df)
    return np.asarray(model.steps[-1][1].predict(X), dtype=float)


def generate_uuids(n: int) -> pa.Array:
    """n random UUID4 strings, vectorised: 3 M in under a second, not a Python loop."""
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = np.frombuffer(raw.tobytes().hex().encode("ascii"), dtype=np.uint8).reshape(n, 32)
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    for (a, b), start in zip(((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)), (0, 9, 14, 19, 24)):
        text[:, start : start + b - a] = hexed[:, a:b]
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(36), n, [None, pa.py_buffer(text.tobytes())])
    return fixed.cast(pa.binary()).cast(pa.string())


def build_results(df: pd.DataFrame, predictions, model_version: str) -> pd.DataFrame:
    """The course's output columns (+ trip_distance), one uuid `ride_id` per ride."""
    predictions = np.asarray(predictions, dtype=float)
    if len(predictions) != len(df):
        raise ValueError(f"{len(predictions)} predictions for {len(df)} rides")
    actual = df[TARGET].to_numpy(dtype=float)
    result = pd.DataFrame(
        {
            "ride_id": pd.arrays.ArrowStringArray(generate_uuids(len(df))),
            "lpep_pickup_datetime": df["lpep_pickup_datetime"].to_numpy(),
            # int64 always: a batch whose column had a null (rejected) comes back as float.
            "PULocationID": df["PULocationID"].to_numpy(dtype="int64"),
            "DOLocationID": df["DOLocationID"].to_numpy(dtype="int64"),
            "trip_distance": df["trip_distance"].to_numpy(dtype=float),
            "actual_duration": actual,
            "predicted_duration": predictions,
            "diff": actual - predictions,
            "model_version": model_version,
        }
    )
    return result[list(RESULT_COLUMNS)]


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_parquet(output_file: str, settings: Settings, *, required: bool = True):
    """Yield `write(frame)`; the parquet appears at `output_file` only if the block succeeds.

    Rows go to a local temporary file; then one atomic step publishes it: os.replace
    for a local path; for S3 an upload, which is all-or-nothing (PutObject, or a
    multipart upload that only becomes an object on completion). A crash leaves no
    partial object, and an earlier output for the same key stays intact.

    When nothing was written: an error if `required`, else an earlier object at
    `output_file` is removed (a re-run without rejects leaves no stale rejects).
    """
    is_s3 = output_file.startswith("s3://")
    if not is_s3 and "://" in output_file:
        raise ValueError(f"unsupported output location {output_file!r}: use s3:// or a local path")
    folder = None if is_s3 else Path(output_file).parent
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".batch-", suffix=".parquet.part")
    os.close(fd)
    writer = None

    def write(frame: pd.DataFrame) -> None:
        nonlocal writer
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if writer is None:
            writer = pq.ParquetWriter(tmp_name, table.schema)
        writer.write_table(table)

    try:
        yield write
        if writer is None:
            if required:
                raise ValueError(f"nothing to write to {output_file}: no rides")
            remove_output(output_file, settings)
            return
        writer.close()
        writer = None
        if is_s3:
            bucket, key = split_s3_uri(output_file)
            _s3(settings).upload_file(tmp_name, bucket, key)
        else:
            os.replace(tmp_name, output_file)
    finally:
        if writer is not None:
            writer.close()
        Path(tmp_name).unlink(missing_ok=True)


def remove_output(output_file: str, settings: Settings) -> None:
    """Delete an output object or file if it exists."""
    if output_file.startswith("s3://"):
        bucket, key = split_s3_uri(output_file)
        _s3(settings).delete_object(Bucket=bucket, Key=key)  # idempotent
    else:
        Path(output_file).unlink(missing_ok=True)


def save_rejects(rejects: pd.DataFrame, output_file: str, settings: Settings) -> str | None:
    """Publish the rejected rides beside `output_file` (`rejects_location`) atomically, or
    remove an earlier rejects object when there are none; returns its location or None."""
    location = rejects_location(output_file)
    with atomic_parquet(location, settings, required=False) as write:
        if len(rejects):
            write(rejects)
    return location if len(rejects) else None


def save_results(df: pd.DataFrame, predictions, run_id: str, output_file: str, settings: Settings) -> pd.DataFrame:
    """Write the month's results to `output_file` atomically; returns the frame written."""
    result = build_results(df, predictions, run_id)
    with atomic_parquet(output_file, settings) as write:
        write(result)
    return result


# ----------------------------------------------------------------------------- one month
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


def score_month(
    paths: BatchPaths,
    model,
    model_version: str,
    *,
    settings: Settings,
    batch_size: int = BATCH_SIZE,
    n_jobs: int | None = -1,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> MonthResult:
    """Read, predict and write one month in batches; nothing is published on failure.

    Rides that break the contract are not scored: they go to `rejects_location(output)`
    with their reason, and the month fails only when they are more than REJECT_LIMIT of it.
    """
    logger = logger or log
    start = time.perf_counter()
    location = open_input(paths, settings)
    logger.info("%s: reading %s", paths.label, location)
    rejects_file = rejects_location(paths.output_file)
    rows, squared, total_diff = 0, 0.0, 0.0
    reasons: Counter[str] = Counter()
    # Nested: on success the rejects are published (or a stale object removed) first,
    # then the predictions; on any failure neither is.
    with (
        atomic_parquet(paths.output_file, settings) as write,
        atomic_parquet(rejects_file, settings, required=False) as write_rejects,
    ):
        for df in iter_month(location, settings, batch_size, label=paths.label):
            valid, rejects = split_rides(df)
            if len(rejects):
                write_rejects(rejects)
                reasons.update(reason_counts(rejects))
            if valid.empty:
                continue
            result = build_results(valid, _predict_valid(model, valid, n_jobs), model_version)
            write(result)
            diff = result["diff"].to_numpy()
            rows += len(result)
            squared += float(diff @ diff)
            total_diff += float(diff.sum())
            logger.info("%s: scored %d rides so far", paths.label, rows)
        check_rejects(paths, location, rows, reasons)
    seconds = time.perf_counter() - start
    rejected = sum(reasons.values())
    logger.info("%s: wrote %d predictions to %s in %.1f s", paths.label, rows, paths.output_file, seconds)
    if rejected:
        logger.warning(
            "%s: rejected %d of %d rides (%.2f%%, limit %.0f%%): %s; written to %s",
            paths.label,
            rejected,
            rows + rejected,
            100 * rejected / (rows + rejected),
            100 * REJECT_LIMIT,
            _reasons_text(reasons),
            rejects_file,
        )
    return MonthResult(
        taxi_type=paths.taxi_type,
        year=paths.year,
        month=paths.month,
        rows=rows,
        rmse=float(np.sqrt(squared / rows)),
        mean_diff=total_diff / rows,
        output_file=paths.output_file,
        model_version=model_version,
        seconds=seconds,
        rejected=rejected,
        rejected_by_reason=dict(reasons.most_common()),
        rejects_file=rejects_file if rejected else None,
    )
