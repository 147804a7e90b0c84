"""Train the reference model and log it to MLflow.

`python -m ride_duration.train --promote` trains on January 2021, validates on
February 2021, logs params, `rmse_valid` and the model (skops format) to the
tracking server, registers it as `NYCRideDurationModel` and, with --promote,
points the alias `production` at the new version.

Every run records what it was trained on (`tlc.training_provenance`): file,
sha256, size, rows, source and real or synthetic, as run params and tags and as
the logged model's `metadata["training_data"]` (readable from S3 alone). The
command line and `ensure_production_model` refuse synthetic data unless told
explicitly (`--allow-synthetic`, `allow_synthetic=True`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.feature_extraction import DictVectorizer
from sklearn.metrics import root_mean_squared_error
from sklearn.pipeline import Pipeline, make_pipeline

from .config import Settings, get_settings
from .fastmodel import FastForest
from .features import EXAMPLE_RIDE, TARGET, prepare_features
from .predict import SERVING_DIR
from .registry import TRUSTED_TYPES, TrackingServerDown, check_tracking_server
from .tlc import (
    ChecksumMismatch,
    DataUnavailable,
    MonthFile,
    describe_training_data,
    filename,
    load_training_dataframe,
    locate_month,
    training_provenance,
)

# Imported inside functions, to keep them lazy: mlflow (2-3 s; `train` alone never needs it).

log = logging.getLogger(__name__)

# The course's reference forest. Not tuned on purpose: its numbers are the course's.
PARAMS = {"n_estimators": 100, "max_depth": 20, "random_state": 42}


def _model_requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in ("scikit-learn", "skops", "numpy", "scipy")]


class SyntheticDataRefused(RuntimeError):
    """Training would use synthetic data and nobody asked for it."""


@dataclass
class TrainResult:
    pipeline: Pipeline
    rmse_valid: float
    n_train: int
    n_valid: int
    seconds: float
    valid_pred: np.ndarray
    valid_true: np.ndarray
    # tlc.training_provenance(): {"synthetic": bool, "train": {...}, "valid": {...}}
    training_data: dict | None = None
    # The forest's pickle-free serving form, checked equal to the pipeline on the validation rides.
    serving_form: FastForest | None = None


def build_pipeline(params: dict | None = None) -> Pipeline:
    params = {**PARAMS, **(params or {})}
    # n_jobs=-1 speeds up fitting on all cores; it is reset to 1 after fitting
    # because a thread pool per predict call costs ~100x more than one ride's trees.
    return make_pipeline(DictVectorizer(), RandomForestRegressor(n_jobs=-1, **params))


def train(
    train_path, valid_path, settings: Settings, params: dict | None = None, *, synthetic: bool | None = None
) -> TrainResult:
    """Fit the reference pipeline on `train_path`, score it on `valid_path`.

    Paths, URLs or `tlc.MonthFile`s. Their provenance is recorded in the result;
    `synthetic=None` detects synthetic files by their marker (tlc.is_synthetic).
    """
    start = time.perf_counter()
    provenance = training_provenance(train_path, valid_path, settings, synthetic=synthetic)
    train_path, valid_path = (p.path if isinstance(p, MonthFile) else p for p in (train_path, valid_path))
    df_train = load_training_dataframe(train_path, settings)
    df_valid = load_training_dataframe(valid_path, settings)
    pipeline = build_pipeline(params)
    pipeline.fit(prepare_features(df_train), df_train[TARGET].to_numpy())
    pipeline[-1].n_jobs = None
    valid_features = prepare_features(df_valid)
    y_pred = pipeline.predict(valid_features)
    y_true = df_valid[TARGET].to_numpy()
    return TrainResult(
        pipeline=pipeline,
        rmse_valid=float(root_mean_squared_error(y_true, y_pred)),
        n_train=len(df_train),
        n_valid=len(df_valid),
        seconds=time.perf_counter() - start,
        valid_pred=y_pred,
        valid_true=y_true,
        training_data=provenance,
        serving_form=serving_form(pipeline, valid_features),
    )


def serving_form(pipeline: Pipeline, features: list[dict]) -> FastForest:
    """The pipeline as the services load it (see `fastmodel`), saved and read back, and
    refused (ServingFormMismatch) unless it predicts every validation ride as the pipeline
    does within 1e-9 minutes."""
    form = FastForest.from_pipeline(pipeline)
    with tempfile.TemporaryDirectory(prefix="ride-duration-serving-") as tmp:
        loaded = FastForest.load(form.save(tmp)[0].parent)  # what a service will read
    worst = loaded.check_against(pipeline, features, tol=1e-9)
    log.info("serving form checked on %d validation rides: max difference %.3g min", len(features), worst)
    return loaded


def provenance_params(training_data: dict) -> dict:
    """Run params naming the data: `train_file`, `train_sha256`, `train_size`, `train_rows`,
    `train_source`, the same for `valid_`."""
    return {
        f"{part}_{key}": training_data[part][key]
        for part in ("train", "valid")
        for key in ("file", "sha256", "size", "rows", "source")
    }


def provenance_tags(training_data: dict | None) -> dict:
    """Searchable run tags: `data.synthetic` (true/false/unknown) and the two file names."""
    if training_data is None:
        return {"data.synthetic": "unknown"}
    return {
        "data.synthetic": str(bool(training_data["synthetic"])).lower(),
        "data.train_file": training_data["train"]["file"],
        "data.valid_file": training_data["valid"]["file"],
    }


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
    settings: Settings,
    register: bool = True,
    promote: bool = False,
    tags: dict | None = None,
) -> LoggedModel:
    import mlflow
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    check_tracking_server(settings.mlflow_tracking_uri)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    experiment = mlflow.set_experiment(settings.experiment_name)
    example = prepare_features([EXAMPLE_RIDE])
    # Our pipeline takes feature dicts (sklearn flavor); MLflow's pyfunc check of the
    # example converts it to a DataFrame first and warns. The services never use pyfunc.
    logging.getLogger("mlflow.models.model").setLevel(logging.ERROR)
    training_data = result.training_data
    if training_data and training_data["synthetic"] and promote:
        log.warning("promoting a model trained on SYNTHETIC data to %s", settings.registry_uri)
    with mlflow.start_run(tags={**provenance_tags(training_data), **(tags or {})}) as run:
        mlflow.log_params({k: v for k, v in PARAMS.items()})
        mlflow.log_params({"n_train": result.n_train, "n_valid": result.n_valid})
        if training_data:
            mlflow.log_params(provenance_params(training_data))
        mlflow.log_metric("rmse_valid", result.rmse_valid)
        info = mlflow.sklearn.log_model(
            result.pipeline,
            name="model",  # MLflow 3: `name=`; `artifact_path=` is deprecated
            signature=infer_signature(example, result.pipeline.predict(example)),
            input_example=example,
            serialization_format="skops",
            skops_trusted_types=TRUSTED_TYPES,
            # Explicit requirements: faster than MLflow's import-scanning inference.
            pip_requirements=_model_requirements(),
            # In the MLmodel file: a service loading the model from S3 alone still sees it.
            metadata={"training_data": training_data} if training_data else None,
        )
        if result.serving_form is not None:
            # Inside the logged model, beside the skops file, before the model is registered:
            # a registered version always has its serving form.
            with tempfile.TemporaryDirectory(prefix="ride-duration-serving-") as tmp:
                result.serving_form.save(tmp)
                MlflowClient().log_model_artifacts(info.model_id, tmp, artifact_path=SERVING_DIR)
    version = None
    if register:
        # The local server registers at once; not waiting keeps MLflow's "Waiting up to 300 seconds" out of logs.
        version = str(mlflow.register_model(info.model_uri, settings.model_name, await_registration_for=0).version)
        # On the version too: the registry UI shows it next to the alias.
        MlflowClient().set_model_version_tag(
            settings.model_name, version, "data.synthetic", provenance_tags(training_data)["data.synthetic"]
        )
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


def course_month(month: int, settings: Settings, allow_synthetic: bool = False, flag: str = "--allow-synthetic"):
    """Green `2021-<month>` (a `data.MonthFile`). Missing without `allow_synthetic`:
    SyntheticDataRefused naming the month, what was tried and what to set."""
    try:
        return locate_month("green", 2021, month, settings=settings, allow_synthetic=allow_synthetic)
    except DataUnavailable as exc:
        if allow_synthetic:
            raise
        raise SyntheticDataRefused(
            f"green 2021-{month:02d} is not available (tried: {'; '.join(exc.tried)}): set TLC_MIRROR "
            f"to a folder or URL prefix holding {filename('green', 2021, month)}, or pass {flag} to train "
            "on a synthetic month whose figures will not match the course's"
        ) from None


def refuse_synthetic(training_data: dict) -> None:
    """SyntheticDataRefused if either file is synthetic (given paths, not fetched months)."""
    for part in ("train", "valid"):
        f = training_data[part]
        if f["synthetic"]:
            raise SyntheticDataRefused(
                f"the {part} file {f['file']} ({f['source']}) is synthetic data: "
                "pass --allow-synthetic to train on it, or give a real TLC month"
            )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the ride duration model and log it to MLflow.")
    parser.add_argument("--train-path", help="parquet path/URL (default: green 2021-01 from the data cache)")
    parser.add_argument("--valid-path", help="parquet path/URL (default: green 2021-02)")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking server (default: MLFLOW_TRACKING_URI or http://127.0.0.1:5000)"
    )
    parser.add_argument("--no-register", action="store_true", help="log the run without registering the model")
    parser.add_argument("--promote", action="store_true", help="point the `production` alias at the new version")
    parser.add_argument(
        "--allow-synthetic",
        action="store_true",
        help="train on synthetic data when a month is missing (or given); refused otherwise. "
        "The run is tagged data.synthetic=true",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = get_settings()
    if args.tracking_uri:
        settings = dataclasses.replace(settings, mlflow_tracking_uri=args.tracking_uri)
    try:
        check_tracking_server(settings.mlflow_tracking_uri)
        train_file = args.train_path or course_month(1, settings, args.allow_synthetic)
        valid_file = args.valid_path or course_month(2, settings, args.allow_synthetic)
        # Before the ~1 min fit: a refusal costs nothing.
        provenance = training_provenance(train_file, valid_file, settings)
        if not args.allow_synthetic:
            refuse_synthetic(provenance)
        result = train(train_file, valid_file, settings)
        print(f"trained on {result.n_train} rides in {result.seconds:.1f} s; rmse_valid = {result.rmse_valid:.3f} min")
        print(describe_training_data(result.training_data))
        if result.training_data["synthetic"]:
            print(
                "WARNING: this model was trained on SYNTHETIC data (--allow-synthetic); "
                "its figures do not match the course's",
                file=sys.stderr,
            )
        logged = log_to_mlflow(result, settings=settings, register=not args.no_register, promote=args.promote)
    except (TrackingServerDown, SyntheticDataRefused, DataUnavailable, ChecksumMismatch, ValueError) as exc:
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


def ensure_production_model(settings: Settings, *, allow_synthetic: bool = False) -> str:
    """Make sure `models:/<name>@<alias>` exists on the tracking server; train on the
    course's months and promote if it does not. Returns the registry URI.

    Lets any notebook run on its own (the registry notebook normally did this).
    Without the real months it refuses (SyntheticDataRefused, saying what to set)
    unless `allow_synthetic=True`: a synthetic model is never promoted silently."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    check_tracking_server(settings.mlflow_tracking_uri)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    try:
        MlflowClient().get_model_version_by_alias(settings.model_name, settings.model_alias)
    except MlflowException:
        january, february = (course_month(m, settings, allow_synthetic, flag="allow_synthetic=True") for m in (1, 2))
        log_to_mlflow(train(january, february, settings), settings=settings, promote=True)
    return settings.registry_uri


if __name__ == "__main__":
    raise SystemExit(main())
