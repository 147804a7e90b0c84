"""The local stack and the model store, with real servers on free ports."""

import os
import socket

import pytest
import requests

from ride_duration import config
from ride_duration.predict import ModelNotFound, load_model, make_prediction, s3_model_uri
from ride_duration.stack import LocalStack, StackError, free_port
from ride_duration.train import TrackingServerDown, check_tracking_server, log_to_mlflow, main as train_main

EXAMPLE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}
pytestmark = pytest.mark.integration


def test_load_via_alias_matches_trained_pipeline(trained_model, settings):
    model, version = load_model()  # default: models:/NYCRideDurationModel@production
    logged = trained_model["logged"]
    assert version == logged.run_id
    expected = make_prediction(trained_model["pipeline"], [EXAMPLE])
    assert make_prediction(model, [EXAMPLE]).tolist() == pytest.approx(expected.tolist())


def test_logged_run_has_params_metric_signature(trained_model, settings):
    import mlflow

    logged = trained_model["logged"]
    run = mlflow.get_run(logged.run_id)
    assert run.data.params["n_estimators"] == "100" and run.data.params["max_depth"] == "20"
    assert float(run.data.metrics["rmse_valid"]) == pytest.approx(trained_model["result"].rmse_valid)
    assert mlflow.get_experiment(run.info.experiment_id).name == "nyc-taxi-experiment"
    info = mlflow.models.get_model_info(logged.model_uri)
    assert info.signature is not None and info.saved_input_example_info is not None
    assert info.flavors["sklearn"]["serialization_format"] == "skops"
    # MLflow 3 layout: <experiment>/models/<model_id>/artifacts, derivable from config
    assert logged.s3_uri == s3_model_uri(settings.mlflow_bucket, logged.experiment_id, logged.model_id)


def test_load_from_s3_and_local_folder(trained_model, settings, tmp_path):
    import mlflow

    logged = trained_model["logged"]
    model, version = load_model(logged.s3_uri)
    assert version == logged.run_id
    folder = mlflow.artifacts.download_artifacts(artifact_uri=logged.s3_uri, dst_path=str(tmp_path))
    model2, version2 = load_model(folder)
    assert version2 == logged.run_id
    assert make_prediction(model2, [EXAMPLE]).tolist() == pytest.approx(make_prediction(model, [EXAMPLE]).tolist())


def test_model_id_and_experiment_id_from_env(trained_model, monkeypatch):
    logged = trained_model["logged"]
    monkeypatch.setenv("MODEL_ID", logged.model_id)
    monkeypatch.setenv("EXPERIMENT_ID", logged.experiment_id)
    _, version = load_model()
    assert version == logged.run_id


@pytest.mark.parametrize(
    "uri, words",
    [
        ("models:/NYCRideDurationModel@staging", ["models:/NYCRideDurationModel@staging", "tracking server"]),
        ("models:/NoSuchModel@production", ["NoSuchModel", "tracking server"]),
        ("runs:/0123456789abcdef0123456789abcdef/model", ["0123456789abcdef", "tracking server"]),
        ("s3://mlflow-models-ride-duration/9/models/m-missing/artifacts", ["m-missing", "in S3 at http://127.0.0.1"]),
    ],
)
def test_unknown_model_names_what_and_where(trained_model, uri, words):
    with pytest.raises(ModelNotFound) as excinfo:
        load_model(uri)
    for word in words:
        assert word in str(excinfo.value)


def test_unknown_local_folder(tmp_path):
    with pytest.raises(ModelNotFound, match=str(tmp_path)):
        load_model(str(tmp_path))


def test_training_with_tracking_server_down_says_how_to_start_it(capsys, monkeypatch, synthetic_months):
    port = free_port()
    with pytest.raises(TrackingServerDown, match="make services-up"):
        check_tracking_server(f"http://127.0.0.1:{port}")
    code = train_main([
        "--tracking-uri", f"http://127.0.0.1:{port}",
        "--train-path", str(synthetic_months[(2021, 1)]), "--valid-path", str(synthetic_months[(2021, 2)]),
    ])
    assert code == 1
    assert "make services-up" in capsys.readouterr().err


@pytest.fixture
def own_stack(tmp_path, monkeypatch):
    """A separate stack (restartable without disturbing the session one)."""
    stack = LocalStack(local_dir=tmp_path / "local", ports={n: free_port() for n in ("s3", "mlflow", "prefect")}, quiet=True)
    for key, value in stack.env().items():
        monkeypatch.setenv(key, value)
    yield stack
    stack.down()


def test_stack_restart_keeps_registry_and_artifacts_and_s3_survives_tracking_down(own_stack, trained_model, capsys):
    stack = own_stack
    stack.quiet = False
    stack.up(("s3", "mlflow"))
    pids = {n: stack.status()[n]["pid"] for n in ("s3", "mlflow")}
    # starting twice reports "already up" and starts nothing new
    stack.up(("s3", "mlflow"))
    assert "already up" in capsys.readouterr().out
    assert {n: stack.status()[n]["pid"] for n in ("s3", "mlflow")} == pids

    logged = log_to_mlflow(trained_model["result"], promote=True)
    from ride_duration.aws import s3_client

    s3_client().put_object(Bucket=stack.predictions_bucket, Key="taxi_type=green/year=2021/month=02/x.parquet", Body=b"abc")

    stack.down()
    assert not any(stack.healthy(n) for n in ("s3", "mlflow"))
    stack.up(("s3", "mlflow"))

    body = s3_client().get_object(Bucket=stack.predictions_bucket, Key="taxi_type=green/year=2021/month=02/x.parquet")["Body"].read()
    assert body == b"abc"
    model, version = load_model()  # registry + alias after the restart
    assert version == logged.run_id

    # the course's point: with the tracking server down, S3 still serves the model
    stack._stop("mlflow")
    assert not stack.healthy("mlflow")
    with pytest.raises(ModelNotFound):
        load_model()
    model, version = load_model(s3_model_uri(stack.mlflow_bucket, logged.experiment_id, logged.model_id))
    assert version == logged.run_id
    assert make_prediction(model, [EXAMPLE]).tolist() == pytest.approx(make_prediction(trained_model["pipeline"], [EXAMPLE]).tolist())


def test_port_taken_by_someone_else(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    stack = LocalStack(local_dir=tmp_path, ports={"s3": port, "mlflow": free_port(), "prefect": free_port()}, quiet=True)
    try:
        with pytest.raises(StackError, match=f"port {port} .*taken"):
            stack.up(("s3",))
    finally:
        blocker.close()


def test_stack_cli_status_and_env(own_stack, monkeypatch, capsys):
    from ride_duration.stack import main

    monkeypatch.setenv("LOCAL_DIR", str(own_stack.local_dir))
    for name, port in own_stack.ports.items():
        monkeypatch.setenv(f"STACK_{name.upper()}_PORT", str(port))
    assert main(["status"]) == 0
    assert "down" in capsys.readouterr().out
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{own_stack.ports['s3']}" in out
    assert "export AWS_ACCESS_KEY_ID=test" in out


def test_aws_profile_used_when_endpoint_unset(monkeypatch):
    """With no endpoint variables, clients target AWS itself (the user's profile)."""
    from ride_duration.aws import s3_client, storage_options

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert s3_client().meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert "endpoint_url" not in storage_options("s3://b/k")["client_kwargs"]
    assert config.get_settings().is_local_stack is False
