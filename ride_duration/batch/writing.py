"""Writing a month atomically: rows go to local files first; the month is published at its final keys once every ride is
scored and the month passed its checks. S3 gets each file in one PutObject (up to 5 GB), whole or not at all, nothing
pending when S3 or this process dies mid-upload (a multipart upload would leave its parts); a local file is moved
with `os.replace`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from botocore.exceptions import BotoCoreError, ClientError

from ..aws import split_s3_uri
from ..config import Settings
from .paths import rejects_location
from .predicting import build_results
from .reading import s3


class StorageFailed(RuntimeError):
    """The month's outputs could not be written: one sentence naming the month and the endpoint."""


class Stage:
    """Rows appended to a local parquet file, published later (`publish_month`)."""

    def __init__(self, path: Path):
        self.path, self.rows, self._writer = path, 0, None

    def write(self, frame: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        self._writer = self._writer or pq.ParquetWriter(self.path, table.schema)
        self._writer.write_table(table)
        self.rows += len(frame)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@contextlib.contextmanager
def staged(output_file: str):
    """A `Stage` in the output's own folder (local: `os.replace` stays atomic) or the temp dir (S3);
    its file is removed at the end, published or not."""
    folder = None if "://" in output_file else Path(output_file).parent
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".batch-", suffix=".parquet.part")
    os.close(fd)
    stage = Stage(Path(name))
    try:
        yield stage
    finally:
        stage.close()
        stage.path.unlink(missing_ok=True)


def _put(stage: Stage, location: str, settings: Settings) -> None:
    stage.close()
    if location.startswith("s3://"):
        bucket, key = split_s3_uri(location)
        with open(stage.path, "rb") as body:
            s3(settings).put_object(Bucket=bucket, Key=key, Body=body)
    elif "://" in location:
        raise ValueError(f"unsupported output location {location!r}: use s3:// or a local path")
    else:
        os.replace(stage.path, location)


def remove_output(location: str, settings: Settings) -> None:
    """Delete an output object or file if it exists."""
    if location.startswith("s3://"):
        bucket, key = split_s3_uri(location)
        s3(settings).delete_object(Bucket=bucket, Key=key)  # idempotent
    else:
        Path(location).unlink(missing_ok=True)


def publish_month(label: str, results: Stage, rejects: Stage, output_file: str, settings: Settings) -> str | None:
    """The predictions at `output_file`, then the rejects beside them (or an older rejects file
    removed): a month's rejects are never seen without its predictions. Returns the rejects' place."""
    rejects_file = rejects_location(output_file)
    try:
        _put(results, output_file, settings)
        try:
            _put(rejects, rejects_file, settings) if rejects.rows else remove_output(rejects_file, settings)
        except (BotoCoreError, ClientError):
            with contextlib.suppress(BotoCoreError, ClientError):  # S3 may be down for this too
                remove_output(output_file, settings)
            raise
    except (BotoCoreError, ClientError) as exc:
        where, why = f"{output_file} to S3 at {s3(settings).meta.endpoint_url}", f"{type(exc).__name__}: {exc}"
        raise StorageFailed(f"{label}: writing {where} failed ({why}); the month was not published") from None
    return rejects_file if rejects.rows else None


def _write(frame: pd.DataFrame, location: str, settings: Settings) -> None:
    with staged(location) as stage:
        stage.write(frame)
        _put(stage, location, settings)


def save_results(df: pd.DataFrame, predictions, run_id: str, output_file: str, settings: Settings) -> pd.DataFrame:
    """Write a month's results to `output_file` atomically (the notebook's step); returns the frame."""
    _write(result := build_results(df, predictions, run_id), output_file, settings)
    return result


def save_rejects(rejects: pd.DataFrame, output_file: str, settings: Settings) -> str | None:
    """Publish the rejected rides beside `output_file` (after its predictions), or remove an
    earlier rejects file when there are none; returns its location or None."""
    location = rejects_location(output_file)
    _write(rejects, location, settings) if len(rejects) else remove_output(location, settings)
    return location if len(rejects) else None
