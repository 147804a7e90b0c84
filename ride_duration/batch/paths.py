"""Which month a run scores and where it reads and writes. A run on `run_date` scores the month before
(2021-03-02 scores 2021-02); outputs are hive-style partitions, one object per (month, model), so scoring a
month again replaces it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

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
    return (run_date.year - 1, 12) if run_date.month == 1 else (run_date.year, run_date.month - 1)


def input_location(taxi_type: str, year: int, month: int, settings: Settings) -> str:
    """`BATCH_INPUT_PREFIX/<file>`, else the official TLC URL (read through the data cache, `reading.open_input`)."""
    name, prefix = filename(taxi_type, year, month), settings.batch_input_prefix
    if prefix:
        return f"{prefix.rstrip('/')}/{name}" if "://" in prefix else str(Path(prefix) / name)
    return official_url(taxi_type, year, month)


def output_location(taxi_type: str, year: int, month: int, run_id: str, settings: Settings) -> str:
    """Hive-style partitions, one object per (month, model): scoring it again replaces it."""
    bucket = settings.predictions_bucket
    return f"s3://{bucket}/taxi_type={taxi_type}/year={year:04d}/month={month:02d}/{run_id}.parquet"


def rejects_location(output_file: str) -> str:
    """Where the rides a month could not score go: beside the output, `_<name>.rejects.parquet`.
    The leading underscore keeps the file out of the predictions dataset: pyarrow/pandas, Spark,
    Hive and Athena skip `_` files when they read a folder."""
    folder, _, name = output_file.rpartition("/")
    stem = name.removesuffix(".parquet")
    return f"{folder}/_{stem}.rejects.parquet" if folder else f"_{stem}.rejects.parquet"


def get_paths(run_date, taxi_type: str, run_id: str, settings: Settings) -> BatchPaths:
    """Input and output of the run on `run_date`: it scores the month before."""
    return month_paths(taxi_type, *previous_month(run_date), run_id, settings=settings)


def month_paths(
    taxi_type: str, year: int, month: int, run_id: str, *, settings: Settings, input_file=None, output_file=None
) -> BatchPaths:
    """Paths to score (year, month) itself, with optional overrides (papermill parameters)."""
    year, month = int(year), int(month)
    input_file = input_file or input_location(taxi_type, year, month, settings)
    output_file = output_file or output_location(taxi_type, year, month, run_id, settings)
    return BatchPaths(taxi_type, year, month, input_file, output_file)


def months_between(start, end) -> list[tuple[int, int]]:
    """Inclusive list of (year, month) from `start` to `end` ('2021-01', dates or datetimes)."""

    def ym(value):
        if isinstance(value, str):
            value = datetime.fromisoformat(value if len(value) > 7 else f"{value}-01")
        return value.year * 12 + value.month - 1

    first, last = ym(start), ym(end)
    if last < first:
        raise ValueError(f"end {end} is before start {start}")
    return [(i // 12, i % 12 + 1) for i in range(first, last + 1)]


def run_date_for(year: int, month: int) -> datetime:
    """When the monthly schedule (03:00 on day 2) scores (year, month): the next month."""
    return datetime(year + month // 12, month % 12 + 1, 2, 3, 0)
