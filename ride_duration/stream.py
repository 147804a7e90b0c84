"""The streaming deployment: a Lambda function on a Kinesis stream.

AWS invokes `lambda_handler(event, context)` with a batch of up to 100 Kinesis
records (`event["Records"][i]["kinesis"]["data"]` is base64 JSON
`{"ride": {...}, "ride_id": ...}`). The handler predicts every valid ride with
ONE model call, writes one prediction event per ride to the predictions stream
with `put_records` (not one `put_record` per ride, as in 2022), and reports the
records it could not read in AWS's partial batch response, so one bad record
does not make AWS retry (and re-predict) the whole batch.

Seams, as in the 2022 "best practices" module:
- `ModelService(model, version, callbacks)`: the handler logic; `callbacks`
  receive the prediction events (e.g. a `KinesisWriter`), so the handler is
  testable without a stream, and the writer without a model.
- module-level state is only the once-per-container cache (`get_service`).

Locally, without AWS or Docker (`python -m ride_duration.stream ...`):
- `run`: an event-source runner doing what AWS's Kinesis event source mapping
  does (poll every shard, build Lambda-shaped events, invoke, checkpoint,
  retry failed items, then hand them to an on-failure destination in S3);
- `invoke-server`: the Lambda Runtime Interface Emulator's invoke endpoint,
  `POST /2015-03-31/functions/function/invocations`, on port 8080.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .config import Settings, get_settings
from .utils import prepare_features

log = logging.getLogger(__name__)

MODEL_LABEL = "ride_duration_prediction_model"  # the course's "model" field of a prediction event
PUT_RECORDS_LIMIT = 500  # Kinesis: at most 500 entries per PutRecords call
MAX_BATCH_SIZE = 100  # the event source mapping's default BatchSize for Kinesis
FAILURE_PREFIX = "failures"
LOCAL_ACCOUNT = "000000000000"  # moto's account id
INVOKE_PATH = "/2015-03-31/functions/function/invocations"


class BadRecord(ValueError):
    """A Kinesis record that cannot be decoded or validated (reported, not retried as a batch)."""


class InvalidEvent(ValueError):
    """The event is not a Kinesis batch at all (no `Records` list)."""


class PutRecordsFailed(RuntimeError):
    """Some prediction events could not be written after the bounded retries."""


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
        raise BadRecord(f"kinesis.data is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadRecord(f"kinesis.data must be a JSON object, got {type(payload).__name__}")
    return payload


def _check_ride_id(ride_id):
    # It becomes the output PartitionKey (1-256 characters), so it must be a scalar.
    if ride_id is None:
        raise BadRecord("field 'ride_id' is missing")
    if isinstance(ride_id, bool) or not isinstance(ride_id, (int, str)):
        raise BadRecord(f"field 'ride_id' must be a string or an integer, got {ride_id!r}")
    if not 1 <= len(str(ride_id)) <= 256:
        raise BadRecord("field 'ride_id' must have 1 to 256 characters")
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
def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class KinesisWriter:
    """Callback writing prediction events with PutRecords (<= 500 per call).

    PutRecords is not all-or-nothing: the response can report some entries
    failed (`FailedRecordCount`, per-entry `ErrorCode`, e.g. throttling). Those
    entries, and only those, are re-sent with exponential backoff; if any still
    fail after `max_attempts`, `PutRecordsFailed` is raised so the invocation
    fails and AWS retries the batch (at-least-once, never silently lost).
    """

    def __init__(self, stream_name: str, client=None, *, max_attempts: int = 5,
                 base_delay: float = 0.1, max_delay: float = 2.0, sleep=time.sleep):
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
            {"Data": json.dumps(e).encode("utf-8"), "PartitionKey": str(e["prediction"]["ride_id"])}
            for e in events
        ]
        for chunk in _chunks(entries, PUT_RECORDS_LIMIT):
            self._put(chunk)

    def _put(self, entries: list[dict]) -> None:
        pending = entries
        for attempt in range(1, self.max_attempts + 1):
            response = self.client.put_records(StreamName=self.stream_name, Records=pending)
            self.calls += 1
            if not response.get("FailedRecordCount"):
                return
            results = response["Records"]  # same order as the request
            failed = [entry for entry, result in zip(pending, results) if result.get("ErrorCode")]
            errors = Counter(result["ErrorCode"] for result in results if result.get("ErrorCode"))
            log.warning("put_records to %s: %d of %d entries failed (%s), attempt %d of %d",
                        self.stream_name, len(failed), len(pending), dict(errors), attempt, self.max_attempts)
            pending = failed
            if attempt < self.max_attempts:
                # Full jitter, so many throttled writers do not retry in lockstep.
                self.sleep(random.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1))))
        raise PutRecordsFailed(
            f"{len(pending)} of {len(entries)} prediction events could not be written to stream "
            f"{self.stream_name!r} after {self.max_attempts} attempts ({dict(errors)})"
        )


# ---------------------------------------------------------------------------- the service
class ModelService:
    """The Lambda's logic, independent of where the model and the events come from.

    `model` needs only `.predict(list_of_feature_dicts)`; `callbacks` are called
    with the list of prediction events (after prediction, before returning).
    """

    def __init__(self, model, version, callbacks=()):
        self.model = model
        self.version = version
        self.callbacks = list(callbacks)

    def predict(self, features: list[dict]) -> np.ndarray:
        if not features:
            return np.empty(0)
        return np.asarray(self.model.predict(features), dtype=float)

    def lambda_handler(self, event, context=None) -> dict:
        ride_ids, features, failures = [], [], []
        for i, record in enumerate(_records(event)):
            seq = sequence_number(record)
            try:
                ride_id, _, feats = decode_record(record)
            except BadRecord as exc:
                log.warning("record %d (sequenceNumber %s) skipped: %s", i, seq, exc)
                if seq is None:
                    # Without an identifier AWS cannot retry just this record; fail the batch.
                    raise InvalidEvent(f"record {i} has no kinesis.sequenceNumber ({exc})") from exc
                failures.append({"itemIdentifier": seq})
                continue
            ride_ids.append(ride_id)
            features.append(feats)
        durations = self.predict(features)  # one model call for the whole batch
        events = [prediction_event(rid, d, self.version) for rid, d in zip(ride_ids, durations)]
        if events:
            for callback in self.callbacks:
                callback(events)
        response = {"predictions": events}
        if failures:
            # AWS's partial batch response (needs ReportBatchItemFailures on the mapping).
            response["batchItemFailures"] = failures
        return response


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
    """Load the model (registry alias or S3, from env) and attach the stream writer unless TEST_RUN."""
    from .predict import load_model

    settings = settings or get_settings()
    model, version = load_model(model_uri, settings=settings)
    callbacks = [] if settings.test_run else [KinesisWriter(settings.predictions_stream)]
    return ModelService(model, version, callbacks)


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


def kinesis_event(payloads: list, stream_name: str = "ride_events", region: str = "eu-west-1",
                  first_sequence: int = 1) -> dict:
    """A Lambda Kinesis event by hand: one record per payload (dict -> JSON, bytes as is),
    sequence numbers first_sequence, first_sequence + 1, ... on shardId-000000000000."""
    arn = f"arn:aws:kinesis:{region}:{LOCAL_ACCOUNT}:stream/{stream_name}"
    records = []
    for i, payload in enumerate(payloads):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        raw = {"SequenceNumber": str(first_sequence + i), "PartitionKey": str(i), "Data": data,
               "ApproximateArrivalTimestamp": 1654161514.132}
        records.append(lambda_record(raw, "shardId-000000000000", arn, region))
    return {"Records": records}


class Checkpoint:
    """Last processed sequence number per shard, in a JSON file replaced atomically."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.positions: dict[str, str] = {}
        if self.path.is_file():
            try:
                self.positions = dict(json.loads(self.path.read_text())["shards"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"checkpoint file {self.path} is unreadable ({exc}); "
                                 "delete it (or pass --reset) to start at TRIM_HORIZON") from None

    def get(self, shard_id: str) -> str | None:
        return self.positions.get(shard_id)

    def save(self, shard_id: str, seq: str) -> None:
        self.positions[shard_id] = seq
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write a temp file in the same folder, fsync, rename: a kill leaves the old or the new file, never half.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump({"shards": self.positions}, out, indent=1, sort_keys=True)
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
    failed_records: int = 0
    failure_objects: list = field(default_factory=list)


class EventSourceRunner:
    """What AWS's Kinesis event source mapping does, against the local Kinesis.

    - polls every shard with GetRecords (Limit = batch_size), starting at
      TRIM_HORIZON, or AFTER_SEQUENCE_NUMBER the checkpointed one;
    - invokes `handler(event, None)` with Lambda's Kinesis event shape;
    - checkpoints the last processed sequence number per shard after a batch;
    - ReportBatchItemFailures: checkpoints up to before the first failed record
      and retries from it, at most `max_retries` times, then writes the failed
      records to the on-failure destination (an S3 object) and moves on.

    Delivery is at-least-once, as on AWS: the output is written before the
    checkpoint, so a kill between the two re-processes that batch on restart.
    One difference from AWS: a retry re-sends only the records not yet
    processed successfully (AWS re-sends everything from the first failed
    record on, which duplicates the successes after it).
    """

    def __init__(self, handler, stream_name: str, *, client=None, s3=None, checkpoint: Checkpoint | None = None,
                 failure_bucket: str | None = None, batch_size: int = MAX_BATCH_SIZE, max_retries: int = 2,
                 poll_interval: float = 1.0, pause: float = 0.0, settings: Settings | None = None):
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
        self.region = settings.aws_region
        self.stream_arn = self.client.describe_stream_summary(StreamName=stream_name)[
            "StreamDescriptionSummary"]["StreamARN"]
        self.stats = RunStats()

    # -- positions
    def _iterator(self, shard_id: str) -> str:
        seq = self.checkpoint.get(shard_id)
        kwargs = {"ShardIteratorType": "TRIM_HORIZON"}
        if seq:
            kwargs = {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": seq}
        return self.client.get_shard_iterator(StreamName=self.stream_name, ShardId=shard_id, **kwargs)["ShardIterator"]

    def _shard_ids(self) -> list[str]:
        shards, kwargs = [], {"StreamName": self.stream_name}
        while True:
            page = self.client.list_shards(**kwargs)
            shards += [s["ShardId"] for s in page["Shards"]]
            if not page.get("NextToken"):
                return shards
            kwargs = {"NextToken": page["NextToken"]}

    # -- one batch
    def _invoke(self, records: list[dict]) -> set[str]:
        """Invoke the handler; return the sequence numbers it reported failed (all, if it raised)."""
        self.stats.invocations += 1
        try:
            response = self.handler({"Records": records}, None)
        except Exception as exc:  # the whole batch failed, as when a Lambda raises
            log.warning("handler raised on %d record(s): %s: %s", len(records), type(exc).__name__, exc)
            return {r["kinesis"]["sequenceNumber"] for r in records}
        items = (response.get("batchItemFailures") or []) if isinstance(response, dict) else []
        sent = {r["kinesis"]["sequenceNumber"] for r in records}
        failed = {item.get("itemIdentifier") for item in items if isinstance(item, dict)}
        if not failed <= sent:
            # AWS treats an unknown or empty identifier as a failure of the whole batch.
            log.warning("handler reported unknown itemIdentifier(s); treating the batch as failed")
            return sent
        return failed

    def process_batch(self, shard_id: str, records: list[dict]) -> None:
        pending = records
        for attempt in range(self.max_retries + 1):
            failed = self._invoke(pending)
            if not failed:
                self.checkpoint.save(shard_id, records[-1]["kinesis"]["sequenceNumber"])
                return
            first = next(i for i, r in enumerate(records) if r["kinesis"]["sequenceNumber"] in failed)
            if first > 0:  # everything before the first failure is done
                self.checkpoint.save(shard_id, records[first - 1]["kinesis"]["sequenceNumber"])
            pending = [r for r in pending if r["kinesis"]["sequenceNumber"] in failed]
            if attempt < self.max_retries:
                log.info("retrying %d failed record(s) of shard %s (retry %d of %d)",
                         len(pending), shard_id, attempt + 1, self.max_retries)
        self._send_to_failure_destination(shard_id, records, pending)
        self.checkpoint.save(shard_id, records[-1]["kinesis"]["sequenceNumber"])

    def _send_to_failure_destination(self, shard_id: str, batch: list[dict], failed: list[dict]) -> None:
        first, last = failed[0]["kinesis"], failed[-1]["kinesis"]
        # Deterministic key: a restart that re-sends the same failures overwrites, not duplicates.
        key = f"{FAILURE_PREFIX}/{self.stream_name}/{shard_id}/{first['sequenceNumber']}-{last['sequenceNumber']}.json"
        body = {
            "requestContext": {"condition": "RetryAttemptsExhausted", "approximateInvokeCount": self.max_retries + 1},
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "KinesisBatchInfo": {
                "shardId": shard_id,
                "startSequenceNumber": first["sequenceNumber"],
                "endSequenceNumber": last["sequenceNumber"],
                "approximateArrivalOfFirstRecord": first["approximateArrivalTimestamp"],
                "approximateArrivalOfLastRecord": last["approximateArrivalTimestamp"],
                "batchSize": len(batch),
                "streamArn": self.stream_arn,
            },
            # AWS sends only the metadata above; the records themselves make the local file useful.
            "records": [r["kinesis"] for r in failed],
        }
        self.s3.put_object(Bucket=self.failure_bucket, Key=key, Body=json.dumps(body, indent=1).encode("utf-8"),
                           ContentType="application/json")
        uri = f"s3://{self.failure_bucket}/{key}"
        log.warning("%d record(s) of shard %s still failed after %d retries: sent to %s",
                    len(failed), shard_id, self.max_retries, uri)
        self.stats.failed_records += len(failed)
        self.stats.failure_objects.append(uri)

    # -- the loop
    def run(self, once: bool = False, max_batches: int | None = None) -> RunStats:
        """Poll until stopped; `once`: stop when every shard is drained; `max_batches`: stop after N batches."""
        iterators = {shard: self._iterator(shard) for shard in self._shard_ids()}
        while iterators:
            got_records = False
            for shard_id in list(iterators):
                response = self.client.get_records(ShardIterator=iterators[shard_id], Limit=self.batch_size)
                if response.get("NextShardIterator"):
                    iterators[shard_id] = response["NextShardIterator"]
                else:  # a closed shard (after resharding) is finished
                    del iterators[shard_id]
                records = [lambda_record(r, shard_id, self.stream_arn, self.region) for r in response["Records"]]
                if records:
                    got_records = True
                    self.process_batch(shard_id, records)
                    self.stats.batches += 1
                    self.stats.records += len(records)
                    if max_batches is not None and self.stats.batches >= max_batches:
                        return self.stats
                    if self.pause:
                        time.sleep(self.pause)
                elif response.get("MillisBehindLatest"):
                    got_records = True  # empty page but more data behind it: keep reading
            if not got_records:
                if once:
                    return self.stats
                time.sleep(self.poll_interval)
                for shard_id in self._shard_ids():  # pick up new shards after resharding
                    iterators.setdefault(shard_id, self._iterator(shard_id))
        return self.stats


# ---------------------------------------------------------------------------- reading / producing
def put_ride(client, stream_name: str, ride: dict, ride_id) -> str:
    """Put one ride event on the input stream (what `aws kinesis put-record` does); returns its sequence number."""
    data = json.dumps({"ride": ride, "ride_id": ride_id})
    response = client.put_record(StreamName=stream_name, Data=data, PartitionKey=str(ride_id))
    return response["SequenceNumber"]


def read_stream(client, stream_name: str, position: str = "TRIM_HORIZON", after: dict | None = None,
                wait: float = 0.0, limit: int = 1000) -> list[dict]:
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
        iterator = client.get_shard_iterator(StreamName=stream_name, ShardId=shard["ShardId"],
                                             ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
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
    from .data import synthetic_month

    rides = synthetic_month(2021, 2, n_rows=n, seed=seed)
    payloads = [
        {"ride": {"PULocationID": int(r.PULocationID), "DOLocationID": int(r.DOLocationID),
                  "trip_distance": float(r.trip_distance)}, "ride_id": i}
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
    same = np.allclose([p["prediction"]["ride_duration"] for p in batch["predictions"]],
                       [p["prediction"]["ride_duration"] for p in loop["predictions"]])
    median = {name: statistics.median(values) for name, values in times.items()}
    return {"records": len(event["Records"]), "seconds": median, "writes": writes, "same_predictions": bool(same),
            "speedup": median["per_record"] / median["batch"]}


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
    out = subprocess.run([sys.executable, "-c", _COLD_START.format(uri=model_uri)], env=env,
                         capture_output=True, text=True, check=True, timeout=300)
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
        event = request.get_json(force=True, silent=True)
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
    parser = argparse.ArgumentParser(prog="python -m ride_duration.stream",
                                     description="Run the streaming Lambda locally.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="the local Kinesis event-source runner")
    run.add_argument("--stream", help="input stream (default INPUT_STREAM_NAME or ride_events)")
    run.add_argument("--once", action="store_true", help="stop when every shard is drained")
    run.add_argument("--max-batches", type=int, help="stop after N batches")
    run.add_argument("--batch-size", type=int, default=MAX_BATCH_SIZE)
    run.add_argument("--max-retries", type=int, default=2, help="retries of failed records before the failure destination")
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

    from .predict import ModelNotFound

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
        runner = EventSourceRunner(lambda_handler, stream, checkpoint=checkpoint, batch_size=args.batch_size,
                                   max_retries=args.max_retries, poll_interval=args.poll_interval,
                                   pause=args.pause, settings=settings)
        get_service()  # load the model before polling, so a missing model fails fast
        stats = runner.run(once=args.once, max_batches=args.max_batches)
        print(f"processed {stats.records} record(s) in {stats.batches} batch(es); "
              f"{stats.failed_records} sent to the failure destination", flush=True)
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
