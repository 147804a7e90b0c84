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

from ride_duration import stream
from ride_duration.stream import Checkpoint, EventSourceRunner, ModelService, build_service, read_stream

from .helpers import PYTHON, put_payloads, python_env, ride_payload


def failures_in(s3, bucket: str, stream_name: str) -> list[dict]:
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"failures/{stream_name}/")
    return [json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()) for o in listing.get("Contents", [])]


@pytest.fixture
def streams(make_stream, monkeypatch):
    """A fresh input and output stream; the handler writes to the output one."""
    names = {"input": make_stream("rides"), "output": make_stream("preds")}
    monkeypatch.setenv("INPUT_STREAM_NAME", names["input"])
    monkeypatch.setenv("PREDICTIONS_STREAM_NAME", names["output"])
    return names


@pytest.fixture
def s3(stack):
    from ride_duration.aws import s3_client

    return s3_client()


def test_lambda_record_shape(kinesis, streams, tmp_path):
    (seq,) = put_payloads(kinesis, streams["input"], [ride_payload(0)])
    runner = EventSourceRunner(lambda e, c: {}, streams["input"], checkpoint=Checkpoint(tmp_path / "cp.json"))
    it = kinesis.get_shard_iterator(StreamName=streams["input"], ShardId="shardId-000000000000",
                                    ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    (raw,) = kinesis.get_records(ShardIterator=it)["Records"]
    record = stream.lambda_record(raw, "shardId-000000000000", runner.stream_arn, "eu-west-1")
    assert set(record) == {"kinesis", "eventSource", "eventVersion", "eventID", "eventName",
                           "invokeIdentityArn", "awsRegion", "eventSourceARN"}
    assert record["eventID"] == f"shardId-000000000000:{seq}"
    assert record["eventSourceARN"].endswith(f":stream/{streams['input']}")
    assert record["kinesis"]["kinesisSchemaVersion"] == "1.0" and record["kinesis"]["sequenceNumber"] == seq
    assert isinstance(record["kinesis"]["approximateArrivalTimestamp"], float)
    assert stream.decode_data(record["kinesis"]["data"]) == ride_payload(0)


def test_end_to_end_registered_model(trained_model, kinesis, s3, streams, settings, tmp_path):
    """N rides, k poisoned, 1 shard, batches of 100: N-k predictions once each, k in the failure destination."""
    n, poisoned = 230, {5, 150, 229}
    payloads = [ride_payload(i, poisoned=i in poisoned) for i in range(n)]
    seqs = put_payloads(kinesis, streams["input"], payloads)
    service = build_service()  # the registered model (alias production), writer to the output stream
    assert service.version == trained_model["logged"].run_id
    checkpoint = Checkpoint(tmp_path / "cp.json")
    runner = EventSourceRunner(service.lambda_handler, streams["input"], checkpoint=checkpoint)
    stats = runner.run(once=True)
    assert (stats.batches, stats.records, stats.failed_records) == (3, n, len(poisoned))
    # batch 1 (5 poisoned) and batch 2 (150) retried twice each; batch 3 (229) too: 3 + 3*2 invocations
    assert stats.invocations == 3 + 3 * 2

    out = read_stream(kinesis, streams["output"])
    ids = Counter(e["prediction"]["ride_id"] for e in out)
    assert len(out) == n - len(poisoned)
    assert set(ids) == {f"ride-{i}" for i in range(n) if i not in poisoned} and max(ids.values()) == 1
    # values: the registered pipeline's, for the same features
    pipeline = trained_model["pipeline"]
    first = next(e for e in out if e["prediction"]["ride_id"] == "ride-0")
    ride = payloads[0]["ride"]
    expected = pipeline.predict([{"PU_DO": f"{ride['PULocationID']}_{ride['DOLocationID']}",
                                  "trip_distance": ride["trip_distance"]}])[0]
    assert first["prediction"]["ride_duration"] == pytest.approx(expected)
    assert first["model"] == "ride_duration_prediction_model" and first["version"] == service.version

    failures = failures_in(s3, settings.predictions_bucket, streams["input"])
    failed_seqs = sorted((r["sequenceNumber"] for f in failures for r in f["records"]), key=int)
    assert failed_seqs == [seqs[i] for i in sorted(poisoned)]
    assert all(f["requestContext"]["condition"] == "RetryAttemptsExhausted" for f in failures)
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
    assert json.loads((tmp_path / "cp.json").read_text()) == {"shards": {"shardId-000000000000": seqs[19]}}
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


def test_retry_resends_failed_records_only(kinesis, streams, stub_model, tmp_path):
    service = ModelService(stub_model, "v")
    seen = []

    def handler(event, context):
        seen.append([r["kinesis"]["sequenceNumber"] for r in event["Records"]])
        return service.lambda_handler(event, context)

    seqs = put_payloads(kinesis, streams["input"],
                        [ride_payload(0), ride_payload(1, poisoned=True), ride_payload(2), b"\xff\xfe"])
    checkpoint = Checkpoint(tmp_path / "cp.json")
    stats = EventSourceRunner(handler, streams["input"], checkpoint=checkpoint, max_retries=1).run(once=True)
    assert seen == [seqs, [seqs[1], seqs[3]]]
    assert stats.failed_records == 2 and checkpoint.get("shardId-000000000000") == seqs[-1]


def _runner(streams, checkpoint, *extra) -> subprocess.Popen:
    cmd = [PYTHON, "-m", "ride_duration.stream", "run", "--stream", streams["input"],
           "--checkpoint", str(checkpoint), "--poll-interval", "0.2", *extra]
    return subprocess.Popen(cmd, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_stream_no_skip_no_repeat(trained_model, kinesis, s3, settings, streams, tmp_path):
    """Kill -9 the runner after its first checkpointed batch, with a backlog left; a restart
    finishes the backlog and new rides: every valid ride exactly once, poisoned ones reported."""
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
    assert len(read_stream(kinesis, streams["output"])) == 39  # batch 1 done, ride 3 failed
    # more rides arrive while the runner is down
    put_payloads(kinesis, streams["input"], [ride_payload(i) for i in range(n, n + 10)])
    proc = _runner(streams, checkpoint, "--once")
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    assert "processed 90 record(s) in 1 batch(es); 1 sent to the failure destination" in output

    out = read_stream(kinesis, streams["output"])
    ids = Counter(e["prediction"]["ride_id"] for e in out)
    assert len(out) == n + 10 - len(poisoned)
    assert set(ids) == {f"ride-{i}" for i in range(n + 10) if i not in poisoned} and max(ids.values()) == 1
    failures = failures_in(s3, settings.predictions_bucket, streams["input"])
    assert sorted(r["sequenceNumber"] for f in failures for r in f["records"]) == sorted(seqs[i] for i in poisoned)


def test_runner_cli_missing_stream_fails_with_sentence(stack, tmp_path):
    proc = subprocess.run([PYTHON, "-m", "ride_duration.stream", "run", "--stream", "no-such-stream", "--once",
                           "--checkpoint", str(tmp_path / "cp.json")],
                          env=python_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "no-such-stream" in proc.stderr


def test_checkpoint_file_is_replaced_atomically_and_validated(tmp_path):
    path = tmp_path / "cp.json"
    checkpoint = Checkpoint(path)
    checkpoint.save("shardId-000000000000", "41")
    checkpoint.save("shardId-000000000001", "7")
    assert Checkpoint(path).positions == {"shardId-000000000000": "41", "shardId-000000000001": "7"}
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]  # no temp files left behind
    path.write_text("{half a fi")
    with pytest.raises(ValueError, match="unreadable.*--reset"):
        Checkpoint(path)
