"""The numpy forest walk gives sklearn's numbers (the service's fast runtime)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline

from ride_duration.fastmodel import FastForest, UnsupportedModel, fast_model
from ride_duration.features import prepare_features
from ride_duration.tlc import load_training_dataframe


def test_equal_to_sklearn_on_all_of_february_2021(real_pipeline):
    """Every ride of the real February (the validation month), real model: |diff| < 1e-4 min."""
    pipeline = real_pipeline["pipeline"]
    features = prepare_features(load_training_dataframe(real_pipeline["feb"]))
    assert len(features) > 60_000
    expected = pipeline.predict(features)
    got = FastForest(pipeline).walk(features)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(got - expected).max() < 1e-9  # in fact the same float64 arithmetic


def test_equal_on_synthetic_and_edge_rides(trained_model, synthetic_months):
    pipeline = trained_model["pipeline"]
    fast = FastForest(pipeline)
    features = prepare_features(load_training_dataframe(synthetic_months[(2021, 2)]))
    edge = [
        {"PU_DO": "130_205", "trip_distance": 3.66},
        {"PU_DO": "999_999", "trip_distance": 2.0},  # unknown pair: all one-hot columns 0
        {"PU_DO": "1_1", "trip_distance": 0.0},
        {"PU_DO": "74_75", "trip_distance": 499.99},
        {"trip_distance": 1.0},  # absent key: like DictVectorizer
    ]
    # thresholds themselves and float32 rounding neighbours of them
    distance_thresholds = {
        t
        for tree in pipeline[-1].estimators_[:5]
        for t, f in zip(tree.tree_.threshold, tree.tree_.feature)
        if f == pipeline[0].vocabulary_["trip_distance"]
    }
    for t in sorted(distance_thresholds)[:200]:
        for x in (t, np.nextafter(np.float32(t), np.float32(np.inf)), np.nextafter(t, -np.inf)):
            edge.append({"PU_DO": "130_205", "trip_distance": float(x)})
    for batch in (features, edge):
        assert np.abs(fast.walk(batch) - pipeline.predict(batch)).max() < 1e-9


def test_predict_uses_the_pipeline_for_big_batches(trained_model):
    fast = FastForest(trained_model["pipeline"], max_walk_rows=4)
    rides = [{"PU_DO": f"{i}_{i + 1}", "trip_distance": i / 3} for i in range(1, 12)]
    assert np.abs(fast.predict(rides) - fast.walk(rides)).max() < 1e-9
    assert np.abs(fast.predict(rides[:3]) - trained_model["pipeline"].predict(rides[:3])).max() < 1e-9
    assert fast.predict([]).shape == (0,)


def test_other_models_fall_back_to_themselves():
    linear = make_pipeline(DictVectorizer(), LinearRegression()).fit([{"a": 1.0}, {"a": 2.0}], [1.0, 2.0])
    with pytest.raises(UnsupportedModel, match="random forest or tree regressor"):
        FastForest(linear)
    assert fast_model(linear) is linear
