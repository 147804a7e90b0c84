"""The benchmark's pieces (the numbers themselves are printed by `python -m benchmarks.stream`, never asserted)."""

from __future__ import annotations

from benchmarks.stream import compare_designs, synthetic_event
from ride_duration.config import get_settings
from ride_duration.registry import load_model, production_model_s3
from ride_duration.stream import ModelService
from ride_duration.stream.codec import decode_data
from workbench.event_source import kinesis_event


def test_kinesis_event_by_hand_has_lambda_shape(canonical_event):
    event = kinesis_event([{"ride": {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}, "ride_id": 256}])
    (record,) = event["Records"]
    (course,) = canonical_event["Records"]
    assert set(record) == set(course) and set(record["kinesis"]) == set(course["kinesis"])
    assert record["eventID"] == "shardId-000000000000:1"
    assert decode_data(record["kinesis"]["data"]) == decode_data(course["kinesis"]["data"])


def test_compare_designs_counts_output_calls(kinesis, make_stream, stub_model):
    event = synthetic_event(100)
    result = compare_designs(stub_model, "v", kinesis, make_stream("b"), make_stream("l"), event, repeats=1)
    assert result["writes"] == {"batch": 1, "per_record": 100}
    assert result["records"] == 100 and result["same_predictions"] is True
    assert len(stub_model.calls) == 1 + 100  # one call for the batch, one per record in the 2022 loop


def test_production_model_s3_is_where_the_registry_points(trained_model, canonical_event):
    where = production_model_s3(get_settings())
    logged = trained_model["logged"]
    assert (where["MODEL_ID"], where["EXPERIMENT_ID"], where["uri"]) == (
        logged.model_id,
        logged.experiment_id,
        logged.s3_uri,
    )
    model, version = load_model(
        where["uri"], settings=get_settings()
    )  # what a Lambda with MODEL_ID + EXPERIMENT_ID loads
    response = ModelService(model, version).lambda_handler(canonical_event)
    expected = trained_model["pipeline"].predict([{"PU_DO": "130_205", "trip_distance": 3.66}])[0]
    assert abs(response["predictions"][0]["prediction"]["ride_duration"] - expected) < 1e-9
