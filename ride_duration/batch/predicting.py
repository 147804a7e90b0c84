"""Predicting a month's valid rides, and the course's output columns. Two helpers stand in for
the library calls they imitate: `make bench-batch` measures each call as a loss above 10% of a month."""

from __future__ import annotations

import os

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa

from ..features import FEATURE_FIELDS, TARGET, InvalidRide, check_ride, pu_do_column, ride_problems
from ..predict import make_prediction

# Imported inside functions, to keep them lazy: scipy and sklearn (only for the pipeline's
# design matrix; reading and writing a month need neither).

# The 2022 course's output columns, and trip_distance.
RESULT_COLUMNS = ("ride_id", "lpep_pickup_datetime", *FEATURE_FIELDS, "actual_duration", "predicted_duration")
RESULT_COLUMNS += ("diff", "model_version")


def design_matrix(model, df: pd.DataFrame):
    """What the pipeline's DictVectorizer makes of `prepare_features(df)`, with column operations.
    Kept: `DictVectorizer.transform` on one dict per ride costs over 10% of a month (make bench-batch).
    None when this path does not apply (another model layout, non-numeric or missing values):
    callers then use `make_prediction`. test_scoring.py checks it equals `DictVectorizer.transform`."""
    from scipy import sparse
    from sklearn.feature_extraction import DictVectorizer

    steps = getattr(model, "steps", None)
    if not steps or len(steps) != 2 or not isinstance(steps[0][1], DictVectorizer):
        return None
    frame = df[list(FEATURE_FIELDS)]
    for column in frame.columns:
        values = frame[column]
        if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values) or values.isna().any():
            return None
        if column != "trip_distance" and pd.api.types.is_float_dtype(values) and (values % 1 != 0).any():
            return None
    vectorizer = steps[0][1]
    vocabulary, n = vectorizer.vocabulary_, len(frame)
    pu_do = f"PU_DO{vectorizer.separator}" + pu_do_column(frame)
    one_hot = pu_do.map(vocabulary).to_numpy(dtype=float)  # NaN: a zone pair unseen in training, dropped
    known = ~np.isnan(one_hot)
    rows, cols, data = [np.flatnonzero(known)], [one_hot[known].astype(np.int64)], [np.ones(int(known.sum()))]
    if "trip_distance" in vocabulary:
        rows.append(np.arange(n))
        cols.append(np.full(n, vocabulary["trip_distance"]))
        data.append(frame["trip_distance"].to_numpy(dtype=float))
    shape = (n, len(vectorizer.feature_names_))
    return sparse.coo_matrix((np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))), shape=shape).tocsr()


def predict_valid(model, df: pd.DataFrame, n_jobs: int | None = -1) -> np.ndarray:
    """Minutes for rides that passed the contract; the forest in `n_jobs` threads (joblib's setting: the model is shared)."""
    with joblib.parallel_config(n_jobs=n_jobs):
        X = design_matrix(model, df)
        if X is None:
            return make_prediction(model, df)
        return np.asarray(model.steps[-1][1].predict(X), dtype=float)


def predict_durations(model, df: pd.DataFrame, n_jobs: int | None = -1) -> np.ndarray:
    """Predicted minutes for rides that all satisfy the ride contract, else InvalidRide naming
    the first bad ride (its row) and field: `reading.split_rides` first to score the rest."""
    problems = ride_problems(df)
    if problems.notna().any():
        position = int(np.flatnonzero(problems.notna().to_numpy())[0])
        # Python scalars, so the message shows `1e+39`, not `np.float64(1e+39)`.
        values = {c: df[c].iloc[position] for c in FEATURE_FIELDS}
        check_ride({c: v.item() if isinstance(v, np.generic) else v for c, v in values.items()}, df.index[position])
        raise InvalidRide(f"ride {df.index[position]}: {problems.iloc[position]}")
    return predict_valid(model, df, n_jobs)


def generate_uuids(n: int) -> pa.Array:
    """n random UUID4 strings, vectorised. Kept: `str(uuid.uuid4())` per ride costs over 10% of a month."""
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
    ids = pd.arrays.ArrowStringArray(generate_uuids(len(df)))
    # int64 zone ids always: a batch whose column had a null (rejected) comes back as float.
    zones = [df[c].to_numpy(dtype="int64") for c in ("PULocationID", "DOLocationID")]
    columns = [ids, df["lpep_pickup_datetime"].to_numpy(), *zones, df["trip_distance"].to_numpy(dtype=float)]
    columns += [actual, predictions, actual - predictions, model_version]
    return pd.DataFrame(dict(zip(RESULT_COLUMNS, columns)))
