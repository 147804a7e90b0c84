"""One bad record never costs another its prediction.

Each input that used to fail a whole invocation, mixed into one 100-record batch on
the session's local Kinesis, through the event-source runner and the registered
model: every valid ride is predicted exactly once, every poisoned record is
dead-lettered once, with its reason, and nothing is retried."""

from __future__ import annotations

import base64
import json
from collections import Counter
from datetime import datetime

from ride_duration.aws import kinesis_client
from ride_duration.config import get_settings
from ride_duration.stream import build_service
from ride_duration.stream.writer import arrival_stamp
from workbench.event_source import Checkpoint, EventSourceRunner
from workbench.stack import LocalStack, free_port
from workbench.streams import read_dead_letters, read_stream

from .helpers import put_payloads, ride_payload

CORRUPT = b"corrupt me in transit"


def ride_bytes(i: int, **ride) -> bytes:
    payload = ride_payload(i)
    payload["ride"].update(ride)
    return json.dumps(payload).encode()


# position in the batch -> (bytes put on the stream, part of the reason expected)
POISONED = {
    3: (
        b'{"ride": {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}, "ride_id": ' + b"7" * 5000 + b"}",
        "Exceeds the limit (4300 digits)",
    ),
    11: (b'{"ride_id": 11, "ride": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    19: (ride_bytes(19, trip_distance=3.5e38), "must be between 0 and 500 miles, got 3.5e+38"),
    27: (ride_bytes(27, trip_distance=1e308), "must be between 0 and 500 miles, got 1e+308"),
    38: (CORRUPT, "kinesis.data is not valid base64"),
    46: (b"this is not JSON", "kinesis.data is not JSON"),
    55: (b"\xff\xfe{}", "kinesis.data is not JSON"),
    64: (ride_bytes(64, PULocationID=0), "'PULocationID' must be a TLC zone id between 1 and 265, got 0"),
    73: (ride_bytes(73, DOLocationID=9999), "'DOLocationID' must be a TLC zone id between 1 and 265, got 9999"),
    88: (ride_bytes(88, trip_distance=-5), "'trip_distance' must be between 0 and 500 miles, got -5"),
}


def corrupting(handler):
    """Kinesis always hands Lambda valid base64; this wrapper breaks the base64 of one record,
    as a damaged or hand-made event would."""

    def wrapped(event, context):
        for record in event["Records"]:
            if base64.b64decode(record["kinesis"]["data"]) == CORRUPT:
                record["kinesis"]["data"] = "%%% not base64 %%%"
        return handler(event, context)

    return wrapped


def test_poisoned_records_in_a_100_record_batch(trained_model, kinesis, s3, settings, streams, tmp_path):
    n = 100
    payloads = [POISONED[i][0] if i in POISONED else ride_payload(i) for i in range(n)]
    seqs = put_payloads(kinesis, streams["input"], payloads)
    handler = corrupting(build_service(get_settings()).lambda_handler)  # the registered model, the S3 dead letters
    runner = EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"))
    stats = runner.run(once=True)
    assert (stats.batches, stats.invocations, stats.records) == (1, 1, n)  # one batch, never retried
    assert (stats.dead_letters, stats.failed_records) == (len(POISONED), 0)

    out = read_stream(kinesis, streams["output"])
    valid = {f"ride-{i}" for i in range(n) if i not in POISONED}
    predicted = Counter(e["prediction"]["ride_id"] for e in out)
    assert set(predicted) == valid and set(predicted.values()) == {1}  # 90 of 90, each exactly once
    assert all(1 <= e["prediction"]["ride_duration"] <= 60 for e in out)

    prefix = get_settings().dead_letter_prefix
    letters = {letter["kinesis"]["sequenceNumber"]: letter for letter in read_dead_letters(prefix)}
    assert set(letters) == {seqs[i] for i in POISONED}  # 10 of 10, one object each
    for i, (data, reason) in POISONED.items():
        letter = letters[seqs[i]]
        assert reason in letter["reason"], (i, letter["reason"])
        arrival = arrival_stamp(letter["kinesis"]["approximateArrivalTimestamp"])
        assert letter["uri"] == f"{prefix}shardId-000000000000/{arrival}-{seqs[i]}.json"
        assert letter["eventID"] == f"shardId-000000000000:{seqs[i]}"
        expected = "%%% not base64 %%%" if data == CORRUPT else base64.b64encode(data).decode()
        assert letter["kinesis"]["data"] == expected  # as received
        assert datetime.fromisoformat(letter["time"]).tzinfo is not None

    # The same batch again (as after a crash before the checkpoint): the dead letters are overwritten, not doubled.
    again = EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "again.json"))
    assert again.run(once=True).records == n
    assert len(read_dead_letters(prefix)) == len(POISONED)


def test_dead_letters_of_two_stream_incarnations_are_both_kept(
    trained_model, stack, s3, settings, tmp_path, monkeypatch
):
    """The local Kinesis restarted between two poison records: the second stream numbers its records from 1
    again, yet its dead letter is stored beside the first one, not over it."""
    kinesis_only = LocalStack(
        local_dir=tmp_path / "stack",
        ports={**stack.ports, "kinesis": free_port()},
        streams=("rides-restarted", "preds-restarted"),
        quiet=True,
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL", kinesis_only.url("kinesis"))
    monkeypatch.setenv("INPUT_STREAM_NAME", "rides-restarted")
    monkeypatch.setenv("PREDICTIONS_STREAM_NAME", "preds-restarted")
    prefix = get_settings().dead_letter_prefix
    letters = []
    try:
        for reason, poison in (("not JSON", b"this is not JSON"), ("zone id", ride_bytes(1, PULocationID=0))):
            kinesis_only.up(("kinesis",))  # a new moto: the streams created empty, numbered from 1
            (seq,) = put_payloads(kinesis_client(get_settings()), "rides-restarted", [poison])
            runner = EventSourceRunner(
                build_service(get_settings()).lambda_handler,
                "rides-restarted",
                checkpoint=Checkpoint(tmp_path / "cp.json"),
            )
            assert runner.run(once=True).dead_letters == 1
            letters.append((seq, reason))
            kinesis_only.stop("kinesis")
    finally:
        kinesis_only.down()
    assert letters[0][0] == letters[1][0]  # the same sequence number in both incarnations
    stored = read_dead_letters(prefix)
    assert len(stored) == 2
    assert [reason in letter["reason"] for letter, (_, reason) in zip(stored, letters)] == [True, True]
