"""Batch scoring without an orchestrator: paths, reading, predicting, writing.

Everything Prefect, papermill and the benchmark run is here, so each of them
scores a month the same way. Prefect is not imported by this module.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..aws import s3_client, split_s3_uri, storage_options
from ..config import Settings, get_settings
from ..data import DataUnavailable, fetch_month, filename, official_url
from ..predict import load_model, make_prediction
from ..utils import REQUIRED_COLUMNS, TARGET, add_duration, check_columns, pu_do_column

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "ride_id", "lpep_pickup_datetime", "PULocationID", "DOLocationID", "trip_distance",
    "actual_duration", "predicted_duration", "diff", "model_version",
)
# Rows per read/predict/write step: bounds memory for yellow-taxi-sized months.
BATCH_SIZE = 250_000
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


class InputNotFound(FileNotFoundError):
    """The month's input file does not exist where it was looked for."""


# ----------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class BatchPaths:
    taxi_type: str
    year: int
    month: int
    input_file: str
    output_file: str

    @property
    def label(self) -> str:
        return f"{self.taxi_type} {self.year:04d}-{self.month:02d}"


def previous_month(run_date: date | datetime | str) -> tuple[int, int]:
    """(year, month) of the month before `run_date`: a run on 2021-03-02 scores 2021-02."""
    if isinstance(run_date, str):
        run_date = datetime.fromisoformat(run_date)
    first = pd.Timestamp(year=run_date.year, month=run_date.month, day=1)
    prev = first - pd.offsets.MonthBegin(1)
    return prev.year, prev.month


def input_location(taxi_type: str, year: int, month: int, settings: Settings | None = None) -> str:
    """`BATCH_INPUT_PREFIX/<file>` when configured, else the official TLC URL
    (read through the data cache and `TLC_MIRROR`, see `open_input`)."""
    settings = settings or get_settings()
    name = filename(taxi_type, year, month)
    prefix = settings.batch_input_prefix
    if prefix:
        return f"{prefix.rstrip('/')}/{name}" if "://" in prefix else str(Path(prefix) / name)
    return official_url(taxi_type, year, month)


def output_location(taxi_type: str, year: int, month: int, run_id: str, settings: Settings | None = None) -> str:
    """Hive-style partitions, one object per (month, model): re-running replaces it."""
    settings = settings or get_settings()
    return (
        f"s3://{settings.predictions_bucket}/taxi_type={taxi_type}/"
        f"year={year:04d}/month={month:02d}/{run_id}.parquet"
    )


def get_paths(run_date, taxi_type: str, run_id: str, settings: Settings | None = None) -> BatchPaths:
    """Input and output of the run on `run_date`: it scores the month before."""
    year, month = previous_month(run_date)
    return month_paths(taxi_type, year, month, run_id, settings=settings)


def month_paths(taxi_type: str, year: int, month: int, run_id: str, *, input_file: str | None = None,
                output_file: str | None = None, settings: Settings | None = None) -> BatchPaths:
    """Paths to score (year, month) itself, with optional overrides (papermill parameters)."""
    settings = settings or get_settings()
    return BatchPaths(
        taxi_type=taxi_type,
        year=int(year),
        month=int(month),
        input_file=input_file or input_location(taxi_type, int(year), int(month), settings),
        output_file=output_file or output_location(taxi_type, int(year), int(month), run_id, settings),
    )


def summarize(paths: BatchPaths, result: pd.DataFrame) -> dict:
    """The month's figures as plain JSON-able values (the report's `summary`)."""
    diff = result["diff"].to_numpy(dtype=float)
    return {
        "taxi_type": paths.taxi_type,
        "year": paths.year,
        "month": paths.month,
        "rows": int(len(result)),
        "rmse": round(float(np.sqrt(np.mean(diff**2))), 3),
        "mean_diff": round(float(diff.mean()), 3),
        "model_version": str(result["model_version"].iloc[0]),
        "output_file": paths.output_file,
    }


# ----------------------------------------------------------------------------- model
@dataclass(frozen=True)
class ModelRef:
    """A model pinned to one version: `uri` never moves, `run_id` names the outputs."""

    uri: str
    run_id: str


def resolve_model(ref: str | None = None, settings: Settings | None = None) -> ModelRef:
    """A run id, an alias (`production`), or a model URI -> a pinned `ModelRef`.

    An alias is resolved once, here, so every month of a backfill uses the same
    version even if someone moves the alias meanwhile.
    """
    settings = settings or get_settings()
    ref = ref or settings.model_alias
    if RUN_ID_PATTERN.match(ref):
        return ModelRef(uri=f"runs:/{ref}/model", run_id=ref)
    name = settings.model_name
    if ref.startswith("models:/") and "@" in ref:
        name, ref = ref.removeprefix("models:/").split("@", 1)
    elif "/" in ref or ":" in ref:
        _, version = load_cached_model(ref)  # a pinned URI: its MLmodel file knows the run id
        return ModelRef(uri=ref, run_id=version)
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ..predict import ModelNotFound

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    try:
        mv = MlflowClient().get_model_version_by_alias(name, ref)
    except MlflowException as exc:
        raise ModelNotFound(
            f"no model {name}@{ref} on the tracking server {settings.mlflow_tracking_uri}: {exc.message}"
        ) from exc
    return ModelRef(uri=f"models:/{name}/{mv.version}", run_id=mv.run_id)


_models: dict[str, tuple] = {}
_models_lock = threading.Lock()


def load_cached_model(uri: str, key: str | None = None):
    """`load_model` once per process and `key` (default: the URI; pinned models only).

    Months scored in parallel threads share one model object: predicting only
    reads the fitted trees, so sharing is safe and saves a 35 MB download each.
    """
    key = key or uri
    with _models_lock:
        if key not in _models:
            _models[key] = load_model(uri)
        return _models[key]


def load_model_ref(ref: ModelRef):
    """The model of a pinned `ModelRef`, cached by its run id (however it was named)."""
    return load_cached_model(ref.uri, key=ref.run_id)


# ----------------------------------------------------------------------------- input
def open_input(paths: BatchPaths, settings: Settings | None = None) -> str:
    """A readable location for the month's input, or InputNotFound naming month and place."""
    settings = settings or get_settings()
    location = paths.input_file
    if location == official_url(paths.taxi_type, paths.year, paths.month):
        # The data cache, then TLC_MIRROR, then the URL; never synthetic data for scoring.
        try:
            return str(fetch_month(paths.taxi_type, paths.year, paths.month, settings=settings,
                                   allow_synthetic=False, progress=False))
        except DataUnavailable as exc:
            raise InputNotFound(f"no input for {paths.label}: {exc}") from exc
    if location.startswith("s3://"):
        bucket, key = split_s3_uri(location)
        from botocore.exceptions import ClientError

        try:
            s3_client(settings).head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            raise InputNotFound(f"no input for {paths.label}: {location} does not exist ({exc})") from exc
    elif "://" not in location and not Path(location).is_file():
        raise InputNotFound(f"no input for {paths.label}: {location} does not exist")
    return location


@contextlib.contextmanager
def _parquet_file(location: str):
    import fsspec

    with fsspec.open(location, "rb", **(storage_options(location) or {})) as f:
        yield pq.ParquetFile(f)


def iter_month(location: str, batch_size: int = BATCH_SIZE):
    """DataFrames of at most `batch_size` rides with `duration`, filtered to 1-60 min.

    Only the five needed columns are read, one batch at a time.
    """
    with _parquet_file(location) as pf:
        check_columns(pd.DataFrame(columns=pf.schema_arrow.names), REQUIRED_COLUMNS, source=location)
        for batch in pf.iter_batches(batch_size=batch_size, columns=list(REQUIRED_COLUMNS)):
            yield add_duration(batch.to_pandas())


def read_month(location: str) -> pd.DataFrame:
    """The whole month at once (notebooks); `iter_month` for the streaming path."""
    frames = list(iter_month(location))
    return pd.concat(frames, ignore_index=True) if len(frames) != 1 else frames[0]


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

    None when this fast path does not apply (another model layout, non-numeric or
    missing values): callers then use `make_prediction`, which also reports bad rows.
    tests/batch/test_core.py checks equality with `DictVectorizer.transform`.
    """
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
    return sparse.coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
                             shape=shape).tocsr()


def predict_durations(model, df: pd.DataFrame, n_jobs: int | None = -1) -> np.ndarray:
    """Predicted minutes; batch is throughput-bound, so the trees run in `n_jobs` threads."""
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
        text[:, start:start + b - a] = hexed[:, a:b]
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
            "PULocationID": df["PULocationID"].to_numpy(),
            "DOLocationID": df["DOLocationID"].to_numpy(),
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
def atomic_parquet(output_file: str, settings: Settings | None = None):
    """Yield `write(frame)`; the parquet appears at `output_file` only if the block succeeds.

    Rows go to a local temporary file; then one atomic step publishes it: os.replace
    for a local path; for S3 an upload, which is all-or-nothing (PutObject, or a
    multipart upload that only becomes an object on completion). A crash leaves no
    partial object, and an earlier output for the same key stays intact.
    """
    settings = settings or get_settings()
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
            raise ValueError(f"nothing to write to {output_file}: no rides")
        writer.close()
        writer = None
        if is_s3:
            bucket, key = split_s3_uri(output_file)
            s3_client(settings).upload_file(tmp_name, bucket, key)
        else:
            os.replace(tmp_name, output_file)
    finally:
        if writer is not None:
            writer.close()
        Path(tmp_name).unlink(missing_ok=True)


def save_results(df: pd.DataFrame, predictions, run_id: str, output_file: str,
                 settings: Settings | None = None) -> pd.DataFrame:
    """Write the month's results to `output_file` atomically; returns the frame written."""
    result = build_results(df, predictions, run_id)
    with atomic_parquet(output_file, settings) as write:
        write(result)
    return result


# ----------------------------------------------------------------------------- one month
@dataclass(frozen=True)
class MonthResult:
    taxi_type: str
    year: int
    month: int
    rows: int
    rmse: float
    mean_diff: float
    output_file: str
    model_version: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


def score_month(paths: BatchPaths, model, model_version: str, *, batch_size: int = BATCH_SIZE,
                n_jobs: int | None = -1, settings: Settings | None = None,
                logger: logging.Logger | logging.LoggerAdapter | None = None) -> MonthResult:
    """Read, predict and write one month in batches; nothing is published on failure."""
    settings = settings or get_settings()
    logger = logger or log
    start = time.perf_counter()
    location = open_input(paths, settings)
    logger.info("%s: reading %s", paths.label, location)
    rows, squared, total_diff = 0, 0.0, 0.0
    with atomic_parquet(paths.output_file, settings) as write:
        for df in iter_month(location, batch_size):
            if df.empty:
                continue
            result = build_results(df, predict_durations(model, df, n_jobs), model_version)
            write(result)
            diff = result["diff"].to_numpy()
            rows += len(result)
            squared += float(diff @ diff)
            total_diff += float(diff.sum())
            logger.info("%s: scored %d rides so far", paths.label, rows)
    seconds = time.perf_counter() - start
    logger.info("%s: wrote %d predictions to %s in %.1f s", paths.label, rows, paths.output_file, seconds)
    return MonthResult(
        taxi_type=paths.taxi_type, year=paths.year, month=paths.month, rows=rows,
        rmse=float(np.sqrt(squared / rows)), mean_diff=total_diff / rows,
        output_file=paths.output_file, model_version=model_version, seconds=seconds,
    )


def months_between(start, end) -> list[tuple[int, int]]:
    """Inclusive list of (year, month) from `start` to `end` ('2021-01', dates or datetimes)."""
    def ym(value):
        if isinstance(value, str):
            value = datetime.fromisoformat(value if len(value) > 7 else f"{value}-01")
        return value.year, value.month

    (y0, m0), (y1, m1) = ym(start), ym(end)
    if (y1, m1) < (y0, m0):
        raise ValueError(f"end {end} is before start {start}")
    out, (y, m) = [], (y0, m0)
    while (y, m) <= (y1, m1):
        out.append((y, m))
        y, m = (y + 1, 1) if m == 12 else (y, m + 1)
    return out


def run_date_for(year: int, month: int) -> datetime:
    """When the monthly schedule (03:00 on day 2) scores (year, month): the next month."""
    y, m = (year + 1, 1) if month == 12 else (year, month + 1)
    return datetime(y, m, 2, 3, 0)
