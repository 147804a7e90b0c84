"""The Lambda entry point: `lambda_handler(event, context)`, the model loaded once per container."""

from __future__ import annotations

from ..aws import kinesis_client, s3_client
from ..config import Settings, get_settings
from ..predict import load_serving_model
from .service import ModelService
from .writer import KinesisWriter, S3DeadLetters

_SERVICE: ModelService | None = None


def build_service(settings: Settings, model_uri: str | None = None) -> ModelService:
    """Load the model (`model_uri`, else as configured) in its serving form, the only form the
    Lambda image can load (no scikit-learn, skops or MLflow there); attach the stream writer and
    the dead letters unless TEST_RUN."""
    model, version = load_serving_model(model_uri, settings, serving_form_only=True)
    if settings.test_run:  # no side effects: predictions returned, dead letters only logged
        return ModelService(model, version)
    return ModelService(
        model,
        version,
        [KinesisWriter(settings.predictions_stream, kinesis_client(settings))],
        dead_letters=S3DeadLetters(settings.dead_letter_prefix, s3_client(settings)),
    )


def get_service() -> ModelService:
    """The container's ModelService, built on the first invocation and reused (warm starts)."""
    global _SERVICE
    if _SERVICE is None:
        _SERVICE = build_service(get_settings())  # settings are read here, once per container
    return _SERVICE


def lambda_handler(event, context=None) -> dict:
    """The Lambda entry point (`lambda_function.lambda_handler` in the image)."""
    return get_service().lambda_handler(event, context)
