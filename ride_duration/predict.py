"""Loading the model and predicting with it: one copy for every deployment."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from .config import Settings, get_settings
from .utils import prepare_features

log = logging.getLogger(__name__)

# The model is stored with skops, not pickle: skops refuses to instantiate any
# type that is not on an allow-list. MLflow keeps its own copy of that list in
# the artifact's MLmodel file, which a tampered artifact could widen, so we load
# with the list defined here, in code we control.
TRUSTED_TYPES = [
    "sklearn.feature_extraction._dict_vectorizer.DictVectorizer",
    "sklearn.ensemble._forest.RandomForestRegressor",
    "sklearn.tree._classes.DecisionTreeRegressor",
    "sklearn.tree._tree.Tree",
    "sklearn.pipeline.Pipeline",
    "numpy.dtype",
    "builtins.float",
    "builtins.int",
    "builtins.str",
]


class ModelNotFound(LookupError):
    """The model could not be found where it was looked up."""


def make_prediction(model, rides) -> np.ndarray:
    """Rides (list of dicts, one dict, or a DataFrame) -> predicted minutes, one model call."""
    features = prepare_features(rides)
    if not features:
        return np.empty(0)
    return np.asarray(model.predict(features), dtype=float)


def s3_model_uri(bucket: str, experiment_id: str, model_id: str) -> str:
    """Where MLflow 3 stores a logged model's files in the artifact store.

    MLflow 3 keeps models as their own entities: `<experiment>/models/<model_id>/artifacts`.
    The 2022 layout `<experiment>/<run_id>/artifacts/model` is gone.
    """
    return f"s3://{bucket}/{experiment_id}/models/{model_id}/artifacts"


def default_model_uri(settings: Settings | None = None) -> str:
    """The model location a service is configured with, in order of precedence:
    MODEL_URI; MODEL_ID + EXPERIMENT_ID (straight from S3); the registry alias."""
    settings = settings or get_settings()
    if settings.model_uri:
        return settings.model_uri
    if settings.model_id:
        if not settings.experiment_id:
            raise ValueError("MODEL_ID is set but EXPERIMENT_ID is not: both are needed to find the model in S3")
        return s3_model_uri(settings.mlflow_bucket, settings.experiment_id, settings.model_id)
    return settings.registry_uri


def production_model_s3(settings: Settings | None = None) -> dict:
    """Where the registry's aliased model lives in S3: {"MODEL_ID", "EXPERIMENT_ID", "uri"}.

    Asks the tracking server once (e.g. at deploy time) so that services can then be
    configured to load straight from S3 and start without it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    settings = settings or get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    try:
        mv = MlflowClient().get_model_version_by_alias(settings.model_name, settings.model_alias)
        # The registry keeps the logged model as `source` models:/m-... (model_id can be empty).
        model_id = mv.model_id or mv.source.removeprefix("models:/")
        experiment_id = mlflow.get_logged_model(model_id).experiment_id
    except MlflowException as exc:
        raise ModelNotFound(f"no model {settings.registry_uri} on {settings.mlflow_tracking_uri}: {exc.message}") from exc
    return {"MODEL_ID": model_id, "EXPERIMENT_ID": experiment_id,
            "uri": s3_model_uri(settings.mlflow_bucket, experiment_id, model_id)}


def _where(uri: str, settings: Settings) -> str:
    if uri.startswith(("models:/", "runs:/")):
        return f"through the MLflow tracking server {settings.mlflow_tracking_uri}"
    if uri.startswith("s3://"):
        return f"in S3 at {settings.mlflow_s3_endpoint_url or 'AWS (default endpoint)'}"
    return "on the local disk"


def _download(uri: str, dst: Path, settings: Settings) -> Path:
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep service logs clean
    import mlflow
    from mlflow.exceptions import MlflowException

    if "://" not in uri and not uri.startswith(("models:/", "runs:/")):
        path = Path(uri).expanduser()
        if not (path / "MLmodel").is_file():
            raise ModelNotFound(f"no MLflow model (MLmodel file) in folder {path}")
        return path
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if uri.startswith(("models:/", "runs:/")):
        # Fail in seconds, not after MLflow's minutes of HTTP retries.
        from .train import TrackingServerDown, check_tracking_server

        try:
            check_tracking_server(settings.mlflow_tracking_uri)
        except TrackingServerDown as exc:
            raise ModelNotFound(f"model {uri} could not be loaded {_where(uri, settings)}: {exc}") from None
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst))
    except MlflowException as exc:
        raise ModelNotFound(f"model {uri} not found {_where(uri, settings)}: {exc.message}") from exc
    except Exception as exc:  # botocore / connection errors carry the detail we need
        raise ModelNotFound(f"model {uri} could not be loaded {_where(uri, settings)}: {exc}") from exc
    path = Path(local)
    if not (path / "MLmodel").is_file():
        raise ModelNotFound(f"{uri} {_where(uri, settings)} holds no MLflow model (no MLmodel file)")
    return path


def load_model_folder(path: Path):
    """Load the sklearn pipeline from a downloaded MLflow model folder.

    Returns (model, metadata) where metadata has run_id and model_id.
    """
    import skops.io
    import yaml

    meta = yaml.safe_load((path / "MLmodel").read_text())
    flavor = meta.get("flavors", {}).get("sklearn")
    if flavor is None:
        raise ModelNotFound(f"the model in {path} has no sklearn flavor")
    if flavor.get("serialization_format") != "skops":
        raise ModelNotFound(
            f"the model in {path} is stored as {flavor.get('serialization_format')!r}; "
            "this course only loads skops models (see notebook 02)"
        )
    model = skops.io.load(path / flavor["pickled_model"], trusted=TRUSTED_TYPES)
    return model, {"run_id": meta.get("run_id"), "model_id": meta.get("model_id")}


def load_model(model_uri: str | None = None, *, settings: Settings | None = None):
    """Load the model from the registry, S3, or a local folder.

    `model_uri` examples: `models:/NYCRideDurationModel@production`,
    `s3://mlflow-models-ride-duration/1/models/m-.../artifacts`, `./model`.
    Default: from config (see `default_model_uri`).

    Returns `(model, model_version)`; the version services report is the MLflow
    run id that produced the model (the course's convention).
    """
    settings = settings or get_settings()
    uri = model_uri or default_model_uri(settings)
    with tempfile.TemporaryDirectory(prefix="ride-duration-model-") as tmp:
        folder = _download(uri, Path(tmp), settings)
        model, meta = load_model_folder(folder)
    version = meta["run_id"] or meta["model_id"] or Path(uri).name
    log.info("loaded model %s (version %s)", uri, version)
    return model, version
