"""The course's Lambda function, grown step by step as notebook 04 teaches it.

Each step is a handler AWS could call; only the last one ships:

(a) `constant_handler`: a test event `{"ride": {...}, "ride_id": 123}` typed into the console,
    answered with 10 minutes, whatever the ride: the function works before any model exists;
(b) `print_event_handler`: attached to the Kinesis trigger on `ride_events`, it prints the raw
    event it receives: a batch of records, each ride base64-encoded in `kinesis.data`;
(c) `decode_handler`: decodes every record and answers one prediction event per ride, still 10
    minutes;
(d) the real model writing the prediction events to `ride_predictions` with one `put_records`:
    `ride_duration.stream.lambda_handler` itself (`STEPS["d"]`), the handler that ships.

Steps (a)-(c) are here, outside the package, because no deployment runs them.
"""

from __future__ import annotations

import base64
import json

from ride_duration.features import prepare_features
from ride_duration.stream import lambda_handler
from ride_duration.stream.codec import prediction_event

CONSTANT_MINUTES = 10.0


def predict(features: dict) -> float:
    """Steps (a)-(c) have no model yet: every ride takes 10 minutes."""
    return CONSTANT_MINUTES


def constant_handler(event, context=None) -> dict:
    """(a) One ride in the event itself, as a console test event sends it."""
    ride = event["ride"]
    ride_id = event["ride_id"]
    (features,) = prepare_features([ride])
    return {"ride_duration": predict(features), "ride_id": ride_id}


def print_event_handler(event, context=None) -> None:
    """(b) What the Kinesis trigger delivers, printed (in AWS it lands in CloudWatch Logs)."""
    print(json.dumps(event, indent=2))


def decode_handler(event, context=None) -> dict:
    """(c) Each record's `kinesis.data` is base64 of the producer's bytes: decode, then read the JSON."""
    predictions = []
    for record in event["Records"]:
        ride_event = json.loads(base64.b64decode(record["kinesis"]["data"]).decode("utf-8"))
        (features,) = prepare_features([ride_event["ride"]])
        predictions.append(prediction_event(ride_event["ride_id"], predict(features), version="constant"))
    return {"predictions": predictions}


STEPS = {"a": constant_handler, "b": print_event_handler, "c": decode_handler, "d": lambda_handler}
