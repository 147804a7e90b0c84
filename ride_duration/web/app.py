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

import logging
import math

import gevent
from flask import Flask, current_app, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import ClosingIterator

from ..config import get_settings, web_body_timeout
from ..fastmodel import fast_model
from ..predict import load_serving_model
from .payload import (
    MAX_CONTENT_LENGTH,
    MAX_ERROR_LENGTH,
    InvalidRides,
    discard_body,
    parse_json,
    read_body,
    validate_rides,
)

log = logging.getLogger(__name__)

APP_NAME = "duration-prediction"


def _error(message: str, status: int):
    if len(message) > MAX_ERROR_LENGTH:
        message = message[: MAX_ERROR_LENGTH - 3] + "..."
    return jsonify(error=message), status


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
            discard_body(current_app.config["BODY_TIMEOUT"])
        return response, status

    @app.errorhandler(Exception)
    def server_error(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _error("internal error while predicting; see the service log", 500)


def take_turns(wsgi_app):
    """WSGI middleware: once a response is written, the worker's other connections run first.

    A greenlet runs until it blocks, and gevent resumes the ready ones in no fixed order, so
    under load some clients were answered again and again while others waited (the
    benchmark's p99 several times its p50). gunicorn closes a response after writing it;
    `gevent.sleep(0)` there puts this connection behind the others that are ready.
    """

    def app(environ, start_response):
        return ClosingIterator(wsgi_app(environ, start_response), gevent.sleep)

    return app


def new_app(name: str, body_timeout: float | None = None) -> Flask:
    """A Flask app with the service's request handling (limits, deadline, JSON errors), no routes.

    body_timeout: seconds for a request body to arrive (default WEB_BODY_TIMEOUT, 10).
    """
    app = Flask(name)
    app.config["MAX_CONTENT_LENGTH"] = MAX_CONTENT_LENGTH
    app.config["BODY_TIMEOUT"] = web_body_timeout() if body_timeout is None else body_timeout
    app.json.sort_keys = False
    app.wsgi_app = take_turns(app.wsgi_app)  # Flask's documented place for WSGI middleware
    _json_errors(app)

    @app.before_request
    def body_first():
        # Every body, even one we reject, within its deadline: a body left unread
        # would be drained by gunicorn before the connection's next request.
        read_body(app.config["BODY_TIMEOUT"])

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
    app = new_app(APP_NAME)

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
