"""Predicting with the loaded model: the one call web, stream and batch make."""

from __future__ import annotations

import numpy as np

from .features import prepare_features


def make_prediction(model, rides) -> np.ndarray:
    """Rides (list of dicts, one dict, or a DataFrame) -> predicted minutes, one model call."""
    features = prepare_features(rides)
    if not features:
        return np.empty(0)
    return np.asarray(model.predict(features), dtype=float)
