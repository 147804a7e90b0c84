"""The producer and reader scripts against the local Kinesis, as a user runs them."""

from __future__ import annotations

import json
import subprocess

from ride_duration.stream import put_ride, read_stream

from .conftest import REPO
from .helpers import PYTHON, python_env


def run_script(name: str, *args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(REPO / "scripts" / name), *args], env=python_env(**env),
                          capture_output=True, text=True, timeout=60)


def test_put_ride_event(kinesis, make_stream):
    name = make_stream("put")
    proc = run_script("put_ride_event.py", "--stream", name, "--ride-id", "256", "--pu", "130", "--do", "205",
                      "--distance", "3.66")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ShardId"] == "shardId-000000000000"
    proc = run_script("put_ride_event.py", "--stream", name, "--ride-id", "x1", "--data", '{"ride": {}, "ride_id": "x1"}')
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
