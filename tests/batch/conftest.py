"""The batch tests run on the session's stack (S3 + MLflow, tests/conftest.py) plus
a Prefect server started in the same folder on the port that stack reserved, so
`LocalStack.from_settings()` (the notebooks' first cell, in a papermill kernel)
finds exactly this stack through STACK_*_PORT and LOCAL_DIR. The session stack's
`down()` stops Prefect with the rest. Prefect's settings point at this server
before any flow runs: the Prefect 3 ephemeral API is never used."""

from __future__ import annotations

import os

import pytest

from workbench.stack import LocalStack

INPUT_BUCKET = "tlc-input-test"


@pytest.fixture(scope="package")
def batch_stack(stack):
    saved = dict(os.environ)
    LocalStack(local_dir=stack.local_dir, ports=stack.ports, quiet=True).up(("prefect",))
    try:
        stack.activate()
        os.environ.update(
            LOCAL_DIR=str(stack.local_dir),
            **{f"STACK_{name.upper()}_PORT": str(port) for name, port in stack.ports.items()},
            PREFECT_LOGGING_LEVEL="WARNING",
            TLC_SYNTHETIC_FALLBACK="0",
        )
        os.environ.pop("BATCH_INPUT_PREFIX", None)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
            yield stack
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="package")
def batch_model(batch_stack, trained_model):
    """The session's reference model (synthetic months), registered as production."""
    return trained_model["logged"]


@pytest.fixture(scope="package")
def s3_input(batch_stack, synthetic_months):
    """The synthetic months in an S3 'TLC' bucket; BATCH_INPUT_PREFIX points at it."""
    from ride_duration.aws import s3_client
    from ride_duration.config import get_settings

    s3 = s3_client(get_settings())
    s3.create_bucket(Bucket=INPUT_BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    for path in synthetic_months.values():
        s3.upload_file(str(path), INPUT_BUCKET, f"trip-data/{path.name}")
    prefix = f"s3://{INPUT_BUCKET}/trip-data"
    os.environ["BATCH_INPUT_PREFIX"] = prefix
    yield prefix
    os.environ.pop("BATCH_INPUT_PREFIX", None)
