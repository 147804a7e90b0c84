"""Reading a month: where its rides are, the ride contract's rejects, one sentence per bad file."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError

from ..aws import s3_client, split_s3_uri, storage_options
from ..config import Settings
from ..features import DATETIME_COLUMNS, REQUIRED_COLUMNS, TARGET, add_duration, ride_problems
from ..tlc import DataUnavailable, fetch_month, official_url
from .paths import BatchPaths

# Rows per read/predict/write step: bounds memory for yellow-taxi-sized months.
BATCH_SIZE = 250_000
# A month fails when more than this share of its rides of 1-60 minutes break the ride contract
# (`features.ride_problems`): a few bad rows are rejected and reported, a garbage file is not scored.
REJECT_LIMIT = 0.01
REJECT_COLUMNS = ("row", *REQUIRED_COLUMNS, TARGET, "reason")  # its row in the file, its columns as read, why
_ROW = "__row__"  # the file's row numbers, carried through the duration filter


class InputNotFound(FileNotFoundError):
    """The month's input file does not exist where it was looked for."""


class InputUnreadable(ValueError):
    """The month's input exists but is not a readable parquet with the needed columns."""


class TooManyRejects(ValueError):
    """More than REJECT_LIMIT of the month's rides break the ride contract."""


@functools.cache
def s3(settings: Settings):
    """One S3 client per settings and process (boto3 clients are thread-safe; making one takes ~0.2 s)."""
    return s3_client(settings)


def open_input(paths: BatchPaths, settings: Settings) -> str:
    """A readable location for the month's input, or InputNotFound naming month and place."""
    location = paths.input_file
    if location == official_url(paths.taxi_type, paths.year, paths.month):
        # The data cache, then TLC_MIRROR, then the URL; never synthetic data for scoring.
        try:
            kwargs = {"settings": settings, "allow_synthetic": False, "progress": False}
            return str(fetch_month(paths.taxi_type, paths.year, paths.month, **kwargs))
        except DataUnavailable as exc:
            raise InputNotFound(f"no input for {paths.label}: {exc}") from exc
    if location.startswith("s3://"):
        _head(paths, location, settings)
    elif "://" not in location and not Path(location).is_file():
        raise InputNotFound(f"no input for {paths.label}: {location} does not exist")
    return location


def _head(paths: BatchPaths, location: str, settings: Settings) -> dict:
    bucket, key = split_s3_uri(location)
    try:
        return s3(settings).head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise InputNotFound(f"no input for {paths.label}: {location} does not exist ({exc})") from exc
        raise InputUnreadable(f"{paths.label}: {location} could not be read: {exc}") from exc


def input_checksum(paths: BatchPaths, settings: Settings) -> str:
    """What identifies the month's input bytes: the S3 ETag, else the file's MD5 (~5 ms a
    month). A file replaced at the same place gets a new checksum, so its month is scored again."""
    location = open_input(paths, settings)
    if location.startswith("s3://"):
        return _head(paths, location, settings)["ETag"].strip('"')
    with fsspec.open(location, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


def _check_schema(schema: pa.Schema, where: str) -> None:
    """Missing columns, or pickup/dropoff times that are not timestamps: one sentence."""
    if missing := [c for c in REQUIRED_COLUMNS if c not in schema.names]:
        raise InputUnreadable(f"{where} is missing required column(s): {', '.join(missing)}")
    for column in DATETIME_COLUMNS:
        if not pa.types.is_timestamp(schema.field(column).type):
            raise InputUnreadable(f"{where}: column {column!r} holds {schema.field(column).type}, not timestamps")


def iter_month(location: str, settings: Settings, batch_size: int = BATCH_SIZE, label: str | None = None):
    """DataFrames of at most `batch_size` rides with `duration`, 1-60 min, the five needed columns
    only; each frame's index is the rides' row numbers in the file (rejects and errors name them).
    A file that is not a readable parquet with those columns raises InputUnreadable naming both."""
    where = f"{label}: {location}" if label else location
    try:
        with fsspec.open(location, "rb", **(storage_options(location, settings) or {})) as f:
            pf = pq.ParquetFile(f)
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
    """(rides the contract accepts, rejected rides with their `reason`): `features.ride_problems`,
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
        # One schema for every batch: an int column with a null comes back from arrow as
        # float in one batch and int in the next.
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        columns[name] = values.to_numpy(dtype=float, na_value=np.nan) if numeric else values.to_numpy()
    columns["reason"] = reasons.astype(str).to_numpy()
    return pd.DataFrame(columns, columns=list(REJECT_COLUMNS))


def read_month_and_rejects(location: str, settings: Settings, label=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole month at once (the notebook): (valid rides of 1-60 minutes, rejected rides)."""
    pairs = [split_rides(df) for df in iter_month(location, settings, label=label)]
    if not pairs:  # a file without rows
        return pd.DataFrame(columns=[*REQUIRED_COLUMNS, TARGET]), pd.DataFrame(columns=list(REJECT_COLUMNS))
    return tuple(pd.concat(frames) if len(frames) > 1 else frames[0] for frames in zip(*pairs))


def reason_counts(rejects: pd.DataFrame) -> dict[str, int]:
    """Rejected rides per reason, most frequent first."""
    return {str(k): int(v) for k, v in rejects["reason"].value_counts().items()}


def reasons_text(reasons: dict[str, int]) -> str:
    return ", ".join(f"{n:,} with {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))


def check_rejects(paths: BatchPaths, location: str, scored: int, reasons: dict[str, int]) -> None:
    """Fail the month (TooManyRejects) when more than REJECT_LIMIT of its rides of 1-60
    minutes break the contract, or when there is nothing to score."""
    rejected = sum(reasons.values())
    if (total := scored + rejected) == 0:
        raise ValueError(f"{paths.label}: {location} has no rides of 1 to 60 minutes; nothing was published")
    if rejected / total > REJECT_LIMIT:
        raise TooManyRejects(
            f"{paths.label}: {rejected:,} of {total:,} rides of 1-60 minutes in {location} ({rejected / total:.1%}) "
            f"break the ride contract, above the {REJECT_LIMIT:.0%} limit ({reasons_text(reasons)}); "
            "nothing was published"
        )
