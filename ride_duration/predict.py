"""The model a service serves, and the one predict call web, stream and batch make.

Training stores, inside the logged MLflow model, a pickle-free serving form of the
same fitted forest (`serving/forest.json` + `serving/forest.npz`, see `fastmodel`),
checked against the pipeline before it is registered. A service loads that form
with boto3 + numpy only: no MLflow, scikit-learn or skops import, no forest rebuilt
by skops (the Lambda's cold start). A model without it (older, or another model
type) is loaded from its skops file by `registry.load_model`, as before, except where
only the serving form may be served (`serving_form_only`: the Lambda image, which has
numpy but no scikit-learn, skops or MLflow).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml
from botocore.exceptions import ClientError

from .aws import s3_client, split_s3_uri
from .config import Settings
from .fastmodel import FILES, FastForest, InvalidServingForm
from .features import prepare_features
from .registry import REGISTRY_SCHEMES, ModelNotFound, artifact_location, default_model_uri, load_model, version_of

log = logging.getLogger(__name__)

SERVING_DIR = "serving"  # in the logged model's artifacts


def make_prediction(model, rides) -> np.ndarray:
    """Rides (list of dicts, one dict, or a DataFrame) -> predicted minutes, one model call."""
    features = prepare_features(rides)
    if not features:
        return np.empty(0)
    return np.asarray(model.predict(features), dtype=float)


def load_serving_model(model_uri: str | None, settings: Settings, *, serving_form_only: bool = False):
    """`(model, version)` for a service: the forest's serving form when the logged model
    has one, else the pipeline from its skops file. The model carries `training_data`
    (the provenance recorded at training) and `source` ("serving form" or "skops").

    `serving_form_only`: a model without the serving form is refused (ModelNotFound, one
    sentence) instead of being loaded with scikit-learn and skops."""
    uri = model_uri or default_model_uri(settings)
    location = _registry_location(uri, settings) if uri.startswith(REGISTRY_SCHEMES) else uri
    files = _serving_files(location, settings) if location else None
    if files is None and serving_form_only:
        raise ModelNotFound(
            f"model {uri} has no serving form ({SERVING_DIR}/{' and '.join(FILES)} beside its MLmodel file), "
            "the only form the stream function serves: train and log it with `make train`, which stores one, "
            "and deploy that model"
        )
    if files is None:
        model, version = load_model(uri, settings=settings)
        model.source = "skops"
        return model, version
    mlmodel, meta, arrays = files
    info = yaml.safe_load(mlmodel) or {}
    try:
        model = FastForest.from_bytes(meta, arrays, source=f"{location}/{SERVING_DIR}")
    except InvalidServingForm as exc:
        raise ModelNotFound(str(exc)) from None
    model.training_data = (info.get("metadata") or {}).get("training_data")
    model.source = "serving form"
    version = version_of(info, uri)
    log.info("loaded the serving form of %s (version %s)", uri, version)
    return model, version


def _registry_location(uri: str, settings: Settings) -> str | None:
    try:
        return artifact_location(uri, settings)
    except ImportError as exc:  # an image without MLflow (the Lambda's) cannot ask a registry
        raise ModelNotFound(
            f"model {uri} is a registry reference, which needs MLflow ({exc.name} is not installed here): "
            "set MODEL_ID and EXPERIMENT_ID (or MODEL_URI to the model's s3:// folder) instead"
        ) from None


def _serving_files(location: str, settings: Settings) -> tuple[bytes, bytes, bytes] | None:
    """(MLmodel, forest.json, forest.npz) of the model at `location` (s3:// or a folder);
    None when it has no serving form."""
    names = ["MLmodel", *(f"{SERVING_DIR}/{name}" for name in FILES)]
    if location.startswith("s3://"):
        bucket, prefix = split_s3_uri(location.rstrip("/"))
        client = s3_client(settings)
        try:
            return tuple(client.get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read() for name in names)
        except ClientError:  # no such object (or no access): the skops path says what is wrong, and where
            return None
    folder = Path(location).expanduser()
    if "://" in location or not all((folder / name).is_file() for name in names):
        return None
    return tuple((folder / name).read_bytes() for name in names)
