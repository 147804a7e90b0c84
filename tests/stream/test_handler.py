"""The handler without a stream: ModelService with a stub model and a list as callback."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from ride_duration import stream
from ride_duration.stream import InvalidEvent, ModelService, constant_handler, encode_data


def make_record(payload, seq: str) -> dict:
    data = payload if isinstance(payload, str) else encode_data(payload)
    return {"kinesis": {"partitionKey": "1", "sequenceNumber": seq, "data": data}, "eventSource": "aws:kinesis"}


def ride(i: int, distance=3.66, **extra) -> dict:
    return {"ride": {"PULocationID": 130, "DOLocationID": 205, "trip_distance": distance, **extra}, "ride_id": i}


def test_canonical_event_stub_model(canonical_event, stub_model):
    written = []
    service = ModelService(stub_model, "v1", callbacks=[written.append])
    response = service.lambda_handler(canonical_event, None)
    expected = {"model": "ride_duration_prediction_model", "version": "v1",
                "prediction": {"ride_duration": 3.66, "ride_id": 256}}
    assert response == {"predictions": [expected]}  # no batchItemFailures key when all succeed
    assert written == [[expected]]
    assert stub_model.calls == [[{"PU_DO": "130_205", "trip_distance": 3.66}]]


def test_canonical_event_trained_pipeline(canonical_event, trained_model):
    pipeline = trained_model["pipeline"]
    response = ModelService(pipeline, "run-1").lambda_handler(canonical_event, None)
    expected = float(pipeline.predict([{"PU_DO": "130_205", "trip_distance": 3.66}])[0])
    (prediction,) = response["predictions"]
    assert prediction["prediction"] == {"ride_duration": pytest.approx(expected), "ride_id": 256}
    assert 1 <= expected <= 60


def test_one_model_call_for_the_batch(stub_model):
    event = {"Records": [make_record(ride(i, distance=float(i)), str(i)) for i in range(100)]}
    response = ModelService(stub_model, "v").lambda_handler(event)
    assert len(stub_model.calls) == 1 and len(stub_model.calls[0]) == 100
    assert [p["prediction"]["ride_id"] for p in response["predictions"]] == list(range(100))
    assert [p["prediction"]["ride_duration"] for p in response["predictions"]] == [float(i) for i in range(100)]


POISONS = {
    "bad-base64": "not base64 at all!",
    "bad-json": base64.b64encode(b"{not json").decode(),
    "not-an-object": encode_data([1, 2]),
    "no-ride": {"ride_id": 7},
    "no-ride-id": {"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}},
    "dict-ride-id": {"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": {"a": 1}},
    "missing-field": {"ride": {"PULocationID": 1, "trip_distance": 1.0}, "ride_id": 8},
    "string-distance": ride(9, distance="far"),
    "bool-distance": ride(10, distance=True),
    "fractional-zone": {"ride": {"PULocationID": 1.5, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": 11},
}


@pytest.mark.parametrize("name", sorted(POISONS))
def test_poisoned_record_is_reported_not_fatal(name, stub_model, caplog):
    records = [make_record(ride(1), "s1"), make_record(POISONS[name], "s2"), make_record(ride(3), "s3")]
    written = []
    response = ModelService(stub_model, "v", callbacks=[written.append]).lambda_handler({"Records": records})
    assert response["batchItemFailures"] == [{"itemIdentifier": "s2"}]
    assert [p["prediction"]["ride_id"] for p in response["predictions"]] == [1, 3]
    assert [len(batch) for batch in written] == [2]
    assert "sequenceNumber s2" in caplog.text  # the reason is logged


def test_validation_message_names_the_field(stub_model, caplog):
    ModelService(stub_model, "v").lambda_handler({"Records": [make_record(ride(9, distance="far"), "s9")]})
    assert "field 'trip_distance' must be a number, got 'far'" in caplog.text


def test_all_records_bad_no_model_call_no_write(stub_model):
    written = []
    event = {"Records": [make_record("%%%", "a"), make_record({"ride_id": 1}, "b")]}
    response = ModelService(stub_model, "v", callbacks=[written.append]).lambda_handler(event)
    assert response == {"predictions": [], "batchItemFailures": [{"itemIdentifier": "a"}, {"itemIdentifier": "b"}]}
    assert stub_model.calls == [] and written == []


@pytest.mark.parametrize("event", [{}, {"Records": "x"}, [], None])
def test_not_a_kinesis_event(event, stub_model):
    with pytest.raises(InvalidEvent, match="Records"):
        ModelService(stub_model, "v").lambda_handler(event)


def test_writer_failure_fails_the_invocation(canonical_event, stub_model):
    def broken(events):
        raise RuntimeError("stream down")

    with pytest.raises(RuntimeError, match="stream down"):
        ModelService(stub_model, "v", callbacks=[broken]).lambda_handler(canonical_event)


def test_constant_handler(canonical_event):
    event = copy.deepcopy(canonical_event)
    event["Records"].append(make_record(ride(2), "x"))
    response = constant_handler(event, None)
    assert [p["prediction"] for p in response["predictions"]] == [
        {"ride_duration": 10.0, "ride_id": 256}, {"ride_duration": 10.0, "ride_id": 2}]


def test_model_loaded_once_per_container(monkeypatch, canonical_event, stub_model):
    import ride_duration.predict

    loads = []

    def fake_load(uri=None, settings=None):
        loads.append(uri)
        return stub_model, "run-x"

    monkeypatch.setattr(ride_duration.predict, "load_model", fake_load)
    monkeypatch.setattr(stream, "_SERVICE", None)
    monkeypatch.setenv("TEST_RUN", "True")  # no writer: this test has no stream
    first = stream.lambda_handler(canonical_event, None)
    second = stream.lambda_handler(canonical_event, None)
    assert loads == [None]
    assert first == second
    assert first["predictions"][0]["version"] == "run-x"
    assert stream.get_service().callbacks == []


def test_encode_decode_roundtrip():
    payload = {"ride": {"PULocationID": 1}, "ride_id": "a"}
    assert stream.decode_data(encode_data(payload)) == payload
    assert json.loads(base64.b64decode(encode_data(payload))) == payload
