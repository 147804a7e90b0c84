"""End to end on the session's moto Kinesis + MLflow registry: the event-source
runner, the registered model, checkpoints, failed records, a SIGKILL restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest

from ride_duration.config import get_settings
from ride_duration.stream import ModelService, build_service
from ride_duration.stream.codec import decode_data
from ride_duration.stream.writer import PutRecordsFailed
from workbench.event_source import Checkpoint, EventSourceRunner, lambda_record, stream_identity
from workbench.streams import read_dead_letters, read_stream

from .helpers import PYTHON, put_payloads, python_env, ride_payload


def failures_in(s3, bucket: str, stream_name: str) -> list[dict]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"failures/{stream_name}/")
    return [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in listing.get("Contents", [])]


def test_lambda_record_shape(kinesis, streams, tmp_path):
    (seq,) = put_payloads(kinesis, streams["input"], [ride_payload(0)])
    runner = EventSourceRunner(lambda e, c: {}, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"))
    it = kinesis.get_shard_iterator(
        StreamName=streams["input"], ShardId="shardId-000000000000", ShardIteratorType="TRIM_HORIZON"
    )["ShardIterator"]
    (raw,) = kinesis.get_records(ShardIterator=it)["Records"]
    record = lambda_record(raw, "shardId-000000000000", runner.stream_arn, "eu-west-1")
    assert set(record) == {
        "kinesis",
        "eventSource",
        "eventVersion",
        "eventID",
        "eventName",
        "invokeIdentityArn",
        "awsRegion",
        "eventSourceARN",
    }
    assert record["eventID"] == f"shardId-000000000000:{seq}"
    assert record["eventSourceARN"].endswith(f":stream/{streams['input']}")
    assert record["kinesis"]["kinesisSchemaVersion"] == "1.0" and record["kinesis"]["sequenceNumber"] == seq
    assert isinstance(record["kinesis"]["approximateArrivalTimestamp"], float)
    assert decode_data(record["kinesis"]["data"]) == ride_payload(0)


def test_end_to_end_registered_model(trained_model, kinesis, s3, streams, settings, tmp_path):
    """N rides, k poisoned, 1 shard, batches of 100: N-k predictions once each, k dead-lettered, nothing retried."""
    n, poisoned = 230, {5, 150, 229}
    payloads = [ride_payload(i, poisoned=i in poisoned) for i in range(n)]
    seqs = put_payloads(kinesis, streams["input"], payloads)
    service = build_service(get_settings())  # the registered model (alias production), writer to the output stream
    assert service.version == trained_model["logged"].run_id
    checkpoint = Checkpoint(tmp_path / "cp.json")
    runner = EventSourceRunner(service.lambda_handler, streams["input"], checkpoint=checkpoint)
    stats = runner.run(once=True)
    assert (stats.batches, stats.records, stats.dead_letters, stats.failed_records) == (3, n, len(poisoned), 0)
    assert stats.invocations == 3  # a bad record is not a reason to retry anything

    out = read_stream(kinesis, streams["output"])
    ids = Counter(e["prediction"]["ride_id"] for e in out)
    assert len(out) == n - len(poisoned)
    assert set(ids) == {f"ride-{i}" for i in range(n) if i not in poisoned} and max(ids.values()) == 1
    # values: the registered pipeline's, for the same features
    pipeline = trained_model["pipeline"]
    first = next(e for e in out if e["prediction"]["ride_id"] == "ride-0")
    ride = payloads[0]["ride"]
    expected = pipeline.predict(
        [{"PU_DO": f"{ride['PULocationID']}_{ride['DOLocationID']}", "trip_distance": ride["trip_distance"]}]
    )[0]
    assert first["prediction"]["ride_duration"] == pytest.approx(expected)
    assert first["model"] == "ride_duration_prediction_model" and first["version"] == service.version

    letters = read_dead_letters(get_settings().dead_letter_prefix)
    assert sorted((letter["kinesis"]["sequenceNumber"] for letter in letters), key=int) == [
        seqs[i] for i in sorted(poisoned)
    ]
    assert all("field 'trip_distance' must be a number, got 'far'" in letter["reason"] for letter in letters)
    assert failures_in(s3, settings.predictions_bucket, streams["input"]) == []
    assert checkpoint.get("shardId-000000000000") == seqs[-1]

    # A second run from the checkpoint finds nothing new.
    again = EventSourceRunner(service.lambda_handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"))
    assert again.run(once=True).records == 0
    assert len(read_stream(kinesis, streams["output"])) == n - len(poisoned)


def test_restart_continues_after_checkpoint(kinesis, streams, stub_model, tmp_path):
    written = []
    handler = ModelService(stub_model, "v", callbacks=[written.extend]).lambda_handler
    seqs = put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(30)])
    first = EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"), batch_size=10)
    assert first.run(max_batches=2).records == 20
    saved = json.loads((tmp_path / "cp.json").read_text())
    assert saved["shards"] == {"shardId-000000000000": seqs[19]}
    assert saved["stream"]["arn"].endswith(f":stream/{streams['input']}") and saved["stream"]["created"]
    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(30, 35)])
    second = EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"), batch_size=10)
    assert second.run(once=True).records == 15
    assert [e["prediction"]["ride_id"] for e in written] == [f"ride-{i}" for i in range(35)]


def test_transient_handler_failure_is_retried_then_succeeds(kinesis, streams, stub_model, s3, settings, tmp_path):
    """A handler that raises once (e.g. the output stream throttled) is re-invoked with the whole batch."""
    service = ModelService(stub_model, "v")
    calls = []

    def flaky(event, context):
        calls.append(len(event["Records"]))
        if len(calls) == 1:
            raise RuntimeError("throttled")
        return service.lambda_handler(event, context)

    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(4)])
    stats = EventSourceRunner(flaky, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True)
    assert calls == [4, 4] and stats.failed_records == 0
    assert failures_in(s3, settings.predictions_bucket, streams["input"]) == []


class ThrottledOnce:
    """A writer whose first put_records leaves one event unwritten (throttled), as Kinesis can."""

    def __init__(self, fail_position: int):
        self.fail_position = fail_position
        self.calls = []
        self.written = []

    def __call__(self, events):
        self.calls.append([e["prediction"]["ride_id"] for e in events])
        if len(self.calls) == 1:
            self.written += [e for i, e in enumerate(events) if i != self.fail_position]
            raise PutRecordsFailed("1 of 5 prediction events could not be written", [self.fail_position])
        self.written += events


def test_retry_starts_at_lowest_failed_and_resends_later_successes(kinesis, streams, stub_model, tmp_path):
    """AWS's ReportBatchItemFailures: checkpoint before the lowest failed record, retry from it,
    the successes after it included (they are predicted twice: at-least-once)."""
    writer = ThrottledOnce(fail_position=2)
    service = ModelService(stub_model, "v", callbacks=[writer])
    checkpoint = Checkpoint(tmp_path / "cp.json")
    seen, checkpoint_at_retry = [], []

    def handler(event, context):
        seen.append([r["kinesis"]["sequenceNumber"] for r in event["Records"]])
        if len(seen) == 2:
            checkpoint_at_retry.append(Checkpoint(tmp_path / "cp.json").get("shardId-000000000000"))
        return service.lambda_handler(event, context)

    seqs = put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(5)])
    stats = EventSourceRunner(handler, streams["input"], checkpoint=checkpoint, max_retries=1).run(once=True)
    assert seen == [seqs, seqs[2:]]
    assert checkpoint_at_retry == [seqs[1]]  # saved just before the lowest failed record
    assert writer.calls == [[f"ride-{i}" for i in range(5)], ["ride-2", "ride-3", "ride-4"]]
    assert Counter(e["prediction"]["ride_id"] for e in writer.written) == {
        "ride-0": 1,
        "ride-1": 1,
        "ride-2": 1,
        "ride-3": 2,
        "ride-4": 2,
    }
    assert stats.failed_records == 0 and checkpoint.get("shardId-000000000000") == seqs[-1]


@pytest.mark.parametrize(
    "items",
    [
        [{"itemIdentifier": ""}],
        [{"itemIdentifier": None}],
        [{"itemId": "1"}],
        [{"itemIdentifier": "no-such-seq"}],
        ["1"],
    ],
)
def test_bad_item_identifier_fails_the_whole_batch(items, kinesis, streams, tmp_path):
    seen = []

    def handler(event, context):
        seen.append([r["kinesis"]["sequenceNumber"] for r in event["Records"]])
        return {"batchItemFailures": items} if len(seen) == 1 else {"batchItemFailures": []}

    seqs = put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(3)])
    EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True)
    assert seen == [seqs, seqs]


def test_exhausted_retries_send_the_failing_part_to_the_destination(kinesis, s3, settings, streams, tmp_path):
    seen = []
    seqs = put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(5)])

    def always_fails_record_2(event, context):
        seen.append([r["kinesis"]["sequenceNumber"] for r in event["Records"]])
        return {"batchItemFailures": [{"itemIdentifier": seqs[2]}]}

    checkpoint = Checkpoint(tmp_path / "cp.json")
    stats = EventSourceRunner(always_fails_record_2, streams["input"], checkpoint=checkpoint, max_retries=2).run(
        once=True
    )
    assert seen == [seqs, seqs[2:], seqs[2:]]
    (failure,) = failures_in(s3, settings.predictions_bucket, streams["input"])
    info = failure["KinesisBatchInfo"]
    assert (info["startSequenceNumber"], info["endSequenceNumber"], info["batchSize"]) == (seqs[2], seqs[4], 3)
    assert failure["requestContext"] == {"condition": "RetryAttemptsExhausted", "approximateInvokeCount": 3}
    assert stats.failed_records == 3 and checkpoint.get("shardId-000000000000") == seqs[-1]


# ---------------------------------------------------------------- the stream's incarnation
def collecting_handler(stub_model):
    written = []
    return ModelService(stub_model, "v", callbacks=[written.extend]).lambda_handler, written


def recreate(kinesis, name: str) -> None:
    """What a restart of the local Kinesis amounts to: the same name, a new stream numbered from 1."""
    kinesis.delete_stream(StreamName=name)
    kinesis.get_waiter("stream_not_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})
    kinesis.create_stream(StreamName=name, ShardCount=1)
    kinesis.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})


def test_recreated_stream_is_read_from_trim_horizon(kinesis, streams, stub_model, tmp_path, caplog):
    """`stream run --once` (checkpoint at 5) -> the stream is created again -> 3 new rides -> all 3 delivered."""
    handler, written = collecting_handler(stub_model)
    seqs = put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(5)])
    assert (
        EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True).records
        == 5
    )
    assert Checkpoint(tmp_path / "cp.json").get("shardId-000000000000") == seqs[-1] == "5"
    recreate(kinesis, streams["input"])
    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(100, 103)])

    stats = EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True)
    assert stats.records == 3
    assert [e["prediction"]["ride_id"] for e in written[5:]] == ["ride-100", "ride-101", "ride-102"]
    assert "deleted and created again" in caplog.text
    saved = Checkpoint(tmp_path / "cp.json")
    assert saved.get("shardId-000000000000") == "3"
    assert saved.stream == stream_identity(
        kinesis.describe_stream_summary(StreamName=streams["input"])["StreamDescriptionSummary"]
    )


def test_runner_made_before_the_restart_notices_it(kinesis, streams, stub_model, tmp_path):
    """A long-running runner: the stream is created again while it waits between polls."""
    handler, written = collecting_handler(stub_model)
    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(5)])
    waits = []

    def sleep(seconds):  # the runner's idle wait: the local Kinesis restarts meanwhile
        waits.append(seconds)
        if len(waits) == 1:
            recreate(kinesis, streams["input"])
            put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(100, 103)])

    runner = EventSourceRunner(
        handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"), poll_interval=0.01, sleep=sleep
    )
    stats = runner.run(max_batches=2)
    assert (stats.batches, stats.records) == (2, 8)
    assert [e["prediction"]["ride_id"] for e in written] == [f"ride-{i}" for i in (0, 1, 2, 3, 4, 100, 101, 102)]


def test_failed_batches_of_two_stream_incarnations_are_both_kept(kinesis, s3, settings, streams, tmp_path):
    """The same failing range in a stream and in the stream created again under its name (numbered from 1
    again): two failure objects, the second beside the first, not over it."""
    objects = []
    for incarnation in range(2):
        if incarnation:
            recreate(kinesis, streams["input"])
        seqs = put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(3)])

        def fails_from_record_1(event, context, failing=seqs[1]):
            return {"batchItemFailures": [{"itemIdentifier": failing}]}

        runner = EventSourceRunner(
            fails_from_record_1, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"), max_retries=0
        )
        stats = runner.run(once=True)
        assert stats.failed_records == 2
        objects.extend(stats.failure_objects)
    assert objects[0] != objects[1] and objects[0].rsplit("/", 1)[1] == objects[1].rsplit("/", 1)[1]
    stored = failures_in(s3, settings.predictions_bucket, streams["input"])
    assert len(stored) == 2
    assert {f["KinesisBatchInfo"]["streamArn"] for f in stored} == {runner.stream_arn}
    assert [
        (f["KinesisBatchInfo"]["startSequenceNumber"], f["KinesisBatchInfo"]["endSequenceNumber"]) for f in stored
    ] == [(seqs[1], seqs[2])] * 2


@pytest.mark.parametrize("with_identity", [False, True], ids=["file-without-stream", "file-of-this-stream"])
def test_checkpoint_beyond_the_shard_is_read_from_trim_horizon(
    with_identity, kinesis, streams, stub_model, tmp_path, caplog
):
    """After a crash of the local Kinesis the checkpoint said 600; a fresh stream with 5 records delivers all 5."""
    handler, written = collecting_handler(stub_model)
    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(5)])
    saved = {"shards": {"shardId-000000000000": "600"}}
    if with_identity:  # the range check alone catches it
        saved["stream"] = stream_identity(
            kinesis.describe_stream_summary(StreamName=streams["input"])["StreamDescriptionSummary"]
        )
    (tmp_path / "cp.json").write_text(json.dumps(saved))
    stats = EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True)
    assert stats.records == 5
    assert [e["prediction"]["ride_id"] for e in written] == [f"ride-{i}" for i in range(5)]
    assert "sequence number 600 is beyond the shard's last record" in caplog.text
    assert Checkpoint(tmp_path / "cp.json").get("shardId-000000000000") == "5"


def test_checkpoint_at_the_last_record_resumes_after_it(kinesis, streams, stub_model, tmp_path, caplog):
    """The range check does not mistake a caught-up checkpoint for a stale one."""
    handler, written = collecting_handler(stub_model)
    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(3)])
    EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True)
    assert (
        EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True).records
        == 0
    )
    put_payloads(kinesis, streams["input"], [ride_payload(3)])
    assert (
        EventSourceRunner(handler, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json")).run(once=True).records
        == 1
    )
    assert [e["prediction"]["ride_id"] for e in written] == [f"ride-{i}" for i in range(4)]
    assert "TRIM_HORIZON" not in caplog.text


def _runner(streams, checkpoint, *extra) -> subprocess.Popen:
    cmd = [
        PYTHON,
        "-m",
        "workbench.event_source",
        "--stream",
        streams["input"],
        "--checkpoint",
        str(checkpoint),
        "--poll-interval",
        "0.2",
        *extra,
    ]
    return subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_stream_no_skip_no_repeat(trained_model, kinesis, s3, settings, streams, tmp_path):
    """Kill -9 the runner after its first checkpointed batch, with a backlog left; a restart
    finishes the backlog and new rides: every valid ride exactly once, poisoned ones dead-lettered."""
    n, poisoned = 120, {3, 77}
    seqs = put_payloads(kinesis, streams["input"], [ride_payload(i, poisoned=i in poisoned) for i in range(n)])
    checkpoint = tmp_path / "cp.json"
    # --pause: a gap after each checkpoint, where a kill lands between batches.
    proc = _runner(streams, checkpoint, "--batch-size", "40", "--pause", "5")
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if checkpoint.is_file() and Checkpoint(checkpoint).get("shardId-000000000000") == seqs[39]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(read_stream(kinesis, streams["output"])) == 39  # batch 1 done, ride 3 dead-lettered
    # more rides arrive while the runner is down
    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(n, n + 10)])
    proc = _runner(streams, checkpoint, "--once")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert (
        "processed 90 record(s) in 1 batch(es); 1 dead-lettered by the function; "
        "0 sent to the failure destination" in output
    )

    out = read_stream(kinesis, streams["output"])
    ids = Counter(e["prediction"]["ride_id"] for e in out)
    assert len(out) == n + 10 - len(poisoned)
    assert set(ids) == {f"ride-{i}" for i in range(n + 10) if i not in poisoned} and max(ids.values()) == 1
    letters = read_dead_letters(get_settings().dead_letter_prefix)
    assert sorted(letter["kinesis"]["sequenceNumber"] for letter in letters) == sorted(seqs[i] for i in poisoned)
    assert failures_in(s3, settings.predictions_bucket, streams["input"]) == []


def test_runner_cli_missing_stream_fails_with_sentence(stack, tmp_path):
    proc = subprocess.run(
        [
            PYTHON,
            "-m",
            "workbench.event_source",
            "--stream",
            "no-such-stream",
            "--once",
            "--checkpoint",
            str(tmp_path / "cp.json"),
        ],
        env=python_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "no-such-stream" in proc.stderr


def test_checkpoint_file_is_replaced_atomically_and_validated(tmp_path):
    path = tmp_path / "cp.json"
    checkpoint = Checkpoint(path)
    checkpoint.save("shardId-000000000000", "41")
    checkpoint.save("shardId-000000000001", "7")
    assert Checkpoint(path).positions == {"shardId-000000000000": "41", "shardId-000000000001": "7"}
    assert Checkpoint(path).stream is None  # not bound to a stream yet
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]  # no temp files left behind
    path.write_text("{half a fi")
    with pytest.raises(ValueError, match="unreadable.*--reset"):
        Checkpoint(path)
