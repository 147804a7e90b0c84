"""The forest's serving form: sklearn's numbers, stored without pickle, loaded without sklearn."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.ensemble import RandomForestRegressor
from sklearn.feature_extraction import DictVectorizer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.tree import DecisionTreeRegressor

from ride_duration.config import get_settings
from ride_duration.fastmodel import (
    FORMAT_VERSION,
    FastForest,
    InvalidServingForm,
    ServingFormMismatch,
    UnsupportedModel,
    fast_model,
)
from ride_duration.features import TARGET, prepare_features
from ride_duration.tlc import load_training_dataframe

RIDE = {"PU_DO": "130_205", "trip_distance": 3.66}


def _fit(month, regressor):
    frame = load_training_dataframe(month, get_settings())
    return make_pipeline(DictVectorizer(), regressor).fit(prepare_features(frame), frame[TARGET].to_numpy())


@pytest.fixture(scope="module")
def small(synthetic_months):
    """A forest shaped like the course's (fewer, shallower trees), fitted in-process, and February's features."""
    pipeline = _fit(synthetic_months[(2021, 1)], RandomForestRegressor(n_estimators=20, max_depth=12, random_state=0))
    return pipeline, prepare_features(load_training_dataframe(synthetic_months[(2021, 2)], get_settings()))


@pytest.fixture
def saved(small, tmp_path):
    """The small forest's serving form on disk: (folder, forest.json contents, forest.npz bytes)."""
    FastForest.from_pipeline(small[0]).save(tmp_path)
    return tmp_path, json.loads((tmp_path / "forest.json").read_text()), (tmp_path / "forest.npz").read_bytes()


def _rewrite(folder, meta, arrays_bytes):
    """A form whose json vouches for `arrays_bytes` (so only the content check can refuse it)."""
    meta = {**meta, "arrays_sha256": hashlib.sha256(arrays_bytes).hexdigest(), "arrays_bytes": len(arrays_bytes)}
    (folder / "forest.npz").write_bytes(arrays_bytes)
    (folder / "forest.json").write_text(json.dumps(meta))


def _npz(path, **arrays) -> bytes:
    np.savez(path, **arrays)
    return path.read_bytes()


def test_saved_form_equals_the_pipeline_on_all_of_february_2021(real_pipeline, tmp_path):
    """The real model, every ride of the real February, through save and load."""
    pipeline = real_pipeline["pipeline"]
    features = prepare_features(load_training_dataframe(real_pipeline["feb"], get_settings()))
    assert len(features) > 60_000
    built = FastForest.from_pipeline(pipeline)
    meta_path, arrays_path = built.save(tmp_path)
    loaded = FastForest.load(tmp_path)

    expected = pipeline.predict(features)
    got = loaded.predict(features)  # a loaded form has no pipeline: it walks all 62k rides
    assert loaded.pipeline is None
    assert np.abs(got - expected).max() <= 1e-9
    # In fact the same float32 decisions and the same float64 sum, tree after tree.
    assert np.array_equal(got, expected)
    assert loaded.check_against(pipeline, features) == 0.0

    # Narrowest exact dtypes: the real trees have < 32k nodes each and 13k feature columns.
    with np.load(arrays_path, allow_pickle=False) as npz:
        dtypes = {name: npz[name].dtype for name in ("left", "right", "feature", "threshold", "value")}
    assert dtypes == {"left": "int16", "right": "int16", "feature": "int16", "threshold": "float32", "value": "float64"}
    meta = json.loads(meta_path.read_text())
    assert (meta["n_trees"], meta["depth"], meta["n_features"]) == (100, 20, len(pipeline[0].feature_names_))
    assert arrays_path.stat().st_size < 6_000_000  # the skops model is ~35 MB


def test_equal_on_synthetic_and_edge_rides(small, tmp_path):
    pipeline, features = small
    FastForest.from_pipeline(pipeline).save(tmp_path)
    fast = FastForest.load(tmp_path)
    edge = [
        RIDE,
        {"PU_DO": "999_999", "trip_distance": 2.0},  # unknown pair: all one-hot columns 0
        {"PU_DO": "1_1", "trip_distance": 0.0},
        {"PU_DO": "74_75", "trip_distance": 499.99},
        {"trip_distance": 1.0},  # absent key: like DictVectorizer
        {"PU_DO": "130_205", "trip_distance": 3.66, "unknown": 7.0},  # unknown name: dropped
    ]
    # The thresholds themselves and their float32 and float64 neighbours: where the
    # float32 threshold of the stored form must decide as sklearn's float64 one.
    distance = pipeline[0].vocabulary_["trip_distance"]
    thresholds = {
        t
        for tree in pipeline[-1].estimators_
        for t, f in zip(tree.tree_.threshold, tree.tree_.feature)
        if f == distance
    }
    assert len(thresholds) > 200
    for t in sorted(thresholds):
        t32 = np.float32(t)
        for x in (t, t32, np.nextafter(t32, np.float32(np.inf)), np.nextafter(t32, np.float32(-np.inf))):
            edge.append({"PU_DO": "130_205", "trip_distance": float(x)})
    for batch in (features, edge, edge[:1]):
        assert np.array_equal(fast.walk(batch), pipeline.predict(batch))
    assert fast.walk([]).shape == (0,)


def test_a_compressed_form_loads_the_same(small, tmp_path):
    pipeline, features = small
    plain, packed = (
        FastForest.from_pipeline(pipeline).save(tmp_path / name, compress=name == "packed")
        for name in ("plain", "packed")
    )
    assert packed[1].stat().st_size < plain[1].stat().st_size / 2
    assert np.array_equal(FastForest.load(tmp_path / "packed").walk(features), pipeline.predict(features))


def test_a_single_tree_pipeline_round_trips(synthetic_months, tmp_path):
    pipeline = _fit(synthetic_months[(2021, 1)], DecisionTreeRegressor(max_depth=8, random_state=0))
    FastForest.from_pipeline(pipeline).save(tmp_path)
    fast = FastForest.load(tmp_path)
    assert fast.n_trees == 1
    assert fast.predict(RIDE)[0] == pipeline.predict([RIDE])[0]


def test_a_new_interpreter_loads_the_form_without_sklearn_skops_or_mlflow(saved, small):
    folder = saved[0]
    code = (
        "import json, sys\n"
        "from ride_duration.fastmodel import FastForest\n"
        f"minutes = FastForest.load({str(folder)!r}).predict({RIDE!r})\n"
        "print(json.dumps({'minutes': minutes.tolist(), 'modules': sorted(sys.modules)}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    heavy = {m.split(".")[0] for m in out["modules"]} & {"sklearn", "skops", "mlflow", "scipy", "pandas"}
    assert heavy == set()
    assert out["minutes"] == small[0].predict([RIDE]).tolist()


def test_a_truncated_or_altered_npz_is_refused(saved):
    folder, meta, arrays = saved
    (folder / "forest.npz").write_bytes(arrays[: len(arrays) // 2])
    with pytest.raises(
        InvalidServingForm, match=r"forest\.npz \(\d+ bytes\) does not match the sha256 in forest\.json"
    ):
        FastForest.load(folder)
    altered = bytearray(arrays)
    altered[-100] ^= 1
    (folder / "forest.npz").write_bytes(bytes(altered))
    with pytest.raises(InvalidServingForm, match="truncated or altered, refused$"):
        FastForest.load(folder)
    (folder / "forest.npz").unlink()
    with pytest.raises(InvalidServingForm, match="forest.npz is missing"):
        FastForest.load(folder)


def test_a_future_format_version_is_refused(saved):
    folder, meta, arrays = saved
    assert meta["format_version"] == FORMAT_VERSION
    (folder / "forest.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(InvalidServingForm) as refused:
        FastForest.load(folder)
    assert str(refused.value) == (
        f"{folder}: forest.json is format version {FORMAT_VERSION + 1} and this code reads only version"
        f" {FORMAT_VERSION}; load the MLflow model instead or upgrade ride_duration"
    )


def test_object_arrays_are_refused_without_unpickling(saved, tmp_path):
    folder, meta, _ = saved
    with np.load(folder / "forest.npz") as npz:
        arrays = dict(npz)
    # A pickled object array, vouched for by the json: np.load(allow_pickle=False) must refuse it.
    bad = _npz(tmp_path / "bad.npz", **{**arrays, "value": np.array([object()] * len(arrays["value"]), dtype=object)})
    _rewrite(folder, meta, bad)
    with pytest.raises(InvalidServingForm, match="holds something other than numeric arrays .*allow_pickle=False"):
        FastForest.load(folder)


def test_arrays_that_do_not_form_a_forest_are_refused(saved, tmp_path):
    folder, meta, _ = saved
    with np.load(folder / "forest.npz") as npz:
        arrays = dict(npz)
    inner = np.flatnonzero(arrays["left"] >= 0)[0]
    out_of_place = "a child, feature or name out of place"
    cases = [
        (out_of_place, {"right": _set(arrays["right"], inner, arrays["node_count"][0])}),  # beyond its tree
        (out_of_place, {"left": _set(arrays["left"], inner, inner)}),  # a cycle
        (out_of_place, {"feature": _set(arrays["feature"], inner, len(meta["feature_names"]))}),
        ("has 'value' as int64 of shape .*, expected 1-d float64", {"value": arrays["value"].astype(np.int64)}),
        ("expected 1-d float32", {"threshold": arrays["threshold"].astype(np.float64)}),  # would round
        ("entries .its node count. in every per-node array", {"threshold": arrays["threshold"][:-1]}),
    ]
    for problem, change in cases:
        _rewrite(folder, meta, _npz(tmp_path / "changed.npz", **{**arrays, **change}))
        with pytest.raises(InvalidServingForm, match=problem):
            FastForest.load(folder)
    _rewrite(folder, {**meta, "n_trees": meta["n_trees"] + 1}, _npz(tmp_path / "same.npz", **arrays))
    with pytest.raises(InvalidServingForm, match="does not hold the forest forest.json describes"):
        FastForest.load(folder)


def _set(array, index, value):
    changed = array.copy()
    changed[index] = value
    return changed


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # sklearn's own float32 cast
def test_nan_and_infinity_are_refused_like_sklearn(small):
    pipeline, _ = small
    fast = FastForest.from_pipeline(pipeline)
    for distance in (float("nan"), float("inf"), 1e39, None):  # 1e39 overflows float32; None is NaN
        ride = {"PU_DO": "130_205", "trip_distance": distance}
        with pytest.raises(ValueError, match="NaN or infinity"):
            fast.walk([ride])
        with pytest.raises(ValueError, match="NaN|infinity"):
            pipeline.predict([ride])
    with pytest.raises(TypeError, match="feature 'PU_DO' is a list; the forest takes strings and numbers"):
        fast.walk([{"PU_DO": ["130_205"], "trip_distance": 1.0}])


def test_only_a_form_built_from_a_pipeline_hands_big_batches_to_it(small, synthetic_months, tmp_path):
    pipeline, features = small
    other = _fit(synthetic_months[(2021, 2)], RandomForestRegressor(n_estimators=5, max_depth=6, random_state=1))
    fast = FastForest.from_pipeline(pipeline, max_walk_rows=4)
    fast.pipeline = other  # whichever answers shows which path a batch took
    assert np.array_equal(fast.predict(features[:4]), pipeline.predict(features[:4]))
    assert np.array_equal(fast.predict(features[:5]), other.predict(features[:5]))
    FastForest.from_pipeline(pipeline).save(tmp_path)
    loaded = FastForest.load(tmp_path)
    assert np.array_equal(loaded.predict(features), pipeline.predict(features))
    assert np.array_equal(loaded.predict(RIDE), pipeline.predict([RIDE]))


def test_check_against_refuses_a_form_of_another_model(small, synthetic_months):
    pipeline, features = small
    other = _fit(synthetic_months[(2021, 2)], RandomForestRegressor(n_estimators=5, max_depth=6, random_state=1))
    fast = FastForest.from_pipeline(pipeline)
    assert fast.check_against(pipeline, features) == 0.0
    with pytest.raises(
        ServingFormMismatch, match=rf"differs from the pipeline by up to .* on \d+ of {len(features)} rides"
    ):
        fast.check_against(other, features)


def test_other_models_fall_back_to_themselves(small):
    linear = make_pipeline(DictVectorizer(), LinearRegression()).fit([{"a": 1.0}, {"a": 2.0}], [1.0, 2.0])
    with pytest.raises(UnsupportedModel, match="random forest or tree regressor"):
        FastForest.from_pipeline(linear)
    assert fast_model(linear) is linear
    assert type(fast_model(small[0])) is FastForest
