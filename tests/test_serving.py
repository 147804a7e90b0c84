"""The services load the forest's serving form stored inside the logged model, and fall
back to the skops pipeline when a model has none."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ride_duration.aws import s3_client, split_s3_uri
from ride_duration.config import get_settings
from ride_duration.fastmodel import FastForest
from ride_duration.predict import SERVING_DIR, load_serving_model, make_prediction
from ride_duration.registry import ModelNotFound, load_model
from ride_duration.tlc import load_training_dataframe

REPO = Path(__file__).resolve().parents[1]


def _objects(uri: str) -> dict[str, int]:
    bucket, prefix = split_s3_uri(uri)
    pages = s3_client(get_settings()).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"].removeprefix(prefix + "/"): o["Size"] for page in pages for o in page.get("Contents", [])}


def _direct(settings, logged):
    """The Lambda's configuration: MODEL_ID + EXPERIMENT_ID, straight from S3."""
    return dataclasses.replace(settings, model_uri=None, model_id=logged.model_id, experiment_id=logged.experiment_id)


def test_training_stores_the_serving_form_beside_the_skops_file(trained_model):
    files = _objects(trained_model["logged"].s3_uri)
    assert {"MLmodel", "model.skops", f"{SERVING_DIR}/forest.json", f"{SERVING_DIR}/forest.npz"} <= set(files)
    assert files[f"{SERVING_DIR}/forest.npz"] < files["model.skops"]


def test_services_load_the_serving_form_and_predict_as_the_pipeline(trained_model, settings, synthetic_months):
    logged = trained_model["logged"]
    for label, config in (("registry alias", settings), ("S3 direct", _direct(settings, logged))):
        model, version = load_serving_model(None, config)
        assert isinstance(model, FastForest) and model.source == "serving form", label
        assert version == logged.run_id, label
        assert model.training_data == trained_model["result"].training_data, label
    rides = load_training_dataframe(synthetic_months[(2021, 2)], get_settings())[
        ["PULocationID", "DOLocationID", "trip_distance"]
    ]
    rides = rides.to_dict("records")
    expected = make_prediction(trained_model["pipeline"], rides)
    assert make_prediction(model, rides).tolist() == pytest.approx(expected.tolist(), abs=1e-9)


def test_a_model_without_the_serving_form_loads_its_skops_file(trained_model, settings, tmp_path):
    """Older models (and any other model type) keep working through the safe skops path."""
    pipeline, _ = load_model(trained_model["logged"].s3_uri, settings=settings)
    folder = tmp_path / "model"
    bucket, prefix = split_s3_uri(trained_model["logged"].s3_uri)
    for key in _objects(trained_model["logged"].s3_uri):
        if not key.startswith(SERVING_DIR):
            (folder / key).parent.mkdir(parents=True, exist_ok=True)
            s3_client(get_settings()).download_file(bucket, f"{prefix}/{key}", str(folder / key))
    model, version = load_serving_model(str(folder), settings)
    assert model.source == "skops" and type(model).__name__ == "Pipeline"
    assert version == trained_model["logged"].run_id


def test_a_tampered_serving_form_is_refused_in_one_sentence(trained_model, settings, tmp_path):
    logged = trained_model["logged"]
    bucket, prefix = split_s3_uri(logged.s3_uri)
    key = f"{prefix}/{SERVING_DIR}/forest.npz"
    original = s3_client(get_settings()).get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        s3_client(get_settings()).put_object(Bucket=bucket, Key=key, Body=original[: len(original) // 2])
        with pytest.raises(ModelNotFound, match=r"forest\.npz .* does not match the sha256 .*truncated or altered"):
            load_serving_model(None, _direct(settings, logged))
    finally:
        s3_client(get_settings()).put_object(Bucket=bucket, Key=key, Body=original)


_COLD = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("course", sys.argv[1])
course = importlib.util.module_from_spec(spec); spec.loader.exec_module(course)
from ride_duration.stream import lambda_handler
response = lambda_handler(course.event, None)
print(json.dumps({"response": response, "modules": sorted(m for m in ("sklearn", "skops", "mlflow", "pandas", "scipy")
                                                          if m in sys.modules)}))
"""


def test_the_stream_function_cold_path_imports_no_sklearn_mlflow_or_pandas(trained_model):
    """A new interpreter, configured as on AWS (MODEL_ID + EXPERIMENT_ID, no tracking server),
    answers the course's captured event without importing the heavy libraries."""
    logged = trained_model["logged"]
    env = {
        **os.environ,
        "MODEL_ID": logged.model_id,
        "EXPERIMENT_ID": logged.experiment_id,
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing listens there
        "TEST_RUN": "True",
    }
    out = subprocess.run(
        [sys.executable, "-c", _COLD, str(REPO / "scripts" / "test_docker.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["modules"] == []
    (prediction,) = result["response"]["predictions"]
    assert prediction["version"] == logged.run_id
    assert prediction["prediction"]["ride_id"] == 256
