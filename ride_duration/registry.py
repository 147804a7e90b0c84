"""Everything MLflow: which model, where its files are, and loading it safely.

One copy for every deployment.

Which model: `resolve_model` (batch) and `default_model_uri` (the services) apply
the same precedence: an explicit reference > MODEL_URI > MODEL_ID + EXPERIMENT_ID
(straight from S3, no tracking server) > the registry alias. Whenever the tracking
server must be asked, it is checked first (`check_tracking_server`), so a server
that is down costs seconds, not MLflow's minutes of HTTP retries.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .config import Settings

# Imported inside functions, to keep them lazy: mlflow (2-3 s; the services' fast path never
# needs it), skops (only for the fallback load), requests (only to check a tracking server),
# botocore (with mlflow).

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
RUN_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
REGISTRY_SCHEMES = ("models:/", "runs:/")


class ModelNotFound(LookupError):
    """The model could not be found where it was looked up."""


class TrackingServerDown(RuntimeError):
    """The MLflow tracking server does not answer."""


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingServerDown (in at most `timeout` s) unless `uri` answers /health."""
    import requests

    if not uri.startswith("http"):
        return  # file or sqlite store: nothing to reach
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout).raise_for_status()
    except requests.RequestException as exc:
        raise TrackingServerDown(
            f"the MLflow tracking server at {uri} is not answering ({exc.__class__.__name__}). "
            "Start the local stack with `make services-up` (or point MLFLOW_TRACKING_URI at your server)."
        ) from None


def _require_tracking_server(uri: str, settings: Settings) -> None:
    """Fail in seconds, in one sentence, when `uri` needs a tracking server that is down."""
    try:
        check_tracking_server(settings.mlflow_tracking_uri)
    except TrackingServerDown:
        raise ModelNotFound(
            f"model {uri} is looked up on the MLflow tracking server at {settings.mlflow_tracking_uri}, "
            "which is not answering; start it (`make services-up`) or point MLFLOW_TRACKING_URI at your server, "
            "or set MODEL_ID + EXPERIMENT_ID to load the model straight from S3"
        ) from None


# ----------------------------------------------------------------------------- which model
def s3_model_uri(bucket: str, experiment_id: str, model_id: str) -> str:
    """Where MLflow 3 stores a logged model's files in the artifact store: the one place
    that writes this layout down, for loading with MODEL_ID + EXPERIMENT_ID and no tracking
    server (boto3 alone, as the Lambda does).

    MLflow 3 keeps models as their own entities: `<experiment>/models/<model_id>/artifacts`.
    The 2022 layout `<experiment>/<run_id>/artifacts/model` is gone. MLflow does not
    document the layout; tests/test_stack_and_registry.py holds it to the
    `artifact_location` MLflow reports for a model it logged, so an MLflow change shows there.
    """
    return f"s3://{bucket}/{experiment_id}/models/{model_id}/artifacts"


def default_model_uri(settings: Settings) -> str:
    """The model location a service is configured with, in order of precedence:
    MODEL_URI; MODEL_ID + EXPERIMENT_ID (straight from S3); the registry alias."""
    if settings.model_uri:
        return settings.model_uri
    if settings.model_id:
        if not settings.experiment_id:
            raise ValueError("MODEL_ID is set but EXPERIMENT_ID is not: both are needed to find the model in S3")
        return s3_model_uri(settings.mlflow_bucket, settings.experiment_id, settings.model_id)
    return settings.registry_uri


def model_uri_for(ref: str, settings: Settings) -> str:
    """What a person may type -> a model URI: an MLflow run id -> `runs:/<id>/model`;
    a bare word -> that alias of the registered model; anything with `/` or `:`
    (`models:/...`, `s3://...`, `./folder`) is already a URI."""
    ref = ref.strip()
    if RUN_ID_PATTERN.match(ref):
        return f"runs:/{ref}/model"
    if "/" in ref or ":" in ref:
        return ref
    return f"models:/{settings.model_name}@{ref}"


@dataclass(frozen=True)
class ModelRef:
    """A model pinned to one version: `uri` never moves (an alias is resolved to a
    version), `run_id` is the version that names the outputs (the MLflow run id)."""

    uri: str
    run_id: str


def resolve_model(ref: str | None, settings: Settings) -> ModelRef:
    """The model to use, pinned: `ref` (a run id, an alias, `models:/...`, an S3 URI or a
    folder) if given, else what the services use (`default_model_uri`).

    An alias is resolved once, here, so every month of a backfill uses the same version
    even if someone moves the alias meanwhile. MODEL_ID + EXPERIMENT_ID and S3 URIs are
    pinned by reading the model's MLmodel file from S3: no tracking server involved.
    """
    uri = model_uri_for(ref, settings) if ref else default_model_uri(settings)
    if uri.startswith("models:/"):
        return _pin_registered(uri, settings)
    if uri.startswith("runs:/"):
        return ModelRef(uri=uri, run_id=uri.removeprefix("runs:/").split("/", 1)[0])
    return ModelRef(uri=uri, run_id=version_of(read_mlmodel(uri, settings=settings), uri))


def _pin_registered(uri: str, settings: Settings) -> ModelRef:
    """`models:/name@alias`, `models:/name/<version>` or `models:/<model id>` -> a pinned ref."""
    _require_tracking_server(uri, settings)  # before importing mlflow (2 s): a dead server fails at once
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    path = uri.removeprefix("models:/").rstrip("/")
    try:
        if "/" not in path and "@" in path:
            name, alias = path.rsplit("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        elif "/" in path:
            name, version = path.split("/", 1)
            if not version.isdigit():
                raise ModelNotFound(
                    f"model {uri}: name a version (models:/{name}/3) or an alias (models:/{name}@production)"
                )
            mv = client.get_model_version(name, version)
        else:
            model = client.get_logged_model(path)  # models:/m-<id>: a logged model, already pinned
            return ModelRef(uri=uri, run_id=model.source_run_id or model.model_id)
    except MlflowException as exc:
        raise ModelNotFound(
            f"no model {uri} on the tracking server {settings.mlflow_tracking_uri}: {exc.message}"
        ) from exc
    return ModelRef(uri=f"models:/{mv.name}/{mv.version}", run_id=mv.run_id or mv.model_id)


def production_model_s3(settings: Settings) -> dict:
    """Where the registry's aliased model lives in S3: {"MODEL_ID", "EXPERIMENT_ID", "uri"}.

    Asks the tracking server once (e.g. at deploy time) so that services can then be
    configured to load straight from S3 and start without it."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    _require_tracking_server(settings.registry_uri, settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    try:
        mv = MlflowClient().get_model_version_by_alias(settings.model_name, settings.model_alias)
        # The registry keeps the logged model as `source` models:/m-... (model_id can be empty).
        model_id = mv.model_id or mv.source.removeprefix("models:/")
        experiment_id = mlflow.get_logged_model(model_id).experiment_id
    except MlflowException as exc:
        raise ModelNotFound(
            f"no model {settings.registry_uri} on {settings.mlflow_tracking_uri}: {exc.message}"
        ) from exc
    return {
        "MODEL_ID": model_id,
        "EXPERIMENT_ID": experiment_id,
        "uri": s3_model_uri(settings.mlflow_bucket, experiment_id, model_id),
    }


# ----------------------------------------------------------------------------- fetching the files
def _where(uri: str, settings: Settings) -> str:
    if uri.startswith(REGISTRY_SCHEMES):
        return f"through the MLflow tracking server {settings.mlflow_tracking_uri}"
    if uri.startswith("s3://"):
        return f"in S3 at {_s3_endpoint(settings)}"
    return "on the local disk"


def _s3_endpoint(settings: Settings) -> str:
    return settings.mlflow_s3_endpoint_url or "AWS (default endpoint)"


def artifact_location(uri: str, settings: Settings) -> str | None:
    """The storage location behind a `models:/` or `runs:/` URI (best effort: None if unknown)."""
    _require_tracking_server(uri, settings)
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)

    try:
        if uri.startswith("models:/"):
            return _registered_location(uri)
        if uri.startswith("runs:/"):
            run_id, _, name = uri.removeprefix("runs:/").partition("/")
            experiment_id = mlflow.get_run(run_id).info.experiment_id
            for model in mlflow.search_logged_models(
                experiment_ids=[experiment_id], output_format="list", filter_string=f"name = '{name or 'model'}'"
            ):
                if model.source_run_id == run_id:
                    return model.artifact_location
    except Exception:  # only used to word an error: never hide the original one
        log.debug("could not find the storage location of %s", uri, exc_info=True)
    return None


def _registered_location(uri: str) -> str:
    """`models:/name@alias`, `models:/name/<version>` or `models:/<model id>` -> its storage location."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    path = uri.removeprefix("models:/").rstrip("/")
    if "/" in path:
        name, version = path.split("/", 1)
    elif "@" in path:
        name, alias = path.rsplit("@", 1)
        version = client.get_model_version_by_alias(name, alias).version
    else:
        return mlflow.get_logged_model(path).artifact_location
    return client.get_model_version_download_uri(name, version)


def _artifacts_missing(uri: str, settings: Settings) -> ModelNotFound:
    """The error for a model whose entry exists (registry, URI) but whose files are gone."""
    location = uri if not uri.startswith(REGISTRY_SCHEMES) else artifact_location(uri, settings)
    if location is None:
        where = f"behind {uri}"
    elif location.startswith("s3://"):
        where = f"under {location} in S3 at {_s3_endpoint(settings)}"
    else:
        where = f"under {location}"
    pointer = f"; {uri} points there" if location and location != uri else ""
    return ModelNotFound(
        f"the model's artifacts are missing: no objects {where}{pointer}; the object store lost them or they "
        "were deleted, so retrain and register the model again (or restore the objects)"
    )


def _no_objects(uri: str) -> bool:
    """True when the model's location lists no files at all (asked after a failed download)."""
    import mlflow
    from botocore.exceptions import BotoCoreError, ClientError
    from mlflow.exceptions import MlflowException

    def has_files(location: str, depth: int) -> bool:
        # An object store may keep an empty "folder" (serving/) after its objects are deleted.
        for entry in mlflow.artifacts.list_artifacts(artifact_uri=location) or []:
            if not entry.is_dir or (depth and has_files(f"{uri.rstrip('/')}/{entry.path}", depth - 1)):
                return True
        return False

    try:
        return not has_files(uri, 1)
    except (MlflowException, BotoCoreError, ClientError, OSError):
        return False


def _download(uri: str, dst: Path, settings: Settings, artifact: str | None = None) -> Path:
    """The model folder (or one `artifact` file in it) of `uri`, as a local path."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep service logs clean
    import mlflow
    from mlflow.exceptions import MlflowException

    if "://" not in uri and not uri.startswith(REGISTRY_SCHEMES):
        path = Path(uri).expanduser()
        if not (path / "MLmodel").is_file():
            raise ModelNotFound(f"no MLflow model (MLmodel file) in folder {path}")
        return path / artifact if artifact else path
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if uri.startswith(REGISTRY_SCHEMES):
        _require_tracking_server(uri, settings)
    source = f"{uri.rstrip('/')}/{artifact}" if artifact else uri
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst)))
    except Exception as exc:
        if _no_objects(uri):
            raise _artifacts_missing(uri, settings) from exc
        detail = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise ModelNotFound(f"model {uri} could not be loaded {_where(uri, settings)}: {detail}") from exc
    if artifact:
        return local
    if not any(path.is_file() for path in local.rglob("*")):
        raise _artifacts_missing(uri, settings)  # MLflow "downloads" an empty prefix (or empty folders) without a word
    if not (local / "MLmodel").is_file():
        raise ModelNotFound(f"{uri} {_where(uri, settings)} holds no MLflow model (no MLmodel file)")
    return local


def read_mlmodel(uri: str, *, settings: Settings) -> dict:
    """The model's MLmodel file as a dict (run_id, model_id, flavors, metadata), read by
    MLflow's `Model.load`, without downloading the model itself."""
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="ride-duration-mlmodel-") as tmp:
        return Model.load(str(_download(uri, Path(tmp), settings, artifact="MLmodel"))).to_dict()


def version_of(meta: dict, uri: str) -> str:
    """The version services report and outputs are named by: the MLflow run id that
    produced the model (the course's convention)."""
    return meta.get("run_id") or meta.get("model_id") or Path(uri.rstrip("/")).name


# ----------------------------------------------------------------------------- loading
def load_model_folder(path: Path):
    """Load the sklearn pipeline from a downloaded MLflow model folder.

    Returns (model, info) where info has run_id, model_id and the MLmodel file's
    `metadata` dict (training logs `{"training_data": ...}` there; {} if absent).
    """
    import skops.io
    from mlflow.models import Model

    meta = Model.load(str(path)).to_dict()
    flavor = meta.get("flavors", {}).get("sklearn")
    if flavor is None:
        raise ModelNotFound(f"the model in {path} has no sklearn flavor")
    if flavor.get("serialization_format") != "skops":
        raise ModelNotFound(
            f"the model in {path} is stored as {flavor.get('serialization_format')!r}; "
            "this course only loads skops models (see notebook 02)"
        )
    model = skops.io.load(path / flavor["pickled_model"], trusted=TRUSTED_TYPES)
    return model, {
        "run_id": meta.get("run_id"),
        "model_id": meta.get("model_id"),
        "metadata": meta.get("metadata") or {},
    }


def load_model(model_uri: str | None = None, *, settings: Settings):
    """Load the model from the registry, S3, or a local folder.

    `model_uri` examples: `models:/NYCRideDurationModel@production`,
    `s3://mlflow-models-ride-duration/1/models/m-.../artifacts`, `./model`.
    Default: from config (see `default_model_uri`).

    Returns `(model, model_version)`; the version services report is the MLflow
    run id that produced the model (the course's convention). The model carries
    `model.training_data`: the training data's provenance recorded with the model
    (the MLmodel file's `metadata["training_data"]`), None for older models.
    """
    uri = model_uri or default_model_uri(settings)
    with tempfile.TemporaryDirectory(prefix="ride-duration-model-") as tmp:
        folder = _download(uri, Path(tmp), settings)
        model, meta = load_model_folder(folder)
    model.training_data = meta["metadata"].get("training_data")
    version = version_of(meta, uri)
    log.info("loaded model %s (version %s)", uri, version)
    return model, version
