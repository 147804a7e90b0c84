"""The service loads its model straight from S3 while the tracking server is down."""

from __future__ import annotations

import pytest
import requests

from ride_duration.predict import make_prediction
from ride_duration.web.server import ServerError
from workbench.gunicorn import GunicornServer
from workbench.stack import free_port

RIDE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}


def test_serves_from_s3_with_tracking_server_down(offline_model):
    with GunicornServer(port=free_port(), env=offline_model["env"]) as server:
        health = server.health()
        assert health["model_version"] == offline_model["logged"].run_id
        answer = requests.post(server.url + "/predict", json=RIDE, timeout=10).json()
    expected = float(make_prediction(offline_model["pipeline"], RIDE)[0])
    assert answer == {"duration": pytest.approx(expected, abs=1e-9), "model_version": offline_model["logged"].run_id}


def test_registry_alias_with_tracking_server_down_fails_fast(offline_model):
    env = {k: v for k, v in offline_model["env"].items() if k not in ("MODEL_ID", "EXPERIMENT_ID")}
    env.update(MODEL_ID="", EXPERIMENT_ID="")
    server = GunicornServer(port=free_port(), env=env)
    with pytest.raises(ServerError) as failed:
        server.start(timeout=90)
    log = server.log_tail(20000)
    assert "models:/NYCRideDurationModel@production" in log
    assert "MLflow tracking server" in log and "not answering" in log
    assert server.proc.returncode not in (None, 0)
    assert "exited" in str(failed.value)
