"""Data preparation shared by training and every deployment."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from numbers import Real

import numpy as np
import pandas as pd

from .aws import storage_options

FEATURE_FIELDS = ("PULocationID", "DOLocationID", "trip_distance")
DATETIME_COLUMNS = ("lpep_pickup_datetime", "lpep_dropoff_datetime")
REQUIRED_COLUMNS = (*DATETIME_COLUMNS, *FEATURE_FIELDS)
TARGET = "duration"


def read_parquet(path, columns=None) -> pd.DataFrame:
    """Read parquet from a local path, an http(s):// URL or an s3:// URL."""
    path = str(path)
    return pd.read_parquet(path, columns=columns, storage_options=storage_options(path))


def check_columns(df: pd.DataFrame, required=REQUIRED_COLUMNS, source: str = "input") -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{source} is missing required column(s): {', '.join(missing)}")


def add_duration(df: pd.DataFrame, y_min: float = 1, y_max: float = 60) -> pd.DataFrame:
    """Add `duration` (minutes, dropoff - pickup) and keep y_min <= duration <= y_max."""
    check_columns(df, DATETIME_COLUMNS)
    delta = df["lpep_dropoff_datetime"] - df["lpep_pickup_datetime"]
    df = df.assign(**{TARGET: delta.dt.total_seconds() / 60})
    return df[(df[TARGET] >= y_min) & (df[TARGET] <= y_max)].reset_index(drop=True)


def load_training_dataframe(path, y_min: float = 1, y_max: float = 60, columns=None) -> pd.DataFrame:
    """A green-taxi month with the target `duration` in minutes, filtered to [y_min, y_max]."""
    df = read_parquet(path, columns=columns)
    check_columns(df, source=str(path))
    return add_duration(df, y_min=y_min, y_max=y_max)


def _bad(index, field: str, problem: str) -> ValueError:
    return ValueError(f"ride {index}: field {field!r} {problem}")


def _check_ride(index, ride: Mapping) -> tuple[int, int, float]:
    if not isinstance(ride, Mapping):
        raise ValueError(f"ride {index}: expected an object with {', '.join(FEATURE_FIELDS)}, got {type(ride).__name__}")
    values = []
    for field in FEATURE_FIELDS:
        if field not in ride or ride[field] is None:
            raise _bad(index, field, "is missing")
        value = ride[field]
        # bool is an int subclass; a ride with `true` as a distance is a client bug.
        if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
            raise _bad(index, field, f"must be a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise _bad(index, field, f"must be finite, got {value!r}")
        values.append(value)
    pu, do, dist = values
    for field, loc in (("PULocationID", pu), ("DOLocationID", do)):
        if float(loc) != int(loc):
            raise _bad(index, field, f"must be an integer, got {loc!r}")
    return int(pu), int(do), float(dist)


def pu_do_column(frame: pd.DataFrame) -> pd.Series:
    """The `PU_DO` feature ("<PU>_<DO>") for a whole frame of valid rides, vectorised:
    string concatenation on whole columns, no per-row Python."""
    return frame["PULocationID"].astype("int64").astype(str) + "_" + frame["DOLocationID"].astype("int64").astype(str)


def prepare_features(rides) -> list[dict]:
    """Rides (a list of dicts or a DataFrame) -> the pipeline's feature dicts.

    `{"PU_DO": "<PU>_<DO>", "trip_distance": float}` per ride. Bad rides raise a
    ValueError naming the ride and the field, never a KeyError from pandas.
    """
    if isinstance(rides, pd.DataFrame):
        check_columns(rides, FEATURE_FIELDS, source="rides")
        frame = rides.loc[:, list(FEATURE_FIELDS)]
        distance = pd.to_numeric(frame["trip_distance"], errors="coerce")
        bad = distance.isna() & frame["trip_distance"].notna()
        if bad.any():
            i = bad.idxmax()
            raise _bad(i, "trip_distance", f"must be a number, got {frame.at[i, 'trip_distance']!r}")
        for field in ("PULocationID", "DOLocationID"):
            if frame[field].isna().any():
                raise _bad(frame[field].isna().idxmax(), field, "is missing")
        pu_do = pu_do_column(frame)
        return [{"PU_DO": p, "trip_distance": float(d)} for p, d in zip(pu_do.tolist(), distance.tolist())]
    if isinstance(rides, Mapping):
        rides = [rides]
    if not isinstance(rides, Iterable) or isinstance(rides, (str, bytes)):
        raise ValueError(f"rides must be a list of ride objects or a DataFrame, got {type(rides).__name__}")
    features = []
    for i, ride in enumerate(rides):
        pu, do, dist = _check_ride(i, ride)
        features.append({"PU_DO": f"{pu}_{do}", "trip_distance": dist})
    return features
