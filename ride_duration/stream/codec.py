"""Kinesis records in and prediction events out: decoding, checking, encoding.

A record's `kinesis.data` is base64 JSON `{"ride": {...}, "ride_id": ...}`. Anything
that can never be scored raises `BadRecord` with the reason; the service dead-letters it.
"""

from __future__ import annotations

import base64
import binascii
import json

from ..features import prepare_features, show_value

MODEL_LABEL = "ride_duration_prediction_model"  # the course's "model" field of a prediction event
MAX_RIDE_ID_CHARS = 256  # the ride_id becomes the output PartitionKey: 1 to 256 characters
_REASON_CHARS = 300


class BadRecord(ValueError):
    """A Kinesis record that can never be scored: dead-lettered, never retried."""


class InvalidEvent(ValueError):
    """The event is not a Kinesis batch at all (no `Records` list, a record without a sequence number)."""


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def encode_data(payload: dict) -> str:
    """A JSON payload as the base64 text Lambda puts in `kinesis.data`."""
    return base64.b64encode(json.dumps(payload).encode("utf-8")).decode("ascii")


def decode_data(data: str) -> dict:
    """`kinesis.data` (base64 JSON) -> dict; BadRecord with the reason otherwise."""
    if not isinstance(data, str):
        raise BadRecord(f"kinesis.data must be a base64 string, got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRecord(f"kinesis.data is not valid base64: {exc}") from None
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRecord(f"kinesis.data is not JSON: {_short(exc)}") from None
    except RecursionError:
        raise BadRecord("kinesis.data is JSON nested too deeply to read") from None
    except ValueError as exc:  # e.g. an integer past Python's digit limit (4300 digits)
        raise BadRecord(f"kinesis.data cannot be read: {_short(exc)}") from None
    if not isinstance(payload, dict):
        raise BadRecord(f"kinesis.data must be a JSON object, got {type(payload).__name__}")
    return payload


def _check_ride_id(ride_id):
    # It is given back as is and becomes the output PartitionKey (1-256 characters), so it must be a scalar.
    if ride_id is None:
        raise BadRecord("field 'ride_id' is missing")
    if isinstance(ride_id, bool) or not isinstance(ride_id, (int, str)):
        raise BadRecord(f"field 'ride_id' must be a string or an integer, got {show_value(ride_id)}")
    too_long = f"field 'ride_id' must have 1 to {MAX_RIDE_ID_CHARS} characters, got {show_value(ride_id)}"
    # str() of a huge int raises past Python's digit limit; 1024 bits are over 256 digits anyway.
    if isinstance(ride_id, int) and ride_id.bit_length() > 1024:
        raise BadRecord(too_long)
    text = str(ride_id)
    if not 1 <= len(text) <= MAX_RIDE_ID_CHARS:
        raise BadRecord(too_long)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # JSON allows lone surrogates ("\ud800"); a partition key cannot hold them
        raise BadRecord(f"field 'ride_id' is not valid Unicode, got {show_value(ride_id)}") from None
    return ride_id


def decode_record(record: dict) -> tuple[object, dict, dict]:
    """One Lambda Kinesis record -> (ride_id, ride, features); BadRecord if unusable."""
    try:
        data = record["kinesis"]["data"]
    except (KeyError, TypeError):
        raise BadRecord("record has no kinesis.data") from None
    payload = decode_data(data)
    ride_id = _check_ride_id(payload.get("ride_id"))
    if "ride" not in payload:
        raise BadRecord("field 'ride' is missing")
    try:
        (features,) = prepare_features([payload["ride"]])
    except ValueError as exc:
        raise BadRecord(str(exc).replace("ride 0: ", "ride: ", 1)) from None
    return ride_id, payload["ride"], features


def sequence_number(record: dict) -> str | None:
    try:
        return record["kinesis"]["sequenceNumber"]
    except (KeyError, TypeError):
        return None


def _records(event) -> list:
    if not isinstance(event, dict) or not isinstance(event.get("Records"), list):
        raise InvalidEvent("not a Kinesis event: expected an object with a 'Records' list")
    return event["Records"]


def record_source(record: dict) -> dict:
    """The Kinesis record a prediction event answers. A retried batch repeats it (the same record
    again: a duplicate a consumer drops); a second request for the same ride is another record."""
    return {"event_id": record.get("eventID"), "sequence_number": sequence_number(record)}


def prediction_event(ride_id, duration: float, version, source: dict | None = None) -> dict:
    event = {
        "model": MODEL_LABEL,
        "version": version,
        "prediction": {"ride_duration": float(duration), "ride_id": ride_id},
    }
    if source is not None:
        event["source"] = source
    return event
