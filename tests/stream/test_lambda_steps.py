"""The course's Lambda progression (workbench.lambda_steps), each step on the events it meets:
(a)-(c) without servers, (b) and the CLI round trip on the session's Kinesis with the real AWS CLI."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ride_duration.features import InvalidRide
from ride_duration.stream import lambda_handler
from workbench.event_source import Checkpoint, EventSourceRunner, kinesis_event
from workbench.lambda_steps import STEPS, constant_handler, decode_handler, print_event_handler

RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}
AWS = str(Path(sys.executable).with_name("aws"))


def test_a_constant_answer_for_the_console_test_event():
    assert constant_handler({"ride": RIDE, "ride_id": 123}) == {"ride_duration": 10.0, "ride_id": 123}
    # Features are prepared as in every later step: a ride outside the contract fails here already.
    with pytest.raises(InvalidRide, match="trip_distance"):
        constant_handler({"ride": {**RIDE, "trip_distance": "far"}, "ride_id": 1})


def test_b_prints_the_event_it_receives(capsys):
    event = kinesis_event([{"ride": RIDE, "ride_id": 123}])
    assert print_event_handler(event) is None  # a null response: the batch succeeded
    assert json.loads(capsys.readouterr().out) == event


def test_c_decodes_every_record_into_a_prediction_event():
    event = kinesis_event([{"ride": RIDE, "ride_id": 123}, {"ride": {**RIDE, "trip_distance": 1}, "ride_id": "x"}])
    response = decode_handler(event)
    assert response == {
        "predictions": [
            {
                "model": "ride_duration_prediction_model",
                "version": "constant",
                "prediction": {"ride_duration": 10.0, "ride_id": 123},
            },
            {
                "model": "ride_duration_prediction_model",
                "version": "constant",
                "prediction": {"ride_duration": 10.0, "ride_id": "x"},
            },
        ]
    }
    json.dumps(response)  # the answer is JSON as Lambda returns it


def test_d_is_the_handler_that_ships():
    assert STEPS["d"] is lambda_handler
    assert [STEPS[k] for k in "abc"] == [constant_handler, print_event_handler, decode_handler]


def aws(*args: str) -> str:
    """The AWS CLI (v1, from the dev environment) against the session's stack (its env names the endpoints)."""
    done = subprocess.run([AWS, *args], capture_output=True, text=True, env=dict(os.environ), timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_b_on_the_local_trigger_a_record_put_with_the_cli(kinesis, make_stream, tmp_path, capsys):
    stream = make_stream("steps")
    payload = json.dumps({"ride": RIDE, "ride_id": 123})
    # CLI v1 sends --data as given (v2 needs --cli-binary-format raw-in-base64-out for the same).
    put = json.loads(aws("kinesis", "put-record", "--stream-name", stream, "--partition-key", "1", "--data", payload))
    assert put["ShardId"] == "shardId-000000000000"

    runner = EventSourceRunner(print_event_handler, stream, client=kinesis, checkpoint=Checkpoint(tmp_path / "cp.json"))
    stats = runner.run(once=True)
    assert (stats.batches, stats.records) == (1, 1)
    (record,) = json.loads(capsys.readouterr().out)["Records"]
    assert record["kinesis"]["sequenceNumber"] == put["SequenceNumber"]
    assert record["kinesis"]["partitionKey"] == "1"
    assert base64.b64decode(record["kinesis"]["data"]).decode() == payload
    assert decode_handler({"Records": [record]})["predictions"][0]["prediction"] == {
        "ride_duration": 10.0,
        "ride_id": 123,
    }


def test_reading_a_stream_with_the_cli_as_the_course_does(kinesis, make_stream):
    stream = make_stream("steps")
    kinesis.put_record(StreamName=stream, Data=b'{"prediction": 1}', PartitionKey="7")
    iterator = aws(
        "kinesis", "get-shard-iterator", "--stream-name", stream,
        "--shard-id", "shardId-000000000000", "--shard-iterator-type", "TRIM_HORIZON",
        "--query", "ShardIterator", "--output", "text",
    ).strip()  # fmt: skip
    records = json.loads(aws("kinesis", "get-records", "--shard-iterator", iterator))["Records"]
    assert [base64.b64decode(r["Data"]) for r in records] == [b'{"prediction": 1}']
    assert [r["PartitionKey"] for r in records] == ["7"]
