"""The producer and reader scripts against the local Kinesis, as a user runs them."""

from __future__ import annotations

import json
import subprocess

from ride_duration.stream import S3DeadLetters
from ride_duration.stream.writer import arrival_stamp
from workbench.event_source import kinesis_event
from workbench.streams import put_ride, read_stream

from .conftest import REPO
from .helpers import PYTHON, python_env


def run_script(name: str, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(REPO / "scripts" / name), *args],
        env=python_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_put_ride_event(kinesis, make_stream):
    name = make_stream("put")
    proc = run_script(
        "put_ride_event.py", "--stream", name, "--ride-id", "256", "--pu", "130", "--do", "205", "--distance", "3.66"
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ShardId"] == "shardId-000000000000"
    proc = run_script(
        "put_ride_event.py", "--stream", name, "--ride-id", "x1", "--data", '{"ride": {}, "ride_id": "x1"}'
    )
    assert proc.returncode == 0, proc.stderr
    assert read_stream(kinesis, name) == [
        {"ride": {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}, "ride_id": 256},
        {"ride": {}, "ride_id": "x1"},
    ]


def test_put_ride_event_errors(stack):
    proc = run_script("put_ride_event.py", "--data", "{oops")
    assert proc.returncode == 1 and "--data is not JSON" in proc.stderr
    proc = run_script("put_ride_event.py", "--stream", "no-such-stream")
    assert proc.returncode == 1 and "no-such-stream" in proc.stderr


def test_read_predictions(kinesis, make_stream):
    name = make_stream("read")
    put_ride(kinesis, name, {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}, 7)
    proc = run_script("read_predictions.py", "--stream", name)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["ride_id"] for line in proc.stdout.splitlines()] == [7]
    # LATEST: only what arrives after the iterator is taken, so nothing here.
    proc = run_script("read_predictions.py", "--stream", name, "--position", "LATEST")
    assert proc.returncode == 0 and proc.stdout == ""


def test_read_dead_letters(s3, settings, make_stream):
    uri = f"s3://{settings.predictions_bucket}/dead-letter/{make_stream('dead')}/"
    (record,) = kinesis_event([b"not json"], first_sequence=41)["Records"]
    S3DeadLetters(uri, s3)(record, "kinesis.data is not JSON: Expecting value")
    proc = run_script("read_predictions.py", "--dead-letters", uri)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert json.loads(line) | {"time": None} == {
        "uri": f"{uri}shardId-000000000000/{arrival_stamp(record['kinesis']['approximateArrivalTimestamp'])}-41.json",
        "time": None,
        "reason": "kinesis.data is not JSON: Expecting value",
        "sequenceNumber": "41",
        "data": record["kinesis"]["data"],
    }
    proc = run_script("read_predictions.py", "--dead-letters", "s3://no-such-bucket-here/x/")
    assert proc.returncode == 1 and "could not read the dead letters under s3://no-such-bucket-here/x/" in proc.stderr
