"""Fixtures for the web service: a real gunicorn process on the session stack,
the real model trained once, and a stack whose tracking server is down."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest

from ride_duration.config import get_settings
from workbench.gunicorn import GunicornServer
from workbench.stack import LocalStack, free_port


@pytest.fixture(scope="session")
def served(stack, trained_model):
    """gunicorn with the repo's config, serving the registry alias of the session stack."""
    with GunicornServer(port=free_port()) as server:
        yield server


@contextmanager
def _environment(values: dict):
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def offline_model(stack, tmp_path_factory, synthetic_months):
    """A model logged on a stack of its own, whose MLflow server is then stopped.

    Yields the env a service needs to load it straight from S3 (MODEL_ID +
    EXPERIMENT_ID), with MLFLOW_TRACKING_URI still pointing at the dead server.
    """
    import mlflow

    from ride_duration.train import log_to_mlflow, train

    ports = {name: free_port() for name in ("s3", "mlflow", "prefect")}
    own = LocalStack(local_dir=tmp_path_factory.mktemp("offline-stack"), ports=ports, quiet=True)
    own.up(("s3", "mlflow"))
    try:
        with _environment(own.env()):
            result = train(
                synthetic_months[(2021, 1)],
                synthetic_months[(2021, 2)],
                params={"n_estimators": 20},
                settings=get_settings(),
            )
            logged = log_to_mlflow(result, promote=True, settings=get_settings())
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # back to the session stack
        own._stop("mlflow")  # only the tracking server: S3 stays up
        assert not own.healthy("mlflow")
        env = {
            **own.env(),
            "MODEL_ID": logged.model_id,
            "EXPERIMENT_ID": logged.experiment_id,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
        }
        yield {"env": env, "logged": logged, "pipeline": result.pipeline, "stack": own}
    finally:
        own.down()
