"""The invoke endpoint (like the image's RIE) with the registered model, and the course's test_docker.py against it."""

from __future__ import annotations

import json
import subprocess

import pytest
import requests

from ride_duration.stack import free_port
from ride_duration.stream import INVOKE_PATH, encode_data, read_stream, start_invoke_server

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
    proc = subprocess.run([PYTHON, str(REPO / "scripts" / "test_docker.py"), "--url", invoke_url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    response = json.loads(proc.stdout)
    assert response == {"predictions": [{
        "model": "ride_duration_prediction_model",
        "version": trained_model["logged"].run_id,
        "prediction": {"ride_duration": pytest.approx(expected_minutes(trained_model)), "ride_id": 256},
    }]}


def test_partial_batch_over_http(invoke_url, canonical_event):
    bad = json.loads(json.dumps(canonical_event["Records"][0]))
    bad["kinesis"]["sequenceNumber"] = "2"
    bad["kinesis"]["data"] = "!!!"
    response = requests.post(invoke_url, json={"Records": [canonical_event["Records"][0], bad]}, timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["batchItemFailures"] == [{"itemIdentifier": "2"}]
    assert [p["prediction"]["ride_id"] for p in body["predictions"]] == [256]


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


def test_invoke_server_writes_predictions(trained_model, kinesis, make_stream, canonical_event):
    """Without TEST_RUN the module-level handler writes each prediction event to PREDICTIONS_STREAM_NAME."""
    out = make_stream("invoke-out")
    port = free_port()
    proc = start_invoke_server(port, test_run=False, env={"PREDICTIONS_STREAM_NAME": out})
    try:
        event = {"Records": [canonical_event["Records"][0]]}
        second = json.loads(json.dumps(canonical_event["Records"][0]))
        second["kinesis"]["data"] = encode_data(ride_payload(1))
        event["Records"].append(second)
        response = requests.post(f"http://127.0.0.1:{port}{INVOKE_PATH}", json=event, timeout=30)
        assert response.status_code == 200
    finally:
        stop(proc)
    written = read_stream(kinesis, out)
    assert written == response.json()["predictions"]
    assert [e["prediction"]["ride_id"] for e in written] == [256, "ride-1"]
