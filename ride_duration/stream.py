"""The streaming deployment: a Lambda function on a Kinesis stream.

AWS invokes `lambda_handler(event, context)` with a batch of up to 100 Kinesis
records (`event["Records"][i]["kinesis"]["data"]` is base64 JSON
`{"ride": {...}, "ride_id": ...}`). The handler predicts every valid ride with
ONE model call and writes one prediction event per ride to the predictions
stream with `put_records` (not one `put_record` per ride, as in 2022).

One record's fault never costs another record its prediction. AWS's contract
for Kinesis event sources, followed here:
- a record that can never be scored (not base64, not JSON, JSON nested too
  deep or with an int past Python's digit limit, a bad `ride_id`, a ride
  outside the contract of `utils.check_ride`, a ride the model fails on) is
  written ONCE to the dead-letter location, `DEAD_LETTER_URI` (default
  `s3://<PREDICTIONS_BUCKET>/dead-letter/<INPUT_STREAM_NAME>/`), one object per
  record at `<shardId>/<sequenceNumber>.json` (a retried batch overwrites it),
  with the record's `kinesis` fields as received, the reason and the time; it
  is NOT retried, so it is not in `batchItemFailures`;
- a transient fault (prediction events still refused by `put_records` after
  the retries, a dead letter that could not be written) is reported in AWS's
  partial batch response `batchItemFailures` (enable ReportBatchItemFailures
  on the mapping): the record it hit and every record after it, since AWS
  retries from the lowest reported sequence number anyway; the handler does no
  work past that record, so retries repeat as little as possible;
- a model that is unavailable (it cannot load, or fails on a known-good ride)
  fails the invocation: AWS retries the whole batch.
If the batch's model call raises, each ride is predicted alone, so a ride the
model cannot handle is dead-lettered and the others are still predicted.

Seams, as in the 2022 "best practices" module:
- `ModelService(model, version, callbacks, dead_letters=None)`: the handler
  logic; `callbacks` receive the prediction events (e.g. a `KinesisWriter`),
  `dead_letters(record, reason)` stores an unscorable record (`S3DeadLetters`;
  without one it is only logged and listed in the response's `deadLetters`),
  so the handler is testable without a stream, the writer without a model.
- module-level state is only the once-per-container cache (`get_service`).

Locally, without AWS or Docker (`python -m ride_duration.stream ...`):
- `run`: an event-source runner reproducing AWS's Kinesis event source
  mapping with ReportBatchItemFailures (see `EventSourceRunner`): a batch
  that reports failures is checkpointed just before its lowest failed
  sequence number and retried from that record on, later successes included;
  an empty, null or unknown `itemIdentifier`, or a handler that raises, fails
  the whole batch; after `--max-retries` retries the failed part goes to the
  on-failure destination (an S3 object under `failures/`) and the runner moves
  on. The checkpoint names the stream's incarnation (ARN + creation time): a
  stream created again under the same name (a restart of the local Kinesis),
  or a checkpoint beyond the shard's last record, is read from TRIM_HORIZON
  with a warning, never skipped;
- `invoke-server`: the Lambda Runtime Interface Emulator's invoke endpoint,
  `POST /2015-03-31/functions/function/invocations`, on port 8080.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .config import Settings, get_settings
from .features import prepare_features, show_value

log = logging.getLogger(__name__)

MODEL_LABEL = "ride_duration_prediction_model"  # the course's "model" field of a prediction event
PUT_RECORDS_LIMIT = 500  # Kinesis: at most 500 entries per PutRecords call
MAX_BATCH_SIZE = 100  # the event source mapping's default BatchSize for Kinesis
FAILURE_PREFIX = "failures"
LOCAL_ACCOUNT = "000000000000"  # moto's account id
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
MAX_RIDE_ID_CHARS = 256  # the ride_id becomes the output PartitionKey: 1 to 256 characters
# The course's example ride: a model that cannot predict it is broken, not the batch's rides.
KNOWN_GOOD_FEATURES = {"PU_DO": "130_205", "trip_distance": 3.66}
_REASON_CHARS = 300


class BadRecord(ValueError):
    """A Kinesis record that can never be scored: dead-lettered, never retried."""


class InvalidEvent(ValueError):
    """The event is not a Kinesis batch at all (no `Records` list, a record without a sequence number)."""


class PutRecordsFailed(RuntimeError):
    """Some prediction events could not be written after the bounded retries;
    `failed` holds their positions in the list the writer was given."""

    def __init__(self, message: str, failed=()):
        super().__init__(message)
        self.failed = sorted(failed)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


# ---------------------------------------------------------------------------- encoding
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


def prediction_event(ride_id, duration: float, version) -> dict:
    return {
        "model": MODEL_LABEL,
        "version": version,
        "prediction": {"ride_duration": float(duration), "ride_id": ride_id},
    }


# ---------------------------------------------------------------------------- writing
class KinesisWriter:
    """Callback writing prediction events with PutRecords (<= 500 per call).

    PutRecords is not all-or-nothing: the response can report some entries
    failed (`FailedRecordCount`, per-entry `ErrorCode`, e.g. throttling). Those
    entries, and only those, are re-sent with exponential backoff; if any still
    fail after `max_attempts`, `PutRecordsFailed` names them (and every event of
    the chunks not tried yet), so the handler reports them to AWS for a retry
    (at-least-once, never silently lost).
    """

    def __init__(
        self,
        stream_name: str,
        client=None,
        *,
        max_attempts: int = 5,
        base_delay: float = 0.1,
        max_delay: float = 2.0,
        sleep=time.sleep,
    ):
        if client is None:
            from .aws import kinesis_client

            client = kinesis_client()
        self.stream_name = stream_name
        self.client = client
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.sleep = sleep
        self.calls = 0  # PutRecords calls made (the benchmark reports it)

    def __call__(self, events: list[dict]) -> None:
        entries = [
            {"Data": json.dumps(e).encode("utf-8"), "PartitionKey": str(e["prediction"]["ride_id"])} for e in events
        ]
        for start in range(0, len(entries), PUT_RECORDS_LIMIT):
            try:
                self._put(entries[start : start + PUT_RECORDS_LIMIT])
            except PutRecordsFailed as exc:
                later = range(start + PUT_RECORDS_LIMIT, len(entries))  # not tried: failed as well
                raise PutRecordsFailed(str(exc), [start + i for i in exc.failed] + list(later)) from None

    def _put(self, entries: list[dict]) -> None:
        pending = list(enumerate(entries))  # (position in `entries`, entry)
        for attempt in range(1, self.max_attempts + 1):
            response = self.client.put_records(StreamName=self.stream_name, Records=[e for _, e in pending])
            self.calls += 1
            if not response.get("FailedRecordCount"):
                return
            results = response["Records"]  # same order as the request
            failed = [item for item, result in zip(pending, results) if result.get("ErrorCode")]
            errors = Counter(result["ErrorCode"] for result in results if result.get("ErrorCode"))
            log.warning(
                "put_records to %s: %d of %d entries failed (%s), attempt %d of %d",
                self.stream_name,
                len(failed),
                len(pending),
                dict(errors),
                attempt,
                self.max_attempts,
            )
            pending = failed
            if attempt < self.max_attempts:
                # Full jitter, so many throttled writers do not retry in lockstep.
                self.sleep(random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1))))
        raise PutRecordsFailed(
            f"{len(pending)} of {len(entries)} prediction events could not be written to stream "
            f"{self.stream_name!r} after {self.max_attempts} attempts ({dict(errors)})",
            [position for position, _ in pending],
        )


class S3DeadLetters:
    """Stores each record that can never be scored in S3, one object per record.

    Key `<prefix><shardId>/<sequenceNumber>.json`: the record's own position,
    so a batch retried after a transient fault overwrites the object rather
    than adding a second one. Body: the reason, the time, and the record as
    received (`kinesis` fields with `data` still base64, `eventID`,
    `eventSourceARN`). A failed write raises: the handler reports the record
    for a retry, it is not lost.
    """

    def __init__(self, uri: str, client=None):
        from .aws import s3_client, split_s3_uri

        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.client = client or s3_client()

    def key(self, record: dict) -> str:
        # eventID is "<shardId>:<sequenceNumber>"; keep keys to safe characters whatever a hand-made event holds.
        shard = str(record.get("eventID") or "").partition(":")[0] or "unknown-shard"
        seq = str(record["kinesis"]["sequenceNumber"])
        safe = [re.sub(r"[^A-Za-z0-9_-]", "_", part)[:128] for part in (shard, seq)]
        return f"{self.prefix}{safe[0]}/{safe[1]}.json"

    def __call__(self, record: dict, reason: str) -> str:
        body = {
            "reason": reason,
            "time": datetime.now(UTC).isoformat(),
            "eventID": record.get("eventID"),
            "eventSourceARN": record.get("eventSourceARN"),
            "kinesis": record["kinesis"],
        }
        key = self.key(record)
        self.client.put_object(
            Bucket=self.bucket,
            Key=key,
            ContentType="application/json",
            Body=json.dumps(body, indent=1, default=str).encode("utf-8"),
        )
        return f"s3://{self.bucket}/{key}"


def read_dead_letters(uri: str, client=None) -> list[dict]:
    """The dead letters under an `s3://bucket/prefix/` (e.g. `Settings.dead_letter_prefix`), in key order
    (shard, then sequence number); each with its `uri`."""
    from .aws import s3_client, split_s3_uri

    client = client or s3_client()
    bucket, prefix = split_s3_uri(uri)
    letters = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            letters.append({"uri": f"s3://{bucket}/{obj['Key']}", **body})
    return letters


# ---------------------------------------------------------------------------- the service
@dataclass
class _Item:
    """One record on its way through the handler."""

    seq: str
    record: dict
    ride_id: object = None
    features: dict | None = None
    reason: str | None = None  # why it can never be scored: it is dead-lettered
    event: dict | None = None  # its prediction event
    dead_letter: str | None = None  # where it was dead-lettered


def _read(index: int, record) -> _Item:
    seq = sequence_number(record)
    if seq is None:
        # Without an identifier the record can be neither dead-lettered nor retried alone.
        raise InvalidEvent(f"record {index} has no kinesis.sequenceNumber: not a Kinesis record")
    item = _Item(seq, record)
    try:
        item.ride_id, _, item.features = decode_record(record)
    except BadRecord as exc:
        item.reason = str(exc)
    except Exception as exc:  # noqa: BLE001  decoding depends on the record alone: it would fail on every retry
        item.reason = f"record cannot be read: {type(exc).__name__}: {_short(exc)}"
    return item


class ModelService:
    """The Lambda's logic, independent of where the model and the events come from.

    `model` needs only `.predict(list_of_feature_dicts)`; `callbacks` are called
    with the list of prediction events (after prediction, before returning);
    `dead_letters(record, reason)` stores a record that can never be scored and
    returns where (see `S3DeadLetters`; None: only logged).
    """

    def __init__(self, model, version, callbacks=(), dead_letters=None):
        self.model = model
        self.version = version
        self.callbacks = list(callbacks)
        self.dead_letters = dead_letters

    def predict(self, features: list[dict]) -> np.ndarray:
        if not features:
            return np.empty(0)
        durations = np.asarray(self.model.predict(features), dtype=float)
        if durations.shape != (len(features),):
            raise ValueError(f"the model returned {durations.size} prediction(s) for {len(features)} ride(s)")
        return durations

    def lambda_handler(self, event, context=None) -> dict:
        items = [_read(i, record) for i, record in enumerate(_records(event))]
        self._predict([item for item in items if item.reason is None])
        # A transient fault at a record sends it and every later record back to AWS for a retry.
        retry_from = self._dead_letter(items)
        retry_from = min(retry_from, self._write(items[:retry_from]))
        done = items[:retry_from]
        response = {"predictions": [item.event for item in done if item.event]}
        dead = [{"itemIdentifier": i.seq, "reason": i.reason, "location": i.dead_letter} for i in done if i.reason]
        if dead:
            response["deadLetters"] = dead  # not part of AWS's contract: for people reading the response
        if retry_from < len(items):
            # AWS's partial batch response (needs ReportBatchItemFailures on the mapping).
            response["batchItemFailures"] = [{"itemIdentifier": item.seq} for item in items[retry_from:]]
        return response

    def _predict(self, items: list[_Item]) -> None:
        """One model call for the batch. If it raises: a model that also fails on a known-good
        ride is broken (the exception fails the invocation, AWS retries the batch); otherwise
        each ride is predicted alone and the rides the model fails on are dead-lettered."""
        if not items:
            return
        try:
            durations = self.predict([item.features for item in items])
        except Exception as exc:  # noqa: BLE001  a ride's or the model's fault: told apart below
            log.warning(
                "the model failed on a batch of %d ride(s) (%s: %s); predicting them one at a time",
                len(items),
                type(exc).__name__,
                _short(exc),
            )
            self.predict([KNOWN_GOOD_FEATURES])
            durations = [self._predict_one(item) for item in items]
        for item, duration in zip(items, map(float, durations)):
            if item.reason is not None:
                continue
            if math.isfinite(duration):
                item.event = prediction_event(item.ride_id, duration, self.version)
            else:  # not JSON, and no duration at all
                item.reason = f"the model predicted {duration!r} minutes for this ride"

    def _predict_one(self, item: _Item) -> float:
        try:
            return float(self.predict([item.features])[0])
        except Exception as exc:  # noqa: BLE001  the model works (known-good ride): this ride is at fault
            item.reason = f"the model failed on this ride: {type(exc).__name__}: {_short(exc)}"
            return math.nan

    def _dead_letter(self, items: list[_Item]) -> int:
        """Store the unscorable records in order; the position of the first one that could
        not be stored (a transient fault: it is retried), else len(items)."""
        for position, item in enumerate(items):
            if item.reason is None:
                continue
            if self.dead_letters is not None:
                try:
                    item.dead_letter = self.dead_letters(item.record, item.reason)
                except Exception as exc:  # noqa: BLE001  transient: the record is retried, not lost
                    log.warning(
                        "record %d (sequenceNumber %s): its dead letter could not be written (%s: %s); "
                        "the batch is retried from it",
                        position,
                        item.seq,
                        type(exc).__name__,
                        _short(exc),
                    )
                    return position
            log.warning(
                "record %d (sequenceNumber %s) dead-lettered%s: %s",
                position,
                item.seq,
                f" to {item.dead_letter}" if item.dead_letter else " (no dead-letter location: logged only)",
                item.reason,
            )
        return len(items)

    def _write(self, items: list[_Item]) -> int:
        """Hand the prediction events to the callbacks; the position of the first event the
        writer could not write (it is retried), else len(items). Other errors fail the invocation."""
        positions = [position for position, item in enumerate(items) if item.event]
        events = [items[position].event for position in positions]
        if not events:
            return len(items)
        for callback in self.callbacks:
            try:
                callback(events)
            except PutRecordsFailed as exc:
                log.warning("%s; the batch is retried from the first of them", exc)
                return positions[exc.failed[0]] if exc.failed else positions[0]
        return len(items)


class ConstantModel:
    """The course's first Lambda: every ride takes 10 minutes. Shows the plumbing without a model."""

    def __init__(self, minutes: float = 10.0):
        self.minutes = minutes

    def predict(self, features):
        return np.full(len(features), self.minutes)


def constant_handler(event, context=None) -> dict:
    """The 2022 course's first handler (constant 10 minutes), without writing anywhere."""
    return ModelService(ConstantModel(10.0), version="constant").lambda_handler(event, context)


def per_record_handler(event, model, version, client, stream_name: str) -> dict:
    """The 2022 design, kept to measure against: one predict and one put_record per record."""
    events = []
    for record in _records(event):
        ride_id, ride, _ = decode_record(record)
        duration = float(model.predict(prepare_features(ride))[0])
        out = prediction_event(ride_id, duration, version)
        client.put_record(StreamName=stream_name, Data=json.dumps(out), PartitionKey=str(ride_id))
        events.append(out)
    return {"predictions": events}


# ---------------------------------------------------------------------------- once per container
_SERVICE: ModelService | None = None


def build_service(settings: Settings | None = None, model_uri: str | None = None) -> ModelService:
    """Load the model (registry alias or S3, from env); attach the stream writer and the dead letters unless TEST_RUN."""
    from .registry import load_model

    settings = settings or get_settings()
    model, version = load_model(model_uri, settings=settings)
    if settings.test_run:  # no side effects: predictions returned, dead letters only logged
        return ModelService(model, version)
    return ModelService(
        model,
        version,
        [KinesisWriter(settings.predictions_stream)],
        dead_letters=S3DeadLetters(settings.dead_letter_prefix),
    )


def get_service() -> ModelService:
    """The container's ModelService, built on the first invocation and reused (warm starts)."""
    global _SERVICE
    if _SERVICE is None:
        _SERVICE = build_service()
    return _SERVICE


def lambda_handler(event, context=None) -> dict:
    """The Lambda entry point (`lambda_function.lambda_handler` in the image)."""
    return get_service().lambda_handler(event, context)


# ---------------------------------------------------------------------------- event source runner
def _epoch(value) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value)


def lambda_record(record: dict, shard_id: str, stream_arn: str, region: str) -> dict:
    """A GetRecords record -> the record shape Lambda receives from Kinesis."""
    account = stream_arn.split(":")[4] if stream_arn.count(":") >= 5 else LOCAL_ACCOUNT
    seq = record["SequenceNumber"]
    return {
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": record["PartitionKey"],
            "sequenceNumber": seq,
            "data": base64.b64encode(record["Data"]).decode("ascii"),
            "approximateArrivalTimestamp": _epoch(record["ApproximateArrivalTimestamp"]),
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": f"{shard_id}:{seq}",
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": f"arn:aws:iam::{account}:role/lambda-kinesis-role",
        "awsRegion": region,
        "eventSourceARN": stream_arn,
    }


def kinesis_event(
    payloads: list, stream_name: str = "ride_events", region: str = "eu-west-1", first_sequence: int = 1
) -> dict:
    """A Lambda Kinesis event by hand: one record per payload (dict -> JSON, bytes as is),
    sequence numbers first_sequence, first_sequence + 1, ... on shardId-000000000000."""
    arn = f"arn:aws:kinesis:{region}:{LOCAL_ACCOUNT}:stream/{stream_name}"
    records = []
    for i, payload in enumerate(payloads):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        raw = {
            "SequenceNumber": str(first_sequence + i),
            "PartitionKey": str(i),
            "Data": data,
            "ApproximateArrivalTimestamp": 1654161514.132,
        }
        records.append(lambda_record(raw, "shardId-000000000000", arn, region))
    return {"Records": records}


def stream_identity(summary: dict) -> dict:
    """A stream's incarnation, from `describe_stream_summary`: a stream deleted and created
    again under the same name (a restart of the local Kinesis) keeps its ARN, not its
    creation time, and numbers its records from the start again."""
    created = summary["StreamCreationTimestamp"]
    if isinstance(created, datetime):
        created = created.astimezone(UTC).isoformat()
    return {"arn": summary["StreamARN"], "created": str(created)}


class Checkpoint:
    """Last processed sequence number per shard of one stream, in a JSON file replaced atomically.

    The file also names the stream the positions belong to (`stream_identity`):
    positions of an earlier incarnation of the stream would skip new records.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.positions: dict[str, str] = {}
        self.stream: dict | None = None  # None: not known yet (a new file, or one written before it was kept)
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.positions = dict(data["shards"])
                self.stream = data.get("stream")
                if self.stream is not None and not isinstance(self.stream, dict):
                    raise TypeError("'stream' must be an object")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(
                    f"checkpoint file {self.path} is unreadable ({exc}); "
                    "delete it (or pass --reset) to start at TRIM_HORIZON"
                ) from None

    def get(self, shard_id: str) -> str | None:
        return self.positions.get(shard_id)

    def bind(self, stream: dict) -> bool:
        """The positions are for `stream`; those of another incarnation are forgotten (with a
        warning). True when they were."""
        if self.stream == stream:
            return False
        stale = self.stream is not None and bool(self.positions)
        if stale:
            log.warning(
                "checkpoint %s holds positions of stream %s created %s, but the stream now was created %s "
                "(deleted and created again, e.g. the local Kinesis restarted): they are forgotten and "
                "every shard is read from TRIM_HORIZON",
                self.path,
                self.stream.get("arn"),
                self.stream.get("created"),
                stream["created"],
            )
            self.positions = {}
        self.stream = stream
        if self.path.is_file():
            self._write()
        return stale

    def save(self, shard_id: str, seq: str) -> None:
        self.positions[shard_id] = seq
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temp file in the same folder, fsync, rename: a kill leaves the old or the new file, never half.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"stream": self.stream, "shards": self.positions}, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def reset(self) -> None:
        self.positions = {}
        self.path.unlink(missing_ok=True)

    def move_to(self, positions: dict) -> None:
        """Start after these {shard_id: sequence_number} (e.g. `stream_positions` = the stream's end now)."""
        self.reset()
        for shard_id, seq in positions.items():
            if seq:
                self.save(shard_id, seq)


def default_checkpoint_path(stream_name: str, settings: Settings | None = None) -> Path:
    settings = settings or get_settings()
    return settings.local_dir / "stream" / f"checkpoint-{stream_name}.json"


@dataclass
class RunStats:
    batches: int = 0
    records: int = 0
    invocations: int = 0
    dead_letters: int = 0  # records the function dead-lettered (its response's `deadLetters`)
    failed_records: int = 0  # records sent to the on-failure destination
    failure_objects: list = field(default_factory=list)


class EventSourceRunner:
    """What AWS's Kinesis event source mapping does, against the local Kinesis,
    with ReportBatchItemFailures on, BisectBatchOnFunctionError off.

    - polls every shard with GetRecords (Limit = batch_size), starting at
      TRIM_HORIZON, or AFTER_SEQUENCE_NUMBER the checkpointed one;
    - invokes `handler(event, None)` with Lambda's Kinesis event shape;
    - checkpoints the last sequence number of a batch that succeeded: no
      exception and no (or an empty) `batchItemFailures`;
    - partial failure, exactly as AWS: checkpoints just before the LOWEST
      failed sequence number and retries the batch from that record on,
      re-sending the successes after it too; an empty, null or unknown
      `itemIdentifier` or a handler that raises fails the whole batch;
    - after `max_retries` retries, writes the part still failing to the
      on-failure destination (an S3 object under `failures/`: AWS's
      `requestContext` + `KinesisBatchInfo`, plus the records) and moves on.

    Delivery is at-least-once, as on AWS: the output is written before the
    checkpoint, so a kill between the two re-processes that batch on restart.

    The checkpoint is bound to the stream's incarnation (`stream_identity`), at
    start and whenever the runner is idle: a stream created again under the
    same name, or a checkpoint beyond the last record of its shard (or not a
    sequence number of it), is read from TRIM_HORIZON with a warning.
    """

    def __init__(
        self,
        handler,
        stream_name: str,
        *,
        client=None,
        s3=None,
        checkpoint: Checkpoint | None = None,
        failure_bucket: str | None = None,
        batch_size: int = MAX_BATCH_SIZE,
        max_retries: int = 2,
        poll_interval: float = 1.0,
        pause: float = 0.0,
        settings: Settings | None = None,
        sleep=time.sleep,
    ):
        from .aws import kinesis_client, s3_client

        settings = settings or get_settings()
        if not 1 <= batch_size <= 10000:
            raise ValueError("batch_size must be between 1 and 10000")
        self.handler = handler
        self.stream_name = stream_name
        self.client = client or kinesis_client(settings)
        self.s3 = s3 or s3_client(settings)
        self.checkpoint = checkpoint or Checkpoint(default_checkpoint_path(stream_name, settings))
        self.failure_bucket = failure_bucket or settings.predictions_bucket
        self.batch_size = batch_size
        self.max_retries = max_retries
        self.poll_interval = poll_interval
        self.pause = pause
        self.sleep = sleep
        self.region = settings.aws_region
        self.stream_arn = None
        self._follow_stream()
        self.stats = RunStats()

    # -- positions
    def _follow_stream(self) -> bool:
        """Bind the checkpoint to the stream as it is now; True if it is a new incarnation."""
        summary = self.client.describe_stream_summary(StreamName=self.stream_name)["StreamDescriptionSummary"]
        self.stream_arn = summary["StreamARN"]
        return self.checkpoint.bind(stream_identity(summary))

    def _iterator(self, shard_id: str) -> str:
        seq = self.checkpoint.get(shard_id)
        kwargs = {"ShardIteratorType": "TRIM_HORIZON"}
        if seq:
            problem = self._checkpoint_problem(shard_id, seq)
            if problem is None:
                kwargs = {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": seq}
            else:
                log.warning(
                    "checkpoint %s: %s of stream %s: %s; reading the shard from TRIM_HORIZON",
                    self.checkpoint.path,
                    shard_id,
                    self.stream_name,
                    problem,
                )
        return self.client.get_shard_iterator(StreamName=self.stream_name, ShardId=shard_id, **kwargs)["ShardIterator"]

    def _checkpoint_problem(self, shard_id: str, seq: str) -> str | None:
        """Why reading after `seq` would skip records, or None. The checkpointed record (or, if it
        expired, a later one) must still be on the shard: a number beyond the shard's last record
        or from another stream would hide every new record up to it."""
        from botocore.exceptions import ClientError

        try:
            iterator = self.client.get_shard_iterator(
                StreamName=self.stream_name,
                ShardId=shard_id,
                ShardIteratorType="AT_SEQUENCE_NUMBER",
                StartingSequenceNumber=seq,
            )["ShardIterator"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "InvalidArgumentException":
                raise
            return f"sequence number {seq} is not one of this shard ({exc.response['Error'].get('Message')})"
        for _ in range(5):  # Kinesis may answer empty pages before the first record
            response = self.client.get_records(ShardIterator=iterator, Limit=1)
            if response["Records"]:
                return None
            iterator = response.get("NextShardIterator")
            if not iterator or not response.get("MillisBehindLatest"):
                break
        return f"sequence number {seq} is beyond the shard's last record"

    def _shard_ids(self) -> list[str]:
        shards, kwargs = [], {"StreamName": self.stream_name}
        while True:
            page = self.client.list_shards(**kwargs)
            shards += [s["ShardId"] for s in page["Shards"]]
            if not page.get("NextToken"):
                return shards
            kwargs = {"NextToken": page["NextToken"]}

    # -- one batch
    def _invoke(self, records: list[dict]) -> int | None:
        """Invoke the handler; the position of the lowest failed record (0: the whole batch), None if none."""
        self.stats.invocations += 1
        try:
            response = self.handler({"Records": records}, None)
        except Exception as exc:  # noqa: BLE001  the whole batch failed, as when a Lambda raises
            log.warning("handler raised on %d record(s): %s: %s", len(records), type(exc).__name__, exc)
            return 0
        if not isinstance(response, dict):
            return None  # a null or empty response is a success
        items = response.get("batchItemFailures") or []
        if not isinstance(items, list):
            items = [items]
        positions = {r["kinesis"]["sequenceNumber"]: i for i, r in enumerate(records)}
        failed = []
        for item in items:
            seq = item.get("itemIdentifier") if isinstance(item, dict) else None
            if not isinstance(seq, str) or seq not in positions:
                # AWS: an empty, null, misspelt or unknown identifier fails the whole batch.
                log.warning(
                    "handler reported itemIdentifier %r, not a record of the batch: the whole batch failed",
                    show_value(seq),
                )
                return 0
            failed.append(positions[seq])
        # This project's handler lists only final dead letters: none past its first failed record.
        dead = response.get("deadLetters")
        self.stats.dead_letters += len(dead) if isinstance(dead, list) else 0
        return min(failed) if failed else None

    def process_batch(self, shard_id: str, records: list[dict]) -> None:
        batch = records
        for attempt in range(self.max_retries + 1):
            failed_from = self._invoke(batch)
            if failed_from is None:
                self.checkpoint.save(shard_id, batch[-1]["kinesis"]["sequenceNumber"])
                return
            if failed_from > 0:  # everything before the lowest failed record is done
                self.checkpoint.save(shard_id, batch[failed_from - 1]["kinesis"]["sequenceNumber"])
            batch = batch[failed_from:]  # as AWS: from the lowest failed record on, later successes included
            if attempt < self.max_retries:
                log.info(
                    "retrying %d record(s) of shard %s from sequence number %s (retry %d of %d)",
                    len(batch),
                    shard_id,
                    batch[0]["kinesis"]["sequenceNumber"],
                    attempt + 1,
                    self.max_retries,
                )
        self._send_to_failure_destination(shard_id, batch)
        self.checkpoint.save(shard_id, batch[-1]["kinesis"]["sequenceNumber"])

    def _send_to_failure_destination(self, shard_id: str, failed: list[dict]) -> None:
        first, last = failed[0]["kinesis"], failed[-1]["kinesis"]
        # Deterministic key: a restart that re-sends the same failures overwrites, not duplicates.
        key = f"{FAILURE_PREFIX}/{self.stream_name}/{shard_id}/{first['sequenceNumber']}-{last['sequenceNumber']}.json"
        body = {
            "requestContext": {"condition": "RetryAttemptsExhausted", "approximateInvokeCount": self.max_retries + 1},
            "timestamp": datetime.now(UTC).isoformat(),
            "KinesisBatchInfo": {
                "shardId": shard_id,
                "startSequenceNumber": first["sequenceNumber"],
                "endSequenceNumber": last["sequenceNumber"],
                "approximateArrivalOfFirstRecord": first["approximateArrivalTimestamp"],
                "approximateArrivalOfLastRecord": last["approximateArrivalTimestamp"],
                "batchSize": len(failed),
                "streamArn": self.stream_arn,
            },
            # AWS sends only the metadata above; the records themselves make the local file useful.
            "records": [r["kinesis"] for r in failed],
        }
        self.s3.put_object(
            Bucket=self.failure_bucket,
            Key=key,
            Body=json.dumps(body, indent=1).encode("utf-8"),
            ContentType="application/json",
        )
        uri = f"s3://{self.failure_bucket}/{key}"
        log.warning(
            "%d record(s) of shard %s still failed after %d retries: sent to %s",
            len(failed),
            shard_id,
            self.max_retries,
            uri,
        )
        self.stats.failed_records += len(failed)
        self.stats.failure_objects.append(uri)

    # -- the loop
    def run(self, once: bool = False, max_batches: int | None = None) -> RunStats:
        """Poll until stopped; `once`: stop when every shard is drained; `max_batches`: stop after N batches."""
        self._follow_stream()  # the stream may have been created again since this runner was made
        iterators = {shard: self._iterator(shard) for shard in self._shard_ids()}
        closed: set[str] = set()
        while iterators:
            got_records = False
            for shard_id in list(iterators):
                response = self.client.get_records(ShardIterator=iterators[shard_id], Limit=self.batch_size)
                if response.get("NextShardIterator"):
                    iterators[shard_id] = response["NextShardIterator"]
                else:  # a closed shard (after resharding) is finished
                    del iterators[shard_id]
                    closed.add(shard_id)
                records = [lambda_record(r, shard_id, self.stream_arn, self.region) for r in response["Records"]]
                if records:
                    got_records = True
                    self.process_batch(shard_id, records)
                    self.stats.batches += 1
                    self.stats.records += len(records)
                    if max_batches is not None and self.stats.batches >= max_batches:
                        return self.stats
                    if self.pause:
                        self.sleep(self.pause)
                elif response.get("MillisBehindLatest"):
                    got_records = True  # empty page but more data behind it: keep reading
            if not got_records:
                if once:
                    return self.stats
                self.sleep(self.poll_interval)
                if self._follow_stream():  # created again while we waited: old iterators would skip records
                    iterators, closed = {}, set()
                for shard_id in self._shard_ids():  # pick up new shards after resharding
                    if shard_id not in iterators and shard_id not in closed:
                        iterators[shard_id] = self._iterator(shard_id)
        return self.stats


# ---------------------------------------------------------------------------- reading / producing
def put_ride(client, stream_name: str, ride: dict, ride_id) -> str:
    """Put one ride event on the input stream (what `aws kinesis put-record` does); returns its sequence number."""
    data = json.dumps({"ride": ride, "ride_id": ride_id})
    response = client.put_record(StreamName=stream_name, Data=data, PartitionKey=str(ride_id))
    return response["SequenceNumber"]


def read_stream(
    client,
    stream_name: str,
    position: str = "TRIM_HORIZON",
    after: dict | None = None,
    wait: float = 0.0,
    limit: int = 1000,
) -> list[dict]:
    """The records on a stream, decoded from JSON (undecodable ones as {'raw': ...}).

    `position`: TRIM_HORIZON (every retained record) or LATEST (only records that
    arrive after the iterators are taken; `wait` seconds are given for them to come).
    `after`: {shard_id: sequence_number} to start after, e.g. positions recorded
    with `stream_positions` before putting.
    """
    iterators = []
    for shard in client.list_shards(StreamName=stream_name)["Shards"]:
        shard_id = shard["ShardId"]
        kwargs = {"ShardIteratorType": position}
        if after and after.get(shard_id):
            kwargs = {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": after[shard_id]}
        iterators.append(client.get_shard_iterator(StreamName=stream_name, ShardId=shard_id, **kwargs)["ShardIterator"])
    if wait:
        time.sleep(wait)
    out = []
    for iterator in iterators:
        while iterator:
            response = client.get_records(ShardIterator=iterator, Limit=limit)
            for record in response["Records"]:
                try:
                    out.append(json.loads(record["Data"]))
                except ValueError:
                    out.append({"raw": record["Data"].decode("utf-8", "replace")})
            if not response["Records"] and not response.get("MillisBehindLatest"):
                break
            iterator = response.get("NextShardIterator")
    return out


def stream_positions(client, stream_name: str) -> dict:
    """{shard_id: last sequence number on it now} (None for an empty shard); read after these later."""
    positions = {}
    for shard in client.list_shards(StreamName=stream_name)["Shards"]:
        positions[shard["ShardId"]] = None
        iterator = client.get_shard_iterator(
            StreamName=stream_name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while iterator:
            response = client.get_records(ShardIterator=iterator, Limit=10000)
            if response["Records"]:
                positions[shard["ShardId"]] = response["Records"][-1]["SequenceNumber"]
            elif not response.get("MillisBehindLatest"):
                break
            iterator = response.get("NextShardIterator")
    return positions


# ---------------------------------------------------------------------------- benchmark
class _CountingClient:
    """Wraps a boto3 Kinesis client and counts the write calls (put_record / put_records)."""

    def __init__(self, client):
        self._client = client
        self.writes = 0

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name in ("put_record", "put_records"):

            def counted(*args, **kwargs):
                self.writes += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def synthetic_event(n: int = MAX_BATCH_SIZE, seed: int = 42) -> dict:
    """A Lambda Kinesis event of `n` realistic rides (from the synthetic TLC month)."""
    from .tlc import synthetic_month

    rides = synthetic_month(2021, 2, n_rows=n, seed=seed)
    payloads = [
        {
            "ride": {
                "PULocationID": int(r.PULocationID),
                "DOLocationID": int(r.DOLocationID),
                "trip_distance": float(r.trip_distance),
            },
            "ride_id": i,
        }
        for i, r in enumerate(rides.itertuples(index=False))
    ]
    return kinesis_event(payloads)


def compare_designs(model, version, client, out_batch: str, out_loop: str, event: dict, repeats: int = 5) -> dict:
    """The project's handler vs the 2022 per-record loop on the same event, alternating, median times."""
    import statistics

    times = {"batch": [], "per_record": []}
    writes = {}
    for _ in range(repeats):
        counting = _CountingClient(client)
        service = ModelService(model, version, [KinesisWriter(out_batch, counting)])
        start = time.perf_counter()
        batch = service.lambda_handler(event)
        times["batch"].append(time.perf_counter() - start)
        writes["batch"] = counting.writes
        counting = _CountingClient(client)
        start = time.perf_counter()
        loop = per_record_handler(event, model, version, counting, out_loop)
        times["per_record"].append(time.perf_counter() - start)
        writes["per_record"] = counting.writes
    same = np.allclose(
        [p["prediction"]["ride_duration"] for p in batch["predictions"]],
        [p["prediction"]["ride_duration"] for p in loop["predictions"]],
    )
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "records": len(event["Records"]),
        "seconds": median,
        "writes": writes,
        "same_predictions": bool(same),
        "speedup": median["per_record"] / median["batch"],
    }


_COLD_START = """
import json, time
t0 = time.perf_counter()
import ride_duration.stream as s
t1 = time.perf_counter()
service = s.build_service(model_uri={uri!r})
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "version": service.version}}))
"""


def measure_cold_start(model_uri: str) -> dict:
    """A new interpreter, like a new Lambda container: import time and model-load time."""
    import subprocess

    env = {**os.environ, "TEST_RUN": "True"}
    out = subprocess.run(
        [sys.executable, "-c", _COLD_START.format(uri=model_uri)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- invoke endpoint
def create_invoke_app(handler=None):
    """A Flask app answering like the Lambda Runtime Interface Emulator (RIE)."""
    from flask import Flask, jsonify, request

    app = Flask(__name__)
    app.json.sort_keys = False  # keep the handler's key order, as Lambda returns it
    handler = handler or lambda_handler

    @app.post(INVOKE_PATH)
    def invoke():
        try:
            event = json.loads(request.get_data())
        except (ValueError, RecursionError):
            event = None
        if event is None:  # Lambda's Invoke API refuses a payload that is not JSON (InvalidRequestContentException)
            return jsonify(errorType="InvalidRequestContent", errorMessage="the request body must be a JSON event"), 400
        try:
            return jsonify(handler(event, None))
        except Exception as exc:
            # As Lambda and the RIE: the invocation itself succeeded (200); the function's error
            # is the body, flagged by X-Amz-Function-Error. The server keeps serving.
            log.exception("handler failed")
            response = jsonify(errorType=type(exc).__name__, errorMessage=str(exc))
            response.headers["X-Amz-Function-Error"] = "Unhandled"
            return response, 200

    return app


def serve_invoke(host: str = "127.0.0.1", port: int = 8080, handler=None) -> None:
    from werkzeug.serving import make_server

    # Load the model before accepting requests, as the first (cold) invocation would.
    if handler is None:
        get_service()
    server = make_server(host, port, create_invoke_app(handler), threaded=False)
    print(f"invoke endpoint: http://{host}:{port}{INVOKE_PATH}", flush=True)
    server.serve_forever()


def start_invoke_server(port: int, *, test_run: bool = True, timeout: float = 120, env: dict | None = None):
    """`python -m ride_duration.stream invoke-server` as a subprocess, returned once it answers.
    The caller stops it (`proc.terminate()`); it is a separate process, like the image's RIE."""
    import subprocess

    import requests

    cmd = [sys.executable, "-m", "ride_duration.stream", "invoke-server", "--port", str(port)]
    env = {**os.environ, "TEST_RUN": "True" if test_run else "", **(env or {})}
    # Logs to a file, not a pipe: a pipe nobody reads blocks a chatty server once it is full.
    logfile = get_settings().local_dir / "logs" / f"invoke-server-{port}.log"
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the invoke server exited with code {proc.returncode} (log {logfile}):\n{tail}")
        try:
            requests.get(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"the invoke server did not answer on port {port} within {timeout:.0f} s")


# ---------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ride_duration.stream", description="Run the streaming Lambda locally."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the local Kinesis event-source runner")
    run.add_argument("--stream", help="input stream (default INPUT_STREAM_NAME or ride_events)")
    run.add_argument("--once", action="store_true", help="stop when every shard is drained")
    run.add_argument("--max-batches", type=int, help="stop after N batches")
    run.add_argument("--batch-size", type=int, default=MAX_BATCH_SIZE)
    run.add_argument(
        "--max-retries", type=int, default=2, help="retries of failed records before the failure destination"
    )
    run.add_argument("--checkpoint", type=Path, help="checkpoint file (default .local/stream/checkpoint-<stream>.json)")
    run.add_argument("--reset", action="store_true", help="forget the checkpoint: start at TRIM_HORIZON")
    run.add_argument("--pause", type=float, default=0.0, help="seconds to wait between batches (throttle)")
    run.add_argument("--poll-interval", type=float, default=1.0)
    inv = sub.add_parser("invoke-server", help="the Lambda invoke endpoint (like the RIE in the image)")
    inv.add_argument("--host", default="127.0.0.1")
    inv.add_argument("--port", type=int, default=8080)
    inv.add_argument("--test-run", action="store_true", help="do not write predictions (TEST_RUN=True)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)

    from botocore.exceptions import BotoCoreError, ClientError

    from .registry import ModelNotFound

    try:
        from .stack import activate_if_running

        activate_if_running()
        if args.command == "invoke-server":
            if args.test_run:
                os.environ["TEST_RUN"] = "True"
            serve_invoke(args.host, args.port)
            return 0
        settings = get_settings()
        stream = args.stream or settings.input_stream
        checkpoint_path = args.checkpoint or default_checkpoint_path(stream, settings)
        if args.reset:
            checkpoint_path.unlink(missing_ok=True)
        checkpoint = Checkpoint(checkpoint_path)
        runner = EventSourceRunner(
            lambda_handler,
            stream,
            checkpoint=checkpoint,
            batch_size=args.batch_size,
            max_retries=args.max_retries,
            poll_interval=args.poll_interval,
            pause=args.pause,
            settings=settings,
        )
        get_service()  # load the model before polling, so a missing model fails fast
        stats = runner.run(once=args.once, max_batches=args.max_batches)
        print(
            f"processed {stats.records} record(s) in {stats.batches} batch(es); "
            f"{stats.dead_letters} dead-lettered by the function; "
            f"{stats.failed_records} sent to the failure destination",
            flush=True,
        )
        return 0
    except (ModelNotFound, ValueError, BotoCoreError, ClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the importable module, not this `__main__` copy: one handler cache, one logger name.
    from ride_duration.stream import main as _main

    raise SystemExit(_main())
