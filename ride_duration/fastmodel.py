"""The trained forest as plain arrays: served with numpy alone, stored without pickle.

A fitted random forest is just arrays per tree (`children_left/right`,
`feature`, `threshold`, `value`). `FastForest` keeps those arrays and walks
every tree at once with numpy, one fancy-index step per tree level, for every
tree and every ride together: one ride in ~0.08 ms instead of scikit-learn's
~5 ms (input checks, a sparse matrix, 100 separate tree calls), 100 rides in
~1.6 ms instead of ~7 ms.

It is sklearn's arithmetic, bit for bit. sklearn casts X to float32 and sends a
ride left when `float32(x) <= threshold` (a float64); that is the same test as
`float32(x) <= t32`, t32 the largest float32 not above the threshold, so the
thresholds are stored as float32 without changing a single decision. Leaf
values stay float64 and are summed tree after tree, in sklearn's order, then
divided by the number of trees.

Serving form: `save(folder)` writes `forest.npz` (numeric arrays only, read
back with `allow_pickle=False`) and `forest.json` (the vocabulary, shapes, a
format version and the npz's sha256). `FastForest.load(folder)` needs numpy
and the standard library only, so a Lambda or web start does not import
scikit-learn, skops or MLflow, nor rebuild sklearn objects. The MLflow model
(the sklearn pipeline, skops format) stays the source of truth and the
fallback: training builds this form from it and `check_against` it.

Why code of our own: the kept tools for serving a forest were measured against it, on
the course's model (100 trees, depth 20, 13,221 one-hot columns) and one 2-core machine.
This walk answers one ride about 70 times faster than scikit-learn, bit for bit, and a
Lambda cold start with it takes 1.1 times its floor (`make bench-stream`, figures in
docs/benchmarks.md).
- ONNX Runtime (through skl2onnx): the double-precision forest skl2onnx writes does not
  load in ONNX Runtime 1.32, and the float32 one changes predictions (float32 leaf sums).
- treelite 4.8's GTIL (`treelite.sklearn.import_model`, `treelite.gtil.predict`), tried
  side by side: bit-equal to scikit-learn only when fed float32 rows (float64 rows are
  compared with float64 thresholds: up to 5 minutes off on 2,000 rides of February
  2021). It takes a dense matrix, so DictVectorizer's sparse row must be made dense
  first, and one ride took 4 to 7 times this walk's time for the predict call alone,
  about 30 times with that conversion; its wheel adds a native library to the images.
  Not kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from numbers import Number
from pathlib import Path

import numpy as np

# Imported inside functions, to keep them lazy: sklearn (only to build the form from a pipeline).

FORMAT = "ride_duration.fastmodel.FastForest"
FORMAT_VERSION = 1
ARRAYS_FILE = "forest.npz"
META_FILE = "forest.json"
FILES = (META_FILE, ARRAYS_FILE)

# The stored arrays: any signed integers (the narrowest that fit), floats exactly as the walk
# computes with them. All per node (concatenated over the trees) except node_count, per tree.
_INT_ARRAYS = ("node_count", "left", "right", "feature")
_FLOAT_ARRAYS = {"threshold": np.dtype(np.float32), "value": np.dtype(np.float64)}


class UnsupportedModel(TypeError):
    """The pipeline is not DictVectorizer -> forest/tree regressor."""


class InvalidServingForm(ValueError):
    """A saved form that is truncated, altered, malformed or of a newer format."""


class ServingFormMismatch(ValueError):
    """The serving form does not predict what the pipeline predicts."""


def _narrowest_int(largest: int) -> np.dtype:
    """The smallest signed integer dtype holding -1 .. largest (-1 marks a leaf)."""
    for dtype in (np.int8, np.int16, np.int32, np.int64):
        if largest <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise OverflowError(largest)


def _float32_floor(threshold: np.ndarray) -> np.ndarray:
    """For each float64 t, the largest float32 <= t: `float32(x) <= t` iff `float32(x) <= it`."""
    t32 = threshold.astype(np.float32)
    above = t32.astype(np.float64) > threshold
    t32[above] = np.nextafter(t32[above], np.float32(-np.inf))
    return t32


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FastForest:
    """`predict(feature_dicts)` equal to the fitted pipeline's `predict(feature_dicts)`.

    Built with `from_pipeline(pipeline)` (training, or a service that loaded
    the MLflow model) or `load(folder)` (the saved serving form). Walking is
    fastest up to a few hundred rides; sklearn's compiled per-tree loops win
    for bigger batches (62k rides: ~0.5-0.8 s against ~1.5 s walking), so a
    form built from a pipeline hands batches above `max_walk_rows` rides to it
    (same numbers either way). A loaded form has no pipeline and always walks.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        feature_names: Sequence[str],
        separator: str,
        depth: int,
        *,
        pipeline=None,
        max_walk_rows: int = 256,
        built_with: Mapping[str, str] | None = None,
    ):
        """From the stored arrays (tree-local node ids, -1 for a leaf's children); see `save`.

        Refuses (InvalidServingForm) arrays that do not form a forest, before anything indexes with them.
        """
        _check_shapes(arrays, depth)
        self.arrays = dict(arrays)
        self.feature_names = list(feature_names)
        self.vocabulary = {name: i for i, name in enumerate(self.feature_names)}
        self.n_features = len(self.feature_names)
        self.separator = separator
        self.depth = depth
        self.pipeline = pipeline
        self.max_walk_rows = max_walk_rows
        self.built_with = dict(built_with or {})
        node_count = arrays["node_count"].astype(np.intp)
        self.n_trees = len(node_count)
        self.n_nodes = int(node_count.sum())
        # All trees in flat arrays; tree t's node i is at roots[t] + i.
        self.roots = np.cumsum(node_count) - node_count
        base = np.repeat(self.roots, node_count)
        nodes = np.arange(self.n_nodes)
        left, right = arrays["left"], arrays["right"]
        is_leaf = left < 0
        same_leaves = np.array_equal(is_leaf, right < 0)
        # A leaf points at itself, so walking `depth` steps needs no branch.
        left = np.where(is_leaf, nodes, left + base)
        right = np.where(is_leaf, nodes, right + base)
        feature = np.where(is_leaf, 0, arrays["feature"]).astype(np.intp)
        end = base + np.repeat(node_count, node_count)
        # Children come after their parent in its own tree (as sklearn numbers nodes): no
        # index out of range and no cycle, so every walk ends in a leaf.
        if not (
            same_leaves
            and ((left > nodes) | is_leaf).all()
            and ((right > nodes) | is_leaf).all()
            and (left < end).all()
            and (right < end).all()
            and (feature >= 0).all()
            and (feature < self.n_features).all()
            and len(self.vocabulary) == self.n_features
        ):
            raise InvalidServingForm("the forest's arrays have a child, feature or name out of place")
        # Every node takes two slots, 2*id and 2*id + 1, so that one step is
        # `child2[node2 + (x > threshold)]`: slot 2*id holds the left child
        # (x <= threshold), 2*id + 1 the right one, both already doubled.
        self._child2 = 2 * np.stack([left, right], axis=1).ravel()
        self._feature2 = np.repeat(feature, 2)
        self._threshold2 = np.repeat(arrays["threshold"], 2)
        self._value = arrays["value"]
        self._roots2 = 2 * self.roots

    # --- building from the fitted pipeline (training, or a service holding it) ----------

    @classmethod
    def from_pipeline(cls, pipeline, max_walk_rows: int = 256) -> FastForest:
        """The forest of a fitted `DictVectorizer -> RandomForestRegressor/DecisionTreeRegressor` pipeline."""
        # scikit-learn is imported here only: loading and serving a saved form must not pay for it.
        import sklearn
        from sklearn.ensemble import RandomForestRegressor
        from sklearn.feature_extraction import DictVectorizer
        from sklearn.pipeline import Pipeline
        from sklearn.tree import DecisionTreeRegressor

        if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
            raise UnsupportedModel(f"expected a 2-step Pipeline, got {type(pipeline).__name__}")
        vectorizer, forest = pipeline[0], pipeline[-1]
        if not isinstance(vectorizer, DictVectorizer):
            raise UnsupportedModel(f"first step must be a DictVectorizer, got {type(vectorizer).__name__}")
        if isinstance(forest, DecisionTreeRegressor):
            trees = [forest]
        elif isinstance(forest, RandomForestRegressor):
            trees = list(forest.estimators_)
        else:
            raise UnsupportedModel(f"last step must be a random forest or tree regressor, got {type(forest).__name__}")
        if any(t.tree_.n_outputs != 1 for t in trees):
            raise UnsupportedModel("only single-output regressors are supported")
        feature_names = list(vectorizer.feature_names_)
        if any(vectorizer.vocabulary_[name] != i for i, name in enumerate(feature_names)):
            raise UnsupportedModel("the DictVectorizer's vocabulary does not follow its feature names")

        node_count = np.array([t.tree_.node_count for t in trees])
        node_dtype = _narrowest_int(int(node_count.max()) - 1)
        feature_dtype = _narrowest_int(len(feature_names) - 1)
        left, right, feature, threshold, value = [], [], [], [], []
        for tree in trees:
            t = tree.tree_
            is_leaf = t.children_left == -1
            left.append(t.children_left.astype(node_dtype))
            right.append(t.children_right.astype(node_dtype))
            feature.append(np.where(is_leaf, -1, t.feature).astype(feature_dtype))
            # A leaf's threshold and an inner node's value are never read: zeros compress.
            threshold.append(np.where(is_leaf, 0.0, t.threshold))
            value.append(np.where(is_leaf, t.value[:, 0, 0], 0.0))
        arrays = {
            "node_count": node_count.astype(_narrowest_int(int(node_count.max()))),
            "left": np.concatenate(left),
            "right": np.concatenate(right),
            "feature": np.concatenate(feature),
            "threshold": _float32_floor(np.concatenate(threshold).astype(np.float64)),
            "value": np.concatenate(value).astype(np.float64),
        }
        return cls(
            arrays,
            feature_names,
            vectorizer.separator,
            max(t.tree_.max_depth for t in trees),
            pipeline=pipeline,
            max_walk_rows=max_walk_rows,
            built_with={"scikit-learn": sklearn.__version__, "numpy": np.__version__},
        )

    def check_against(self, pipeline, features: Sequence[Mapping], tol: float = 1e-9) -> float:
        """Walk `features` and compare with `pipeline.predict`; raise ServingFormMismatch beyond `tol`.

        Returns the largest absolute difference. Always walks (never hands the
        rides to a pipeline), so it checks the arrays themselves.
        """
        expected = np.asarray(pipeline.predict(features), dtype=np.float64)
        got = self.walk(features)
        if got.shape != expected.shape:
            raise ServingFormMismatch(f"serving form gave {got.shape} predictions, the pipeline {expected.shape}")
        diff = np.abs(got - expected)
        worst = float(diff.max()) if len(diff) else 0.0
        if not worst <= tol:  # also catches NaN
            i = int(np.nanargmax(diff)) if np.isfinite(diff).any() else 0
            raise ServingFormMismatch(
                f"serving form differs from the pipeline by up to {worst:.3g} (> {tol:g}) on {int((~(diff <= tol)).sum())}"
                f" of {len(diff)} rides; ride {i}: {got[i]!r} vs {expected[i]!r}"
            )
        return worst

    # --- the serving form on disk ---------------------------------------------------------

    def save(self, folder, compress: bool = False) -> list[Path]:
        """Write `forest.npz` and `forest.json` into `folder`; returns their paths (json first).

        Uncompressed by default: from the local S3 the 3.7 MB more of the
        course's model (5.1 MB against 1.4 MB) download in ~7 ms, less than the
        ~11 ms inflating adds to loading. `compress=True` suits a slower link;
        `load` reads either.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        (np.savez_compressed if compress else np.savez)(buffer, allow_pickle=False, **self.arrays)
        data = buffer.getvalue()
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "arrays_file": ARRAYS_FILE,
            "arrays_sha256": _sha256(data),
            "arrays_bytes": len(data),
            "n_trees": self.n_trees,
            "n_nodes": self.n_nodes,
            "n_features": self.n_features,
            "depth": self.depth,
            "separator": self.separator,
            "built_with": self.built_with,
            "feature_names": self.feature_names,
        }
        arrays_path, meta_path = folder / ARRAYS_FILE, folder / META_FILE
        arrays_path.write_bytes(data)
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        return [meta_path, arrays_path]

    @classmethod
    def load(cls, folder) -> FastForest:
        """The form saved by `save(folder)`; InvalidServingForm if it is not exactly what was saved."""
        folder = Path(folder)
        try:
            meta, data = (folder / META_FILE).read_bytes(), (folder / ARRAYS_FILE).read_bytes()
        except FileNotFoundError as missing:
            raise InvalidServingForm(f"no serving form in {folder}: {Path(missing.filename).name} is missing") from None
        return cls.from_bytes(meta, data, source=str(folder))

    @classmethod
    def from_bytes(cls, meta: bytes, data: bytes, source: str = "serving form") -> FastForest:
        """The form from the contents of `forest.json` and `forest.npz` (e.g. read straight from S3)."""
        try:
            meta = json.loads(meta)
        except ValueError as e:
            raise InvalidServingForm(f"{source}: {META_FILE} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise InvalidServingForm(f"{source}: {META_FILE} does not describe a {FORMAT}")
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise InvalidServingForm(
                f"{source}: {META_FILE} is format version {version!r} and this code reads only version"
                f" {FORMAT_VERSION}; load the MLflow model instead or upgrade ride_duration"
            )
        if _sha256(data) != meta.get("arrays_sha256"):
            raise InvalidServingForm(
                f"{source}: {ARRAYS_FILE} ({len(data)} bytes) does not match the sha256 in {META_FILE}"
                f" ({meta.get('arrays_bytes')} bytes expected): truncated or altered, refused"
            )
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
            # allow_pickle=False: an object array raises here instead of running pickle.
            raise InvalidServingForm(
                f"{source}: {ARRAYS_FILE} holds something other than numeric arrays ({e})"
            ) from None
        names, separator, depth = meta.get("feature_names"), meta.get("separator"), meta.get("depth")
        if not isinstance(names, list) or not isinstance(separator, str):
            raise InvalidServingForm(f"{source}: {META_FILE} has no list of feature_names or no separator")
        try:
            form = cls(arrays, names, separator, depth, built_with=meta.get("built_with"))
        except InvalidServingForm as e:
            raise InvalidServingForm(f"{source}: {e}") from None
        described = {name: meta.get(name) for name in ("n_trees", "n_nodes", "n_features")}
        if described != {name: getattr(form, name) for name in described}:
            raise InvalidServingForm(f"{source}: {ARRAYS_FILE} does not hold the forest {META_FILE} describes")
        return form

    # --- predicting -----------------------------------------------------------------------

    def _encode(self, features: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
        """Feature dicts -> `(place, rows)`: `rows[i, place[f]]` is column f of ride i, as DictVectorizer.transform.

        Strings are one-hot `key=value` columns, numbers keep their value,
        unknown names are dropped; float32, as sklearn casts X. Only the columns
        these rides use get a place in `rows` (the others all map to place 0,
        which stays 0), so rows cost memory for their own columns, not the model's.
        """
        vocab, sep = self.vocabulary, self.separator
        places: dict[int, int] = {}
        ride, place, value = [], [], []
        for i, row in enumerate(features):
            for name, v in row.items():
                if isinstance(v, str):
                    col, v = vocab.get(f"{name}{sep}{v}"), 1.0
                elif isinstance(v, (Number, np.generic)) or v is None:  # None: NaN, as DictVectorizer
                    col = vocab.get(name)
                else:  # DictVectorizer's lists of strings: never needed by the rides, so never silently wrong
                    raise TypeError(f"feature {name!r} is a {type(v).__name__}; the forest takes strings and numbers")
                if col is not None:
                    ride.append(i)
                    place.append(places.setdefault(col, len(places) + 1))
                    value.append(v)
        where = np.zeros(self.n_features, dtype=np.intp)
        where[list(places)] = list(places.values())
        rows = np.zeros((len(features), len(places) + 1), dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32 becomes inf, refused in walk
            rows[ride, place] = np.asarray(value, dtype=np.float64)
        return where, rows

    def predict(self, features) -> np.ndarray:
        """Predictions for one feature dict or a sequence of them (float64, one per ride)."""
        if isinstance(features, Mapping):
            features = [features]
        if self.pipeline is not None and len(features) > self.max_walk_rows:
            return np.asarray(self.pipeline.predict(features), dtype=np.float64)
        return self.walk(features)

    def walk(self, features: Sequence[Mapping], chunk: int = 512) -> np.ndarray:
        """Predict by walking every tree with numpy (any number of rides, `chunk` at a time)."""
        if len(features) > chunk:
            return np.concatenate([self.walk(features[i : i + chunk]) for i in range(0, len(features), chunk)])
        n = len(features)
        if n == 0:
            return np.empty(0)
        place, rows = self._encode(features)
        if not np.isfinite(rows).all():
            raise ValueError("Input contains NaN or infinity (or a value too large for float32), as sklearn refuses")
        # nodes[t, i]: 2 * (the node ride i is at in tree t); see __init__. Trees
        # on the first axis so that the final sum runs tree after tree, as sklearn's.
        nodes = np.repeat(self._roots2[:, None], n, axis=1)
        # Ride i's values start at i * width in the flattened `rows`.
        row_start = np.arange(n) * rows.shape[1]
        rows = rows.ravel()
        feature, threshold, child = self._feature2, self._threshold2, self._child2
        for _ in range(self.depth):
            at = place.take(feature.take(nodes))
            x = rows.take(at + row_start if n > 1 else at)  # one ride: one numpy call less
            nodes = child.take(nodes + (x > threshold.take(nodes)))
        # cumsum runs strictly in order (a sum over a (trees, 1) array would go pairwise).
        return np.cumsum(self._value.take(nodes >> 1), axis=0)[-1] / self.n_trees


def fast_model(pipeline):
    """The fast runtime for a fitted pipeline, or the pipeline itself when it is not supported."""
    try:
        return FastForest.from_pipeline(pipeline)
    except UnsupportedModel:
        return pipeline


def _check_shapes(arrays: Mapping[str, np.ndarray], depth) -> None:
    """The arrays the format names, each 1-d of its dtype and of matching lengths."""

    def refuse(problem: str):
        raise InvalidServingForm(f"{ARRAYS_FILE} {problem}")

    expected = {**{name: "signed integers" for name in _INT_ARRAYS}, **_FLOAT_ARRAYS}
    if set(arrays) != set(expected):
        refuse(f"has arrays {sorted(arrays)}, expected {sorted(expected)}")
    for name, dtype in expected.items():
        a = arrays[name]
        if a.ndim != 1 or (a.dtype.kind != "i" if name in _INT_ARRAYS else a.dtype != dtype):
            refuse(f"has {name!r} as {a.dtype} of shape {a.shape}, expected 1-d {dtype}")
    node_count = arrays["node_count"]
    if not len(node_count) or node_count.min() < 1:
        refuse("has a forest without trees or a tree without nodes")
    n_nodes = int(node_count.sum(dtype=np.int64))
    if any(len(arrays[name]) != n_nodes for name in ("left", "right", "feature", "threshold", "value")):
        refuse(f"does not have {n_nodes} entries (its node count) in every per-node array")
    if not isinstance(depth, int) or not 0 <= depth < n_nodes:
        refuse(f"comes with a depth of {depth!r} for {n_nodes} nodes")
