"""The local Kinesis event source mapping: an event-source runner reproducing AWS's Kinesis event source
mapping with ReportBatchItemFailures (see `EventSourceRunner`): a batch
that reports failures is checkpointed just before its lowest failed
sequence number and retried from that record on, later successes included;
an empty, null or unknown `itemIdentifier`, or a handler that raises, fails
the whole batch; after `--max-retries` retries the failed part goes to the
on-failure destination (an S3 object under `failures/<stream>/<created>/`) and the runner moves
on. The checkpoint names the stream's incarnation (ARN + creation time): a
stream created again under the same name (a restart of the local Kinesis),
or a checkpoint beyond the shard's last record, is read from TRIM_HORIZON
with a warning, never skipped;
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from ride_duration.aws import kinesis_client, s3_client
from ride_duration.config import Settings, get_settings
from ride_duration.features import show_value
from ride_duration.registry import ModelNotFound
from ride_duration.stream import get_service, lambda_handler

from .stack import activate_if_running

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = 100  # the event source mapping's default BatchSize for Kinesis
FAILURE_PREFIX = "failures"
LOCAL_ACCOUNT = "000000000000"  # moto's account id


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
        self.stream_created = ""  # the incarnation's creation time, compact: part of failed batches' keys
        self._follow_stream()
        self.stats = RunStats()

    # -- positions
    def _follow_stream(self) -> bool:
        """Bind the checkpoint to the stream as it is now; True if it is a new incarnation."""
        summary = self.client.describe_stream_summary(StreamName=self.stream_name)["StreamDescriptionSummary"]
        self.stream_arn = summary["StreamARN"]
        identity = stream_identity(summary)
        self.stream_created = re.sub(r"[^0-9A-Za-z]", "", identity["created"].partition("+")[0])
        return self.checkpoint.bind(identity)

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
        # Deterministic key: a restart that re-sends the same failures overwrites, not duplicates; the stream's
        # creation time keeps a stream created again under the same name (numbered from 1 again) apart.
        key = (
            f"{FAILURE_PREFIX}/{self.stream_name}/{self.stream_created}/{shard_id}/"
            f"{first['sequenceNumber']}-{last['sequenceNumber']}.json"
        )
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.event_source",
        description="The local Kinesis event source: read the input stream, invoke the stream function.",
    )
    parser.add_argument("--stream", help="input stream (default INPUT_STREAM_NAME or ride_events)")
    parser.add_argument("--once", action="store_true", help="stop when every shard is drained")
    parser.add_argument("--max-batches", type=int, help="stop after N batches")
    parser.add_argument("--batch-size", type=int, default=MAX_BATCH_SIZE)
    parser.add_argument(
        "--max-retries", type=int, default=2, help="retries of failed records before the failure destination"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="checkpoint file (default .local/stream/checkpoint-<stream>.json)"
    )
    parser.add_argument("--reset", action="store_true", help="forget the checkpoint: start at TRIM_HORIZON")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds to wait between batches (throttle)")
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)
    try:
        activate_if_running()
        settings = get_settings()
        stream = args.stream or settings.input_stream
        checkpoint_path = args.checkpoint or default_checkpoint_path(stream, settings)
        if args.reset:
            checkpoint_path.unlink(missing_ok=True)
        runner = EventSourceRunner(
            lambda_handler,
            stream,
            checkpoint=Checkpoint(checkpoint_path),
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
    raise SystemExit(main())
