"""Train the reference model and log it to MLflow.

`python -m ride_duration.train --promote` trains on January 2021, validates on
February 2021, logs params, `rmse_valid` and the model (skops format) to the
tracking server, registers it as `NYCRideDurationModel` and, with --promote,
points the alias `production` at the new version.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.feature_extraction import DictVectorizer
from sklearn.metrics import root_mean_squared_error
from sklearn.pipeline import Pipeline, make_pipeline

from .config import Settings, get_settings
from .predict import TRUSTED_TYPES
from .utils import TARGET, load_training_dataframe, prepare_features

log = logging.getLogger(__name__)

# The course's reference forest. Not tuned on purpose: its numbers are the course's.
PARAMS = {"n_estimators": 100, "max_depth": 20, "random_state": 42}
EXAMPLE_RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}


def _model_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("scikit-learn", "skops", "numpy", "scipy")]


class TrackingServerDown(RuntimeError):
    pass


@dataclass
class TrainResult:
    pipeline: Pipeline
    rmse_valid: float
    n_train: int
    n_valid: int
    seconds: float
    valid_pred: np.ndarray
    valid_true: np.ndarray


def build_pipeline(params: dict | None = None) -> Pipeline:
    params = {**PARAMS, **(params or {})}
    # n_jobs=-1 speeds up fitting on all cores; it is reset to 1 after fitting
    # because a thread pool per predict call costs ~100x more than one ride's trees.
    return make_pipeline(DictVectorizer(), RandomForestRegressor(n_jobs=-1, **params))


def train(train_path, valid_path, params: dict | None = None) -> TrainResult:
    start = time.perf_counter()
    df_train = load_training_dataframe(train_path)
    df_valid = load_training_dataframe(valid_path)
    pipeline = build_pipeline(params)
    pipeline.fit(prepare_features(df_train), df_train[TARGET].to_numpy())
    pipeline[-1].n_jobs = None
    y_pred = pipeline.predict(prepare_features(df_valid))
    y_true = df_valid[TARGET].to_numpy()
    return TrainResult(
        pipeline=pipeline,
        rmse_valid=float(root_mean_squared_error(y_true, y_pred)),
        n_train=len(df_train),
        n_valid=len(df_valid),
        seconds=time.perf_counter() - start,
        valid_pred=y_pred,
        valid_true=y_true,
    )


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
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


@dataclass
class LoggedModel:
    run_id: str
    model_id: str
    model_uri: str
    experiment_id: str
    s3_uri: str
    registered_version: str | None
    rmse_valid: float


def log_to_mlflow(
    result: TrainResult,
    *,
    settings: Settings | None = None,
    register: bool = True,
    promote: bool = False,
    tags: dict | None = None,
) -> LoggedModel:
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    settings = settings or get_settings()
    check_tracking_server(settings.mlflow_tracking_uri)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(settings.experiment_name)
    example = prepare_features([EXAMPLE_RIDE])
    # Our pipeline takes feature dicts (sklearn flavor); MLflow's pyfunc check of the
    # example converts it to a DataFrame first and warns. The services never use pyfunc.
    logging.getLogger("mlflow.models.model").setLevel(logging.ERROR)
    with mlflow.start_run(tags=tags) as run:
        mlflow.log_params({k: v for k, v in PARAMS.items()})
        mlflow.log_params({"n_train": result.n_train, "n_valid": result.n_valid})
        mlflow.log_metric("rmse_valid", result.rmse_valid)
        info = mlflow.sklearn.log_model(
            result.pipeline,
            name="model",  # MLflow 3: `name=`; `artifact_path=` is deprecated
            signature=infer_signature(example, result.pipeline.predict(example)),
            input_example=example,
            serialization_format="skops",
            skops_trusted_types=TRUSTED_TYPES,
            registered_model_name=settings.model_name if register else None,
            # Explicit requirements: faster than MLflow's import-scanning inference.
            pip_requirements=_model_requirements(),
        )
    version = None
    if register:
        version = str(info.registered_model_version)
        if promote:
            MlflowClient().set_registered_model_alias(settings.model_name, settings.model_alias, version)
    # The artifact location of the logged model is the physical S3 folder.
    s3_uri = mlflow.get_logged_model(info.model_id).artifact_location
    return LoggedModel(
        run_id=run.info.run_id,
        model_id=info.model_id,
        model_uri=info.model_uri,
        experiment_id=experiment.experiment_id,
        s3_uri=s3_uri,
        registered_version=version,
        rmse_valid=result.rmse_valid,
    )


def main(argv=None) -> int:
    from .data import DataUnavailable, fetch_month

    parser = argparse.ArgumentParser(description="Train the ride duration model and log it to MLflow.")
    parser.add_argument("--train-path", help="parquet path/URL (default: green 2021-01 from the data cache)")
    parser.add_argument("--valid-path", help="parquet path/URL (default: green 2021-02)")
    parser.add_argument("--tracking-uri", help="MLflow tracking server (default: MLFLOW_TRACKING_URI or http://127.0.0.1:5000)")
    parser.add_argument("--no-register", action="store_true", help="log the run without registering the model")
    parser.add_argument("--promote", action="store_true", help="point the `production` alias at the new version")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.tracking_uri:
        from .stack import activate_if_running

        activate_if_running()  # no endpoints configured but the local stack is up: use it
    settings = get_settings()
    if args.tracking_uri:
        settings = dataclasses.replace(settings, mlflow_tracking_uri=args.tracking_uri)
    try:
        check_tracking_server(settings.mlflow_tracking_uri)
        train_path = args.train_path or fetch_month("green", 2021, 1, settings=settings)
        valid_path = args.valid_path or fetch_month("green", 2021, 2, settings=settings)
        result = train(train_path, valid_path)
        print(f"trained on {result.n_train} rides in {result.seconds:.1f} s; rmse_valid = {result.rmse_valid:.3f} min")
        logged = log_to_mlflow(result, settings=settings, register=not args.no_register, promote=args.promote)
    except (TrackingServerDown, DataUnavailable, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"run id:     {logged.run_id}")
    print(f"model id:   {logged.model_id}")
    print(f"model uri:  {logged.model_uri}")
    print(f"in S3:      {logged.s3_uri}")
    if logged.registered_version:
        alias = f" (alias {settings.model_alias})" if args.promote else ""
        print(f"registered: {settings.model_name} version {logged.registered_version}{alias}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def ensure_production_model(settings: Settings | None = None) -> str:
    """Make sure `models:/<name>@<alias>` exists on the tracking server; train on the
    course's months and promote if it does not. Returns the registry URI.

    Lets any notebook run on its own (the registry notebook normally did this)."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .data import fetch_month

    settings = settings or get_settings()
    check_tracking_server(settings.mlflow_tracking_uri)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    try:
        MlflowClient().get_model_version_by_alias(settings.model_name, settings.model_alias)
    except MlflowException:
        result = train(fetch_month("green", 2021, 1, settings=settings), fetch_month("green", 2021, 2, settings=settings))
        log_to_mlflow(result, settings=settings, promote=True)
    return settings.registry_uri
