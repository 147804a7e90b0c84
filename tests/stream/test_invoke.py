"""The invoke endpoint (like the image's RIE) with the registered model, and the course's test_docker.py against it."""

from __future__ import annotations

import json
import subprocess
from unittest.mock import ANY

import pytest
import requests

from ride_duration.stream.codec import encode_data
from ride_duration.stream.writer import arrival_stamp
from workbench.invoke import INVOKE_PATH, start_invoke_server
from workbench.stack import free_port
from workbench.streams import read_dead_letters, read_stream

from .conftest import REPO
from .helpers import PYTHON, ride_payload, stop


@pytest.fixture(scope="module")
def invoke_url(trained_model):
    port = free_port()
    proc = start_invoke_server(port, test_run=True)
    yield f"http://127.0.0.1:{port}{INVOKE_PATH}"
    stop(proc)


def expected_minutes(trained_model, pu=130, do=205, distance=3.66) -> float:
    return float(trained_model["pipeline"].predict([{"PU_DO": f"{pu}_{do}", "trip_distance": distance}])[0])


def test_course_test_docker_script(invoke_url, trained_model):
    proc = subprocess.run(
        [PYTHON, str(REPO / "scripts" / "test_docker.py"), "--url", invoke_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    response = json.loads(proc.stdout)
    assert response == {
        "predictions": [
            {
                "model": "ride_duration_prediction_model",
                "version": trained_model["logged"].run_id,
                "prediction": {"ride_duration": pytest.approx(expected_minutes(trained_model)), "ride_id": 256},
                "source": {"event_id": ANY, "sequence_number": ANY},
            }
        ]
    }


def record_with(canonical_event, seq: str, data: str) -> dict:
    record = json.loads(json.dumps(canonical_event["Records"][0]))
    record["kinesis"]["sequenceNumber"] = seq
    record["kinesis"]["data"] = data
    return record


def test_bad_record_over_http_is_dead_lettered(invoke_url, canonical_event):
    bad = record_with(canonical_event, "2", "!!!")
    response = requests.post(invoke_url, json={"Records": [canonical_event["Records"][0], bad]}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert "batchItemFailures" not in body  # it would fail again: not retried
    assert [(d["itemIdentifier"], d["location"]) for d in body["deadLetters"]] == [("2", None)]  # TEST_RUN: logged
    assert "not valid base64" in body["deadLetters"][0]["reason"]
    assert [p["prediction"]["ride_id"] for p in body["predictions"]] == [256]


def test_out_of_range_distance_costs_no_other_ride(invoke_url, canonical_event, trained_model):
    """{"Records": [<trip_distance 1e308>, <valid>]} answered 200 with X-Amz-Function-Error: Unhandled."""
    far = record_with(
        canonical_event,
        "1",
        encode_data({"ride": {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 1e308}, "ride_id": 1}),
    )
    valid = record_with(canonical_event, "2", canonical_event["Records"][0]["kinesis"]["data"])
    response = requests.post(invoke_url, json={"Records": [far, valid]}, timeout=30)
    assert response.status_code == 200 and "X-Amz-Function-Error" not in response.headers
    body = response.json()
    assert [p["prediction"] for p in body["predictions"]] == [
        {"ride_duration": pytest.approx(expected_minutes(trained_model)), "ride_id": 256}
    ]
    (dead,) = body["deadLetters"]
    assert dead["itemIdentifier"] == "1"
    assert "field 'trip_distance' must be between 0 and 500 miles, got 1e+308" in dead["reason"]
    assert "batchItemFailures" not in body


def test_event_nested_too_deep_gets_400(invoke_url):
    response = requests.post(invoke_url, data=b"[" * 50_000 + b"]" * 50_000, timeout=30)
    assert response.status_code == 400
    assert "the request body must be a JSON event" in response.json()["errorMessage"]


def test_non_json_payload_gets_400_json(invoke_url):
    response = requests.post(invoke_url, data=b"not json", timeout=30)
    assert response.status_code == 400
    assert "the request body must be a JSON event" in response.json()["errorMessage"]


def test_function_error_answers_like_lambda(invoke_url, canonical_event):
    """A handler that raises: 200 with the error as the body and X-Amz-Function-Error, as the RIE does;
    the endpoint keeps serving."""
    response = requests.post(invoke_url, data=b'{"hello": 1}', timeout=30)
    assert response.status_code == 200
    assert response.headers["X-Amz-Function-Error"] == "Unhandled"
    assert response.json()["errorType"] == "InvalidEvent"
    assert "not a Kinesis event" in response.json()["errorMessage"]
    again = requests.post(invoke_url, json=canonical_event, timeout=30)
    assert again.status_code == 200 and "X-Amz-Function-Error" not in again.headers


def test_invoke_server_writes_predictions_and_dead_letters(
    trained_model, kinesis, make_stream, canonical_event, settings
):
    """Without TEST_RUN the module-level handler writes each prediction event to PREDICTIONS_STREAM_NAME
    and each unscorable record to DEAD_LETTER_URI."""
    out = make_stream("invoke-out")
    dead_letter_uri = f"s3://{settings.predictions_bucket}/dead-letter/{out}/"
    port = free_port()
    proc = start_invoke_server(
        port, test_run=False, env={"PREDICTIONS_STREAM_NAME": out, "DEAD_LETTER_URI": dead_letter_uri}
    )
    try:
        event = {
            "Records": [
                canonical_event["Records"][0],
                record_with(canonical_event, "2", encode_data(ride_payload(1))),
                record_with(
                    canonical_event,
                    "3",
                    encode_data(
                        {
                            "ride": {"PULocationID": 9999, "DOLocationID": 1, "trip_distance": 1.0},
                            "ride_id": "zone-9999",
                        }
                    ),
                ),
            ]
        }
        response = requests.post(f"http://127.0.0.1:{port}{INVOKE_PATH}", json=event, timeout=30)
        assert response.status_code == 200
    finally:
        stop(proc)
    written = read_stream(kinesis, out)
    assert written == response.json()["predictions"]
    assert [e["prediction"]["ride_id"] for e in written] == [256, "ride-1"]
    (letter,) = read_dead_letters(dead_letter_uri)
    arrival = arrival_stamp(letter["kinesis"]["approximateArrivalTimestamp"])
    assert letter["uri"] == f"{dead_letter_uri}shardId-000000000000/{arrival}-3.json"
    assert "'PULocationID' must be a TLC zone id between 1 and 265, got 9999" in letter["reason"]
    assert response.json()["deadLetters"] == [
        {"itemIdentifier": "3", "reason": letter["reason"], "location": letter["uri"]}
    ]
