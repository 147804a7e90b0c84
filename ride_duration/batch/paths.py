"""Where each month's rides are read from and its predictions written to.

A run on `run_date` scores the month before: 2021-03-02 scores 2021-02. Outputs are
hive-style partitions, one object per (month, model), so re-running replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import pandas as pd

from ..config import Settings
from ..tlc import filename, official_url


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


def input_location(taxi_type: str, year: int, month: int, settings: Settings) -> str:
    """`BATCH_INPUT_PREFIX/<file>` when configured, else the official TLC URL
    (read through the data cache and `TLC_MIRROR`, see `open_input`)."""
    name = filename(taxi_type, year, month)
    prefix = settings.batch_input_prefix
    if prefix:
        return f"{prefix.rstrip('/')}/{name}" if "://" in prefix else str(Path(prefix) / name)
    return official_url(taxi_type, year, month)


def output_location(taxi_type: str, year: int, month: int, run_id: str, settings: Settings) -> str:
    """Hive-style partitions, one object per (month, model): re-running replaces it."""
    return (
        f"s3://{settings.predictions_bucket}/taxi_type={taxi_type}/year={year:04d}/month={month:02d}/{run_id}.parquet"
    )


def rejects_location(output_file: str) -> str:
    """Where the rides a month could not score go: beside the output, `_<name>.rejects.parquet`
    (`.../month=02/_<run_id>.rejects.parquet`). The leading underscore keeps the file out of
    the predictions dataset: pyarrow/pandas, Spark, Hive and Athena skip `_` files when they
    read a folder, so `pd.read_parquet(".../taxi_type=green/")` sees predictions only."""
    folder, _, name = output_file.rpartition("/")
    stem = name.removesuffix(".parquet")
    return f"{folder}/_{stem}.rejects.parquet" if folder else f"_{stem}.rejects.parquet"


def get_paths(run_date, taxi_type: str, run_id: str, settings: Settings) -> BatchPaths:
    """Input and output of the run on `run_date`: it scores the month before."""
    year, month = previous_month(run_date)
    return month_paths(taxi_type, year, month, run_id, settings=settings)


def month_paths(
    taxi_type: str,
    year: int,
    month: int,
    run_id: str,
    *,
    settings: Settings,
    input_file: str | None = None,
    output_file: str | None = None,
) -> BatchPaths:
    """Paths to score (year, month) itself, with optional overrides (papermill parameters)."""
    return BatchPaths(
        taxi_type=taxi_type,
        year=int(year),
        month=int(month),
        input_file=input_file or input_location(taxi_type, int(year), int(month), settings),
        output_file=output_file or output_location(taxi_type, int(year), int(month), run_id, settings),
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
