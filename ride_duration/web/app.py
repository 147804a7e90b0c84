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

import json
import logging
import math

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from ..predict import load_model
from ..utils import FEATURE_FIELDS, prepare_features

log = logging.getLogger(__name__)

APP_NAME = "duration-prediction"
# TLC zone ids: 1..263 are zones, 264/265 are "unknown"/"outside NYC" (taxi_zone_lookup.csv).
LOCATION_MIN, LOCATION_MAX = 1, 265
# Longer than any trip inside the TLC area; bigger values are meter glitches.
MAX_TRIP_DISTANCE = 500.0
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


def _check_ranges(index: int, ride) -> None:
    for field in ("PULocationID", "DOLocationID"):
        value = int(ride[field])
        if not LOCATION_MIN <= value <= LOCATION_MAX:
            raise InvalidRides(
                f"ride {index}: field {field!r} must be a TLC zone id between "
                f"{LOCATION_MIN} and {LOCATION_MAX}, got {value}"
            )
    distance = float(ride["trip_distance"])
    if not 0 <= distance <= MAX_TRIP_DISTANCE:
        raise InvalidRides(
            f"ride {index}: field 'trip_distance' must be between 0 and {MAX_TRIP_DISTANCE:g} miles, got {distance:g}"
        )


def validate_rides(payload) -> tuple[list[dict], bool]:
    """JSON payload -> (feature dicts for the model, whether it was a single ride).

    Types (missing fields, booleans, strings, NaN/Infinity) are checked by
    `prepare_features`, shared with every deployment; ranges are the service's.
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
        for index, ride in enumerate(rides):
            _check_ranges(index, ride)
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
    remaining = min(request.content_length or 0, MAX_DISCARD)
    while stream is not None and remaining > 0:
        chunk = stream.read(min(remaining, 65536))
        if not chunk:
            break
        remaining -= len(chunk)


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
        # Read (at most MAX_CONTENT_LENGTH of) every body, even one we reject:
        # gunicorn 26's gthread worker stalls a keep-alive connection whose
        # previous body was left unread (seen as 5 s hangs under load).
        request.get_data()

    return app


def create_app(model=None, model_version: str | None = None, *, runtime: str = "fast",
               n_jobs: int | None = None, model_uri: str | None = None) -> Flask:
    """The prediction service.

    model: a fitted pipeline; default: `load_model(model_uri)` from the registry
        alias / S3 / MODEL_URI (see `ride_duration.predict.default_model_uri`).
    runtime: "fast" walks the forest with numpy (`ride_duration.fastmodel`, same
        numbers); "sklearn" calls the pipeline (the 2022 course's way).
    n_jobs: set on the forest; only for reproducing the 2022 design (-1).
    """
    if model is None:
        model, loaded_version = load_model(model_uri)
        model_version = model_version or loaded_version
    if n_jobs is not None:
        model[-1].n_jobs = n_jobs
    if runtime == "fast":
        from ..fastmodel import fast_model

        predictor = fast_model(model)
    elif runtime == "sklearn":
        predictor = model
    else:
        raise ValueError(f"runtime must be 'fast' or 'sklearn', got {runtime!r}")
    version = str(model_version or "unknown")
    app = _new_app(APP_NAME)
    app.config.update(MODEL_VERSION=version, RUNTIME=type(predictor).__name__)

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_version=version, runtime=app.config["RUNTIME"])

    @app.post("/predict")
    def predict():
        if not request.is_json:
            return _error(
                f"expected Content-Type: application/json, got {request.mimetype or 'none'!r}", 415
            )
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


def create_hello_app() -> Flask:
    """A hello-world endpoint with the service's app setup: the benchmark's ceiling."""
    app = _new_app("hello")

    @app.get("/health")
    def health():
        return jsonify(status="ok", model_version="hello")

    @app.post("/predict")
    def predict():
        return jsonify(hello="world")

    return app
