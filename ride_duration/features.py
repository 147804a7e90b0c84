"""The ride contract: what a valid ride is, and the model's features and target.

One definition used by training, the web service, the stream function and batch
scoring. Each deployment applies `check_ride` / `ride_problems` with its own
documented policy for what it rejects (README, "What each deployment rejects").
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

# Imported inside functions, to keep them lazy: pandas (~0.3 s; the stream function never needs it).

FEATURE_FIELDS = ("PULocationID", "DOLocationID", "trip_distance")
DATETIME_COLUMNS = ("lpep_pickup_datetime", "lpep_dropoff_datetime")
REQUIRED_COLUMNS = (*DATETIME_COLUMNS, *FEATURE_FIELDS)
TARGET = "duration"


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


# ---------------------------------------------------------------- the ride contract
# One definition of a ride every deployment accepts (web, stream, batch):
# the three fields present and numeric (booleans are not numbers), zone ids
# integral TLC zones, the distance finite and within MAX_TRIP_DISTANCE.
# TLC zone ids: 1..263 are zones, 264/265 are "unknown"/"outside NYC" (taxi_zone_lookup.csv).
LOCATION_MIN, LOCATION_MAX = 1, 265
# Longer than any trip inside the TLC area; bigger values are meter glitches
# (23-75 rides a month in the real files). It also keeps values far below
# float32's 3.4e38, where the forest's input check would raise.
MAX_TRIP_DISTANCE = 500.0
_SHOWN_CHARS = 40
# The course's example ride (its predict-test.py): 18.24 minutes with the course's model.
EXAMPLE_RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}


class InvalidRide(ValueError):
    """A ride outside the contract; the message names the ride and the field."""


def show_value(value) -> str:
    """A value as the client gave it, short: `500.0000001`, not `500`; never a
    5,000-digit int in full (its str() even raises past Python's digit limit)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, np.generic):
        value = value.item()  # `np.float64(3.5)` -> `3.5`: as the client wrote it
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _bad(index, field: str, problem: str) -> InvalidRide:
    return InvalidRide(f"ride {index}: field {field!r} {problem}")


def check_ride(ride: Mapping, index=0) -> tuple[int, int, float]:
    """One ride (a mapping) -> (PULocationID, DOLocationID, trip_distance), or InvalidRide."""
    if not isinstance(ride, Mapping):
        raise InvalidRide(
            f"ride {index}: expected an object with {', '.join(FEATURE_FIELDS)}, got {type(ride).__name__}"
        )
    values = []
    for field in FEATURE_FIELDS:
        if field not in ride or ride[field] is None:
            raise _bad(index, field, "is missing")
        value = ride[field]
        # bool is an int subclass; a ride with `true` as a distance is a client bug.
        if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
            raise _bad(index, field, f"must be a number, got {show_value(value)}")
        if not isinstance(value, (int, np.integer)) and not math.isfinite(float(value)):
            raise _bad(index, field, f"must be finite, got {show_value(value)}")
        values.append(value)
    pu, do, dist = values
    for field, loc in (("PULocationID", pu), ("DOLocationID", do)):
        if not isinstance(loc, (int, np.integer)) and float(loc) != int(loc):
            raise _bad(index, field, f"must be an integer, got {show_value(loc)}")
        if not LOCATION_MIN <= loc <= LOCATION_MAX:
            raise _bad(
                index, field, f"must be a TLC zone id between {LOCATION_MIN} and {LOCATION_MAX}, got {show_value(loc)}"
            )
    if not 0 <= dist <= MAX_TRIP_DISTANCE:
        raise _bad(index, "trip_distance", f"must be between 0 and {MAX_TRIP_DISTANCE:g} miles, got {show_value(dist)}")
    return int(pu), int(do), float(dist)


def ride_problems(frame: pd.DataFrame) -> pd.Series:
    """The contract on a whole frame, vectorised: per row the first problem as a
    sentence (same wording as `check_ride`), or NA for a valid ride."""
    import pandas as pd  # lazy: the stream function checks single rides and never loads pandas (~0.3 s)

    check_columns(frame, FEATURE_FIELDS, source="rides")
    problems = pd.Series(None, index=frame.index, dtype=object)

    def flag(mask, field: str, problem: str) -> None:
        mask = np.asarray(mask, dtype=bool) & problems.isna().to_numpy()
        problems[mask] = f"field {field!r} {problem}"

    for field in FEATURE_FIELDS:
        column = frame[field]
        flag(column.isna(), field, "is missing")
        if pd.api.types.is_bool_dtype(column):
            flag(np.ones(len(frame), dtype=bool), field, "must be a number")
            numeric = pd.Series(np.nan, index=frame.index)
        elif not pd.api.types.is_numeric_dtype(column):
            # An object column: only real numbers count, as in `check_ride` ("7" and True do not).
            is_number = column.map(lambda v: isinstance(v, (Real, np.number)) and not isinstance(v, (bool, np.bool_)))
            flag(~is_number.to_numpy(dtype=bool), field, "must be a number")
            numeric = pd.to_numeric(column.where(is_number), errors="coerce")
        else:
            numeric = column
        values = numeric.to_numpy(dtype=float, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            flag(np.isinf(values), field, "must be finite")
            if field == "trip_distance":
                flag(
                    (values < 0) | (values > MAX_TRIP_DISTANCE),
                    field,
                    f"must be between 0 and {MAX_TRIP_DISTANCE:g} miles",
                )
            else:
                flag(values % 1 != 0, field, "must be an integer")
                flag(
                    (values < LOCATION_MIN) | (values > LOCATION_MAX),
                    field,
                    f"must be a TLC zone id between {LOCATION_MIN} and {LOCATION_MAX}",
                )
    return problems


def pu_do_column(frame: pd.DataFrame) -> pd.Series:
    """The `PU_DO` feature ("<PU>_<DO>") for a whole frame of valid rides, vectorised:
    string concatenation on whole columns, no per-row Python."""
    return frame["PULocationID"].astype("int64").astype(str) + "_" + frame["DOLocationID"].astype("int64").astype(str)


def prepare_features(rides) -> list[dict]:
    """Rides (a list of dicts or a DataFrame) -> the pipeline's feature dicts.

    `{"PU_DO": "<PU>_<DO>", "trip_distance": float}` per ride. A list of rides is
    held to the whole contract (`check_ride`); a DataFrame, the training data, only
    to types: training keeps the course's recipe (every ride of 1-60 minutes), and
    batch filters a month with `ride_problems` first. Bad rides raise an
    InvalidRide naming the ride and the field, never a KeyError from pandas.
    """
    pd = sys.modules.get("pandas")  # not imported yet: `rides` cannot be a DataFrame (see ride_problems)
    if pd is not None and isinstance(rides, pd.DataFrame):
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
        pu, do, dist = check_ride(ride, i)
        features.append({"PU_DO": f"{pu}_{do}", "trip_distance": dist})
    return features
