"""The Flask app: one model loaded at start, `POST /predict`, `GET /health`.

Contract (unchanged since the 2022 course's `predict.py`):

    POST /predict  {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}
    -> 200 {"duration": 18.24, "model_version": "<MLflow run id>"}

A JSON list of rides answers a list of such objects, in the same order, from
one model call. Fields other than the three features are ignored on purpose:
producers add fields over time (pickup time, vendor, ...) and an old service
must keep answering them. Every error is `{"error": "<sentence>"}` with a 4xx
status; bad input never reaches the model and never yields a 5xx.
"""

from __future__ import annotations

import io
import json
import logging
import math

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from ..config import get_settings
from ..fastmodel import fast_model
from ..features import prepare_features
from ..predict import load_serving_model

log = logging.getLogger(__name__)

APP_NAME = "duration-prediction"
MAX_RIDES = 1000  # per request; a bigger backfill belongs to the batch job
MAX_CONTENT_LENGTH = 128 * 1024  # bytes: MAX_RIDES rides of ~100 bytes fit
MAX_DISCARD = 8 * 1024 * 1024  # a bigger body is cut off (the client sees a reset)
MAX_ERROR_LENGTH = 300  # a hostile payload must not be echoed back in full
MAX_INT_DIGITS = 20


class InvalidRides(ValueError):
    """The payload is JSON but not one ride or a list of rides we can predict."""


def _parse_int(text: str) -> int:
    # json would build a 4000-digit int; no field needs more than 20 digits.
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer {text[:MAX_INT_DIGITS]}... is too large")
    return int(text)


def parse_json(body: bytes):
    """Body bytes -> Python value, with every parse failure as an InvalidRides."""
    if not body.strip():
        raise InvalidRides("the request body is empty; send a JSON ride object or a list of rides")
    try:
        return json.loads(body, parse_int=_parse_int)
    except RecursionError:
        raise InvalidRides("the request body is nested too deeply to be a ride") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidRides(f"the request body is not valid JSON: {exc}") from None


def validate_rides(payload) -> tuple[list[dict], bool]:
    """JSON payload -> (feature dicts for the model, whether it was a single ride).

    Each ride is held to the ride contract every deployment shares
    (`ride_duration.features.check_ride`: types, zone ids, distance range).
    """
    single = isinstance(payload, dict)
    rides = [payload] if single else payload
    if not isinstance(rides, list):
        raise InvalidRides(f"expected a ride object or a list of rides, got a JSON {type(payload).__name__}")
    if not rides:
        raise InvalidRides("expected at least one ride, got an empty list")
    if len(rides) > MAX_RIDES:
        raise InvalidRides(f"at most {MAX_RIDES} rides per request, got {len(rides)}")
    try:
        features = prepare_features(rides)
    except RecursionError:
        raise InvalidRides("a ride field is nested too deeply") from None
    except (ValueError, OverflowError) as exc:
        message = str(exc)
        if single:  # "ride 0: field ..." reads oddly for a single object
            message = message.removeprefix("ride 0: ")
        raise InvalidRides(message) from None
    return features, single


def _error(message: str, status: int):
    if len(message) > MAX_ERROR_LENGTH:
        message = message[: MAX_ERROR_LENGTH - 3] + "..."
    return jsonify(error=message), status


def _discard_body() -> None:
    """Read and drop a too-large body (up to MAX_DISCARD bytes) before answering 413.

    Closing a socket with unread data makes the kernel send a reset, and the
    client then sees "connection reset" instead of our JSON error.
    """
    stream = request.environ.get("wsgi.input")
    length = request.content_length
    remaining = MAX_DISCARD if length is None else min(length, MAX_DISCARD)  # None: chunked, read to its end
    try:
        while stream is not None and remaining > 0:
            chunk = stream.read(min(remaining, 65536))
            if not chunk:
                break
            remaining -= len(chunk)
    except (OSError, ValueError, HTTPException):  # client gone or too slow (the worker's body deadline)
        pass


def _read_body() -> None:
    """Read the whole body first, at most MAX_CONTENT_LENGTH bytes, else 413.

    A chunked body has no Content-Length; werkzeug then stops at the limit and
    keeps what it read, so a too-large body would be cut and answered. Read one
    byte more than the limit to tell.
    """
    environ = request.environ
    if request.content_length is None and environ.get("wsgi.input_terminated"):
        body = environ["wsgi.input"].read(MAX_CONTENT_LENGTH + 1)
        if len(body) > MAX_CONTENT_LENGTH:
            raise RequestEntityTooLarge()
        environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
    request.get_data()


def _json_errors(app: Flask) -> None:
    """404/405/413/415/... as JSON, and no HTML stack trace for anything else."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        messages = {
            404: f"no such endpoint {request.path!r}; use POST /predict or GET /health",
            405: f"method {request.method} is not allowed on {request.path}",
            413: f"the request body is larger than {MAX_CONTENT_LENGTH} bytes",
        }
        response, status = _error(messages.get(exc.code, exc.description or exc.name), exc.code or 500)
        if exc.code == 405 and exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        if exc.code == 413:
            _discard_body()
        if exc.code in (408, 413):  # the rest of the body is unread: no keep-alive (the worker honours this)
            response.headers["Connection"] = "close"
        return response, status

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error("internal error while predicting; see the service log", 500)


def _new_app(name: str) -> Flask:
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = MAX_CONTENT_LENGTH
    app.json.sort_keys = False
    _json_errors(app)

    @app.before_request
    def read_body():
        # Every body, even one we reject: a body left unread would be drained by
        # gunicorn before the connection's next request (and stalled gthread).
        _read_body()

    return app


def create_app(model=None, model_version: str | None = None, *, model_uri: str | None = None) -> Flask:
    """The prediction service (gunicorn's `ride_duration.web:create_app()`).

    model: a fitted pipeline (tests, notebooks); default: loaded once, here, from
        `model_uri`, else as configured (MODEL_URI > MODEL_ID + EXPERIMENT_ID > the
        registry alias; settings are read here, once per worker).
    The pipeline answers through `fast_model` (the numpy forest walk, same numbers).
    """
    if model is None:
        model, loaded_version = load_serving_model(model_uri, get_settings())
        model_version = model_version or loaded_version
    predictor = fast_model(model)
    version = str(model_version or "unknown")
    # What the model was trained on (files, sha256, synthetic or real), set by load_model; None if unknown.
    training_data = getattr(model, "training_data", None)
    app = _new_app(APP_NAME)

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_version=version, training_data=training_data)

    @app.post("/predict")
    def predict():
        if not request.is_json:
            return _error(f"expected Content-Type: application/json, got {request.mimetype or 'none'!r}", 415)
        try:
            features, single = validate_rides(parse_json(request.get_data()))
        except InvalidRides as exc:
            return _error(str(exc), 400)
        # One model call for the whole list.
        durations = [float(d) for d in predictor.predict(features)]
        if any(not math.isfinite(d) for d in durations):
            raise RuntimeError("the model returned a non-finite duration")
        answers = [{"duration": d, "model_version": version} for d in durations]
        return jsonify(answers[0] if single else answers)

    return app
