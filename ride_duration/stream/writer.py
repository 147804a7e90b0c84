"""Where the function's output goes: prediction events to Kinesis, unscorable records to S3."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections import Counter
from datetime import UTC, datetime

from ..aws import split_s3_uri

log = logging.getLogger(__name__)

PUT_RECORDS_LIMIT = 500  # Kinesis: at most 500 entries per PutRecords call


class PutRecordsFailed(RuntimeError):
    """Some prediction events could not be written after the bounded retries;
    `failed` holds their positions in the list the writer was given."""

    def __init__(self, message: str, failed=()):
        super().__init__(message)
        self.failed = sorted(failed)


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
        client,
        *,
        max_attempts: int = 5,
        base_delay: float = 0.1,
        max_delay: float = 2.0,
        sleep=time.sleep,
    ):
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


def arrival_stamp(timestamp) -> str:
    """A record's `approximateArrivalTimestamp` (epoch seconds) as `YYYYMMDDTHHMMSS.mmmZ`, so keys sort
    by arrival; `unknown-arrival` when a hand-made record has none."""
    try:
        moment = datetime.fromtimestamp(float(timestamp), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return "unknown-arrival"
    return moment.strftime("%Y%m%dT%H%M%S.") + f"{moment.microsecond // 1000:03d}Z"


class S3DeadLetters:
    """Stores each record that can never be scored in S3, one object per record.

    Key `<prefix><shardId>/<arrival>-<sequenceNumber>.json`, `<arrival>` the record's
    `approximateArrivalTimestamp` (UTC, to the millisecond): both belong to the record, so a
    batch retried after a transient fault overwrites the object rather than adding a second
    one; and a stream created again under the same name, which numbers its records from the
    start again (the local Kinesis after a restart), never reuses a key, since its records
    arrive later. Body: the reason, the time, and the record as received (`kinesis` fields
    with `data` still base64, `eventID`, `eventSourceARN`). A failed write raises: the
    handler reports the record for a retry, it is not lost.
    """

    def __init__(self, uri: str, client):
        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.client = client

    def key(self, record: dict) -> str:
        # eventID is "<shardId>:<sequenceNumber>"; keep keys to safe characters whatever a hand-made event holds.
        shard = str(record.get("eventID") or "").partition(":")[0] or "unknown-shard"
        seq = str(record["kinesis"]["sequenceNumber"])
        arrival = arrival_stamp(record["kinesis"].get("approximateArrivalTimestamp"))
        safe = [re.sub(r"[^A-Za-z0-9_.-]", "_", part)[:128] for part in (shard, arrival, seq)]
        return f"{self.prefix}{safe[0]}/{safe[1]}-{safe[2]}.json"

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
