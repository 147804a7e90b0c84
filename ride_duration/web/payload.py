"""What a request to the service may carry: its size, its JSON, and the rides in it.

The body is read whole before anything else (at most MAX_CONTENT_LENGTH bytes,
chunked bodies included, within a deadline, all the bytes its Content-Length
announces), parsed without building huge integers, and each ride held to the ride
contract every deployment shares (`features.check_ride`).
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager

import gevent
from flask import request
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge, RequestTimeout

from ..features import prepare_features

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


@contextmanager
def deadline(seconds: float):
    """Reads inside must finish within `seconds`, else werkzeug's 408 RequestTimeout.

    gunicorn's gevent worker bounds a request's headers (`keepalive`) but not its
    body; gevent's Timeout interrupts the greenlet blocked in the body's read.
    """
    timer = gevent.Timeout(seconds)
    try:
        with timer:
            yield
    except gevent.Timeout as exc:
        if exc is not timer:  # someone else's deadline
            raise
        raise RequestTimeout(f"the request body did not arrive within {seconds:g} s") from None


def discard_body(seconds: float) -> None:
    """Read and drop a too-large body (up to MAX_DISCARD bytes, within `seconds`) before answering 413.

    Closing a socket with unread data makes the kernel send a reset, and the
    client then sees "connection reset" instead of our JSON error.
    """
    stream = request.environ.get("wsgi.input")
    length = request.content_length
    remaining = MAX_DISCARD if length is None else min(length, MAX_DISCARD)  # None: chunked, read to its end
    try:
        with deadline(seconds):
            while stream is not None and remaining > 0:
                chunk = stream.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
    except (OSError, ValueError, HTTPException):  # client gone or too slow
        pass


def read_body(seconds: float) -> None:
    """Read the whole body first, within `seconds` (else 408), at most
    MAX_CONTENT_LENGTH bytes (else 413), all that its Content-Length announced (else 400).

    A chunked body has no Content-Length; werkzeug then stops at the limit and
    keeps what it read, so a too-large body would be cut and answered. Read one
    byte more than the limit to tell. A body cut short by the client's half-close
    reads as what arrived (gunicorn does not check it), which could be valid JSON.
    """
    environ = request.environ
    with deadline(seconds):
        if request.content_length is None and environ.get("wsgi.input_terminated"):
            body = environ["wsgi.input"].read(MAX_CONTENT_LENGTH + 1)
            if len(body) > MAX_CONTENT_LENGTH:
                raise RequestEntityTooLarge()
            environ["wsgi.input"], environ["CONTENT_LENGTH"] = io.BytesIO(body), str(len(body))
        body = request.get_data(cache=True)
    announced = request.content_length
    if announced is not None and len(body) < announced:
        raise BadRequest(
            f"the request body ended after {len(body)} of the {announced} bytes its Content-Length announced"
        )
