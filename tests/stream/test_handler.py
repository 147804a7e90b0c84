"""The handler without a stream: ModelService with a stub model and a list as callback."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from benchmarks.stream import constant_handler
from ride_duration.stream import ModelService, handler
from ride_duration.stream.codec import InvalidEvent, decode_data, encode_data


def make_record(payload, seq: str) -> dict:
    data = payload if isinstance(payload, str) else encode_data(payload)
    return {"kinesis": {"partitionKey": "1", "sequenceNumber": seq, "data": data}, "eventSource": "aws:kinesis"}


def ride(i: int, distance=3.66, **extra) -> dict:
    return {"ride": {"PULocationID": 130, "DOLocationID": 205, "trip_distance": distance, **extra}, "ride_id": i}


def test_canonical_event_stub_model(canonical_event, stub_model):
    written = []
    service = ModelService(stub_model, "v1", callbacks=[written.append])
    response = service.lambda_handler(canonical_event, None)
    record = canonical_event["Records"][0]
    expected = {
        "model": "ride_duration_prediction_model",
        "version": "v1",
        "prediction": {"ride_duration": 3.66, "ride_id": 256},
        # the source record: a retry repeats it, a second request for ride 256 would not
        "source": {"event_id": record["eventID"], "sequence_number": record["kinesis"]["sequenceNumber"]},
    }
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


def raw(text: str) -> str:
    """kinesis.data for bytes a producer put as is (JSON Python itself would refuse to write)."""
    return base64.b64encode(text.encode()).decode()


POISONS = {
    "bad-base64": ("not base64 at all!", "kinesis.data is not valid base64"),
    "bad-json": (raw("{not json"), "kinesis.data is not JSON"),
    "not-utf8": (base64.b64encode(b"\xff\xfe").decode(), "kinesis.data is not JSON"),
    "not-an-object": (encode_data([1, 2]), "must be a JSON object"),
    "deep-json": (raw("[" * 50_000 + "]" * 50_000), "nested too deeply"),
    "5000-digit-ride-id": (
        raw('{"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": ' + "7" * 5000 + "}"),
        "Exceeds the limit (4300 digits)",
    ),
    "no-ride": ({"ride_id": 7}, "field 'ride' is missing"),
    "no-ride-id": (
        {"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}},
        "field 'ride_id' is missing",
    ),
    "dict-ride-id": (
        {"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": {"a": 1}},
        "must be a string or an integer",
    ),
    "long-ride-id": (
        {"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": "x" * 257},
        "1 to 256 characters",
    ),
    "300-digit-ride-id": (
        raw('{"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": ' + "9" * 300 + "}"),
        "1 to 256 characters",
    ),
    "surrogate-ride-id": (
        raw('{"ride": {"PULocationID": 1, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": "\\ud800"}'),
        "not valid Unicode",
    ),
    "missing-field": ({"ride": {"PULocationID": 1, "trip_distance": 1.0}, "ride_id": 8}, "'DOLocationID' is missing"),
    "string-distance": (ride(9, distance="far"), "must be a number, got 'far'"),
    "bool-distance": (ride(10, distance=True), "must be a number, got True"),
    "fractional-zone": (
        {"ride": {"PULocationID": 1.5, "DOLocationID": 2, "trip_distance": 1.0}, "ride_id": 11},
        "must be an integer",
    ),
    "zone-0": (ride(12, PULocationID=0), "'PULocationID' must be a TLC zone id between 1 and 265, got 0"),
    "zone-9999": (ride(13, DOLocationID=9999), "'DOLocationID' must be a TLC zone id between 1 and 265, got 9999"),
    "distance-minus-5": (ride(14, distance=-5), "between 0 and 500 miles, got -5"),
    "distance-3.5e38": (ride(15, distance=3.5e38), "between 0 and 500 miles, got 3.5e+38"),
    "distance-1e308": (ride(16, distance=1e308), "between 0 and 500 miles, got 1e+308"),
}


class DeadLetterList:
    """A dead-letter location in memory; `fail_on`: sequence numbers whose write raises (a transient fault)."""

    def __init__(self, fail_on=()):
        self.letters = []
        self.fail_on = set(fail_on)

    def __call__(self, record, reason):
        if record["kinesis"]["sequenceNumber"] in self.fail_on:
            raise ConnectionError("S3 is down")
        self.letters.append((record["kinesis"]["sequenceNumber"], reason))
        return f"memory://{record['kinesis']['sequenceNumber']}"


@pytest.mark.parametrize("name", sorted(POISONS))
def test_poisoned_record_is_dead_lettered_not_retried(name, stub_model, caplog):
    payload, reason = POISONS[name]
    records = [make_record(ride(1), "s1"), make_record(payload, "s2"), make_record(ride(3), "s3")]
    written, letters = [], DeadLetterList()
    service = ModelService(stub_model, "v", callbacks=[written.append], dead_letters=letters)
    response = service.lambda_handler({"Records": records})
    assert "batchItemFailures" not in response  # never retried: it would fail the same way
    assert [p["prediction"]["ride_id"] for p in response["predictions"]] == [1, 3]
    assert [len(batch) for batch in written] == [2]
    ((seq, why),) = letters.letters
    assert seq == "s2" and reason in why
    assert response["deadLetters"] == [{"itemIdentifier": "s2", "reason": why, "location": "memory://s2"}]
    assert "sequenceNumber s2" in caplog.text  # the reason is logged
    json.dumps(response, allow_nan=False)  # the response is JSON as Lambda must send it


def test_validation_message_names_the_field(stub_model, caplog):
    ModelService(stub_model, "v").lambda_handler({"Records": [make_record(ride(9, distance="far"), "s9")]})
    assert "field 'trip_distance' must be a number, got 'far'" in caplog.text


def test_all_records_bad_no_model_call_no_write(stub_model):
    written = []
    event = {"Records": [make_record("%%%", "a"), make_record({"ride_id": 1}, "b")]}
    response = ModelService(stub_model, "v", callbacks=[written.append]).lambda_handler(event)
    assert response["predictions"] == [] and "batchItemFailures" not in response
    assert [d["itemIdentifier"] for d in response["deadLetters"]] == ["a", "b"]
    assert [d["location"] for d in response["deadLetters"]] == [None, None]  # no location: logged only
    assert stub_model.calls == [] and written == []


class PickyModel:
    """Fails the whole call when a ride has the `poison` distance, like a forest refusing one row."""

    def __init__(self, poison=None, broken=False):
        self.poison, self.broken, self.calls = poison, broken, 0

    def predict(self, features):
        self.calls += 1
        if self.broken or any(f["trip_distance"] == self.poison for f in features):
            raise ValueError("Input X contains infinity or a value too large for dtype('float32').")
        return [f["trip_distance"] * 2 for f in features]


def test_ride_the_model_fails_on_is_dead_lettered_others_predicted():
    event = {"Records": [make_record(ride(i, distance=float(i)), str(i)) for i in range(5)]}
    letters = DeadLetterList()
    model = PickyModel(poison=3.0)
    response = ModelService(model, "v", dead_letters=letters).lambda_handler(event)
    assert [p["prediction"] for p in response["predictions"]] == [
        {"ride_duration": 2.0 * i, "ride_id": i} for i in (0, 1, 2, 4)
    ]
    ((seq, reason),) = letters.letters
    assert seq == "3" and reason.startswith("the model failed on this ride: ValueError: Input X contains infinity")
    assert "batchItemFailures" not in response
    assert model.calls == 1 + 1 + 5  # the batch, the known-good ride, then one call per ride


def test_broken_model_fails_the_invocation_and_dead_letters_nothing():
    event = {"Records": [make_record(ride(i), str(i)) for i in range(3)]}
    letters = DeadLetterList()
    with pytest.raises(ValueError, match="float32"):
        ModelService(PickyModel(broken=True), "v", dead_letters=letters).lambda_handler(event)
    assert letters.letters == []  # model unavailable: AWS retries the batch, no ride is blamed


def test_non_finite_prediction_is_dead_lettered():
    class NanModel:
        def predict(self, features):
            return [float("nan") if f["trip_distance"] == 2.0 else 1.0 for f in features]

    event = {"Records": [make_record(ride(i, distance=float(i)), str(i)) for i in range(1, 4)]}
    letters = DeadLetterList()
    response = ModelService(NanModel(), "v", dead_letters=letters).lambda_handler(event)
    assert [p["prediction"]["ride_id"] for p in response["predictions"]] == [1, 3]
    assert letters.letters == [("2", "the model predicted nan minutes for this ride")]
    json.dumps(response, allow_nan=False)


def test_dead_letter_write_failure_is_transient_and_retried_from_there(stub_model):
    """Records 0-5, 1 and 4 bad; the dead letter of 4 cannot be written: 0-3 are done,
    4 and 5 are reported (AWS retries from 4), 5 is not predicted yet."""
    payloads = [ride(0), "%%%", ride(2), ride(3), "%%%", ride(5)]
    event = {"Records": [make_record(p, str(i)) for i, p in enumerate(payloads)]}
    written, letters = [], DeadLetterList(fail_on={"4"})
    response = ModelService(stub_model, "v", [written.extend], dead_letters=letters).lambda_handler(event)
    assert response["batchItemFailures"] == [{"itemIdentifier": "4"}, {"itemIdentifier": "5"}]
    assert [e["prediction"]["ride_id"] for e in written] == [0, 2, 3]
    assert [seq for seq, _ in letters.letters] == ["1"]


def test_put_records_failure_is_reported_from_the_first_unwritten(stub_model):
    from ride_duration.stream.writer import PutRecordsFailed

    def throttled(events):
        raise PutRecordsFailed("2 of 4 prediction events could not be written", [1, 3])

    event = {"Records": [make_record(ride(i), str(i)) for i in range(5)]}
    event["Records"][1] = make_record("%%%", "1")  # dead-lettered before the write
    response = ModelService(stub_model, "v", [throttled], dead_letters=DeadLetterList()).lambda_handler(event)
    # events are rides 0, 2, 3, 4; event 1 (ride 2) is the first unwritten: retried from record 2 on
    assert response["batchItemFailures"] == [{"itemIdentifier": s} for s in ("2", "3", "4")]
    assert [p["prediction"]["ride_id"] for p in response["predictions"]] == [0]
    assert [d["itemIdentifier"] for d in response["deadLetters"]] == ["1"]


def test_record_without_sequence_number_fails_the_invocation(stub_model):
    record = make_record(ride(1), "s1")
    del record["kinesis"]["sequenceNumber"]
    with pytest.raises(InvalidEvent, match="record 0 has no kinesis.sequenceNumber"):
        ModelService(stub_model, "v").lambda_handler({"Records": [record]})


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
        {"ride_duration": 10.0, "ride_id": 256},
        {"ride_duration": 10.0, "ride_id": 2},
    ]


def test_model_loaded_once_per_container(monkeypatch, canonical_event, stub_model):
    loads = []

    def fake_load(uri, settings, **options):
        loads.append(uri)
        return stub_model, "run-x"

    monkeypatch.setattr(handler, "load_serving_model", fake_load)
    monkeypatch.setattr(handler, "_SERVICE", None)
    monkeypatch.setenv("TEST_RUN", "True")  # no writer: this test has no stream
    first = handler.lambda_handler(canonical_event, None)
    second = handler.lambda_handler(canonical_event, None)
    assert loads == [None]
    assert first == second
    assert first["predictions"][0]["version"] == "run-x"
    assert handler.get_service().callbacks == []


def test_encode_decode_roundtrip():
    payload = {"ride": {"PULocationID": 1}, "ride_id": "a"}
    assert decode_data(encode_data(payload)) == payload
    assert json.loads(base64.b64decode(encode_data(payload))) == payload
