"""The Flask app in-process (Flask's test client): contract, validation, errors."""

from __future__ import annotations

import copy

import pytest

from ride_duration.predict import make_prediction
from ride_duration.web import create_app
from ride_duration.web.app import APP_NAME
from ride_duration.web.payload import MAX_CONTENT_LENGTH, MAX_RIDES

RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}


@pytest.fixture(scope="module")
def client(trained_model):
    app = create_app(trained_model["pipeline"], model_version="v-test")
    return app.test_client()


def test_app_name_and_no_debug(trained_model):
    app = create_app(trained_model["pipeline"], model_version="v")
    assert app.name == APP_NAME == "duration-prediction"
    assert app.debug is False


def test_single_ride_contract(client, trained_model):
    response = client.post("/predict", json=RIDE)
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["duration", "model_version"]
    assert body["model_version"] == "v-test"
    assert isinstance(body["duration"], float)
    assert body["duration"] == pytest.approx(make_prediction(trained_model["pipeline"], RIDE)[0], abs=1e-9)


def test_list_keeps_order_and_values(client, trained_model):
    rides = [
        {"PULocationID": pu, "DOLocationID": do, "trip_distance": d}
        for pu, do, d in [(130, 205, 3.66), (1, 265, 0.0), (74, 75, 12.5), (43, 151, 1.2)]
    ]
    response = client.post("/predict", json=rides)
    assert response.status_code == 200
    body = response.get_json()
    expected = make_prediction(trained_model["pipeline"], rides)
    assert [b["duration"] for b in body] == pytest.approx(expected.tolist(), abs=1e-9)
    assert {b["model_version"] for b in body} == {"v-test"}


def test_extra_fields_are_ignored(client):
    plain = client.post("/predict", json=RIDE).get_json()
    extra = client.post("/predict", json={**RIDE, "VendorID": 2, "note": {"any": ["thing"]}}).get_json()
    assert extra == plain


def test_the_service_answers_what_the_pipeline_predicts(trained_model):
    """The app serves through the numpy forest walk; the numbers are the pipeline's."""
    pipeline = trained_model["pipeline"]
    client = create_app(pipeline, model_version="v").test_client()
    rides = [RIDE, {**RIDE, "trip_distance": 12.5}, {"PULocationID": 74, "DOLocationID": 75, "trip_distance": 0.9}]
    answers = client.post("/predict", json=rides).get_json()
    assert [a["duration"] for a in answers] == pytest.approx(list(make_prediction(pipeline, rides)), abs=1e-9)


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.get_json()["model_version"] == "v-test"


def test_health_shows_the_training_data(trained_model):
    """/health says what the model was trained on: `load_model` sets `training_data` on the model."""
    model = copy.deepcopy(trained_model["pipeline"])  # the session's pipeline stays as it is
    model.training_data = {
        "synthetic": False,
        "files": [{"name": "green_tripdata_2021-01.parquet", "sha256": "ab" * 32}],
    }
    health = create_app(model, model_version="v").test_client().get("/health").get_json()
    assert health["training_data"] == model.training_data
    vars(model).pop("training_data")  # a model of unknown provenance
    unknown = create_app(model, model_version="v").test_client().get("/health").get_json()
    assert "training_data" in unknown and unknown["training_data"] is None


def test_loads_from_registry_once(trained_model, monkeypatch):
    import ride_duration.web.app as web_app

    calls = []
    real = web_app.load_serving_model
    monkeypatch.setattr(web_app, "load_serving_model", lambda uri, settings: calls.append(uri) or real(uri, settings))
    client = create_app().test_client()
    for _ in range(3):
        assert client.post("/predict", json=RIDE).status_code == 200
    assert len(calls) == 1
    assert client.get("/health").get_json()["model_version"] == trained_model["logged"].run_id


@pytest.mark.parametrize(
    "payload, status, words",
    [
        ({"DOLocationID": 205, "trip_distance": 3.66}, 400, "field 'PULocationID' is missing"),
        ({**RIDE, "DOLocationID": None}, 400, "field 'DOLocationID' is missing"),
        ({**RIDE, "PULocationID": True}, 400, "field 'PULocationID' must be a number, got True"),
        ({**RIDE, "trip_distance": "3.66"}, 400, "field 'trip_distance' must be a number"),
        ({**RIDE, "PULocationID": 0}, 400, "'PULocationID' must be a TLC zone id between 1 and 265, got 0"),
        ({**RIDE, "DOLocationID": 266}, 400, "'DOLocationID' must be a TLC zone id between 1 and 265, got 266"),
        ({**RIDE, "PULocationID": 130.5}, 400, "field 'PULocationID' must be an integer"),
        ({**RIDE, "trip_distance": -1}, 400, "'trip_distance' must be between 0 and 500 miles, got -1"),
        ({**RIDE, "trip_distance": 1e9}, 400, "'trip_distance' must be between 0 and 500 miles"),
        # the value as the client sent it, not rounded to "got 500"
        (
            {**RIDE, "trip_distance": 500.0000001},
            400,
            "'trip_distance' must be between 0 and 500 miles, got 500.0000001",
        ),
        ([], 400, "expected at least one ride"),
        ([RIDE, {**RIDE, "trip_distance": None}], 400, "ride 1: field 'trip_distance' is missing"),
        ([RIDE] * (MAX_RIDES + 1), 400, f"at most {MAX_RIDES} rides per request"),
        ("ride", 400, "expected a ride object or a list of rides, got a JSON str"),
        ([RIDE, 5], 400, "ride 1: expected an object"),
    ],
)
def test_validation_errors(client, payload, status, words):
    response = client.post("/predict", json=payload)
    assert response.status_code == status, response.get_json()
    assert words in response.get_json()["error"]


@pytest.mark.parametrize(
    "data, words",
    [
        (b'{"PULocationID": 130, "DOLocationID": 205, "trip_distance": NaN}', "must be finite"),
        (b'{"PULocationID": 130, "DOLocationID": 205, "trip_distance": Infinity}', "must be finite"),
        (b'{"PULocationID": 130, "DOLocationID": 205, "trip_distance": 1e999}', "must be finite"),
        (b'{"PULocationID": 1' + b"0" * 400 + b', "DOLocationID": 205, "trip_distance": 1}', "too large"),
        (b'{"PULocationID": 130,', "not valid JSON"),
        (b"", "body is empty"),
        (b"[" * 60_000 + b"]" * 60_000, "nested too deeply"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
    ],
)
def test_bad_json(client, data, words):
    response = client.post("/predict", data=data, content_type="application/json")
    assert response.status_code == 400
    assert words in response.get_json()["error"]


def test_http_errors_are_json(client):
    cases = [
        (
            client.post("/predict", data="PULocationID=130", content_type="application/x-www-form-urlencoded"),
            415,
            "expected Content-Type: application/json",
        ),
        (client.get("/predict"), 405, "method GET is not allowed on /predict"),
        (client.post("/health"), 405, "method POST is not allowed"),
        (client.get("/nope"), 404, "no such endpoint '/nope'"),
        (
            client.post("/predict", data=b"x" * (MAX_CONTENT_LENGTH + 1), content_type="application/json"),
            413,
            f"larger than {MAX_CONTENT_LENGTH} bytes",
        ),
    ]
    for response, status, words in cases:
        assert response.status_code == status
        assert response.is_json
        assert words in response.get_json()["error"]
