"""The local stack and the model store, with real servers on free ports."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from ride_duration import config
from ride_duration.config import get_settings
from ride_duration.predict import make_prediction
from ride_duration.registry import ModelNotFound, artifact_location, load_model, s3_model_uri
from ride_duration.train import TrackingServerDown, check_tracking_server, log_to_mlflow
from ride_duration.train import main as train_main
from workbench.stack import (
    SERVICES,
    LocalStack,
    StackError,
    activate_if_running,
    free_port,
    port_in_use,
    s3_on_moto,
)

EXAMPLE = {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}
pytestmark = pytest.mark.integration


def test_load_via_alias_matches_trained_pipeline(trained_model, settings):
    model, version = load_model(settings=get_settings())  # default: models:/NYCRideDurationModel@production
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


def test_s3_layout_is_where_mlflow_logs_a_model(trained_model, settings):
    """MODEL_ID + EXPERIMENT_ID load straight from S3 at `s3_model_uri`, a layout MLflow does not
    document: held here to where MLflow says it logged a real model, and to the objects boto3 finds."""
    import mlflow
    import yaml
    from mlflow.models import Model

    from ride_duration.aws import s3_client, split_s3_uri

    logged = trained_model["logged"]
    model = mlflow.get_logged_model(logged.model_id)
    uri = s3_model_uri(settings.mlflow_bucket, model.experiment_id, model.model_id)
    assert uri == model.artifact_location
    bucket, prefix = split_s3_uri(uri)
    client = s3_client(settings)
    mlmodel = client.get_object(Bucket=bucket, Key=f"{prefix}/MLmodel")["Body"].read().decode()
    assert Model.from_dict(yaml.safe_load(mlmodel)).model_id == logged.model_id
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]}
    assert {f"{prefix}/MLmodel", f"{prefix}/serving/forest.json", f"{prefix}/serving/forest.npz"} <= keys


def test_artifact_location_of_every_registry_reference(trained_model, settings):
    """`models:/` (alias, version, logged model id) and `runs:/` all lead to the logged model's
    files, through MLflow's client API."""
    import mlflow
    from mlflow import MlflowClient

    logged = trained_model["logged"]
    expected = mlflow.get_logged_model(logged.model_id).artifact_location
    version = MlflowClient().get_model_version_by_alias(settings.model_name, settings.model_alias).version
    for uri in (
        settings.registry_uri,
        f"models:/{settings.model_name}/{version}",
        f"models:/{logged.model_id}",
        f"runs:/{logged.run_id}/model",
    ):
        assert artifact_location(uri, settings) == expected, uri


def test_load_from_s3_and_local_folder(trained_model, settings, tmp_path):
    import mlflow

    logged = trained_model["logged"]
    model, version = load_model(logged.s3_uri, settings=get_settings())
    assert version == logged.run_id
    folder = mlflow.artifacts.download_artifacts(artifact_uri=logged.s3_uri, dst_path=str(tmp_path))
    model2, version2 = load_model(folder, settings=get_settings())
    assert version2 == logged.run_id
    assert make_prediction(model2, [EXAMPLE]).tolist() == pytest.approx(make_prediction(model, [EXAMPLE]).tolist())


def test_model_id_and_experiment_id_from_env(trained_model, monkeypatch):
    logged = trained_model["logged"]
    monkeypatch.setenv("MODEL_ID", logged.model_id)
    monkeypatch.setenv("EXPERIMENT_ID", logged.experiment_id)
    _, version = load_model(settings=get_settings())
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
        load_model(uri, settings=get_settings())
    for word in words:
        assert word in str(excinfo.value)


def test_unknown_local_folder(tmp_path):
    with pytest.raises(ModelNotFound, match=str(tmp_path)):
        load_model(str(tmp_path), settings=get_settings())


def test_training_with_tracking_server_down_says_how_to_start_it(capsys, monkeypatch, synthetic_months):
    port = free_port()
    with pytest.raises(TrackingServerDown, match="make services-up"):
        check_tracking_server(f"http://127.0.0.1:{port}")
    code = train_main(
        [
            "--tracking-uri",
            f"http://127.0.0.1:{port}",
            "--train-path",
            str(synthetic_months[(2021, 1)]),
            "--valid-path",
            str(synthetic_months[(2021, 2)]),
        ]
    )
    assert code == 1
    assert "make services-up" in capsys.readouterr().err


@pytest.fixture
def own_stack(tmp_path, monkeypatch):
    """A separate stack (restartable without disturbing the session one)."""
    session_tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
    stack = LocalStack(
        local_dir=tmp_path / "local", ports={n: free_port() for n in ("s3", "mlflow", "prefect")}, quiet=True
    )
    for key, value in stack.env().items():
        monkeypatch.setenv(key, value)
    yield stack
    stack.down()
    if session_tracking_uri and "mlflow" in sys.modules:  # loading a model set MLflow's process-wide URI
        sys.modules["mlflow"].set_tracking_uri(session_tracking_uri)


def test_restart_and_kill_9_keep_registry_models_and_objects_and_s3_serves_with_tracking_down(
    own_stack, trained_model, capsys
):
    """One stack through both ways it stops: `down` + `up`, then `kill -9` of each server's process (pid
    files) + `up`. After each the @production model loads and the objects read back byte for byte; with the
    tracking server down, S3 still serves the model; when its artifacts are gone, loading says so and where."""
    import pandas as pd

    from ride_duration.aws import s3_client, storage_options

    stack = own_stack
    stack.quiet = False
    stack.up(("s3", "mlflow"))
    pids = {n: stack.status()[n]["pid"] for n in ("s3", "mlflow")}
    # starting twice reports "already up" and starts nothing new
    stack.up(("s3", "mlflow"))
    assert "already up" in capsys.readouterr().out
    assert {n: stack.status()[n]["pid"] for n in ("s3", "mlflow")} == pids

    logged = log_to_mlflow(trained_model["result"], promote=True, settings=get_settings())
    rides = [{**EXAMPLE, "trip_distance": d} for d in (0.5, 3.66, 12.0)]
    expected = make_prediction(trained_model["pipeline"], rides)
    path = f"s3://{stack.predictions_bucket}/taxi_type=green/year=2021/month=02/predictions.parquet"
    pd.DataFrame({"ride_id": ["a", "b", "c"], "predicted_duration": expected}).to_parquet(
        path, storage_options=storage_options(path, get_settings())
    )  # pandas -> s3fs -> SeaweedFS, as batch writes
    key = path.removeprefix(f"s3://{stack.predictions_bucket}/")
    written = s3_client(get_settings()).get_object(Bucket=stack.predictions_bucket, Key=key)["Body"].read()
    before = stack.s3_inventory()
    assert before[stack.predictions_bucket] == 1 and before[stack.mlflow_bucket] >= 5  # MLmodel, model.skops, ...

    def everything_is_kept() -> None:
        assert stack.s3_inventory() == before
        model, version = load_model(settings=get_settings())  # models:/NYCRideDurationModel@production
        assert version == logged.run_id
        assert make_prediction(model, rides).tolist() == pytest.approx(expected.tolist())
        assert s3_client(get_settings()).get_object(Bucket=stack.predictions_bucket, Key=key)["Body"].read() == written

    stack.down()
    assert not any(stack.healthy(n) for n in ("s3", "mlflow"))
    stack.up(("s3", "mlflow"))
    everything_is_kept()

    pids = {name: stack._pid_info(name)["pid"] for name in ("s3", "kinesis", "mlflow")}
    for pid in pids.values():
        _kill_9(pid)  # the pid file's process only: mlflow's uvicorn worker lives on, orphaned
    capsys.readouterr()
    stack.up(("s3", "mlflow"))
    out = capsys.readouterr().out
    print(f"{out}objects before kill -9: {before}, after up: {stack.s3_inventory()}")  # the figures (-rP)
    for name, pid in pids.items():
        assert f"pid {pid} (from {stack._pidfile(name)}) is no longer running" in out
    # mlflow's uvicorn worker outlived its parent: named with its port, stopped, then mlflow started afresh
    assert "mlflow   pid" in out and f"listening on 127.0.0.1:{stack.ports['mlflow']}" in out
    assert "running without a pid file (deleted, or its parent process crashed): stopped it" in out
    assert f"s3       {sum(before.values())} object(s) in {len(before)} bucket(s) kept" in out
    assert "recreated empty (moto keeps streams in memory" in out
    everything_is_kept()

    # the course's point: with the tracking server down, S3 still serves the model
    stack._stop("mlflow")
    assert not stack.healthy("mlflow")
    with pytest.raises(ModelNotFound):
        load_model(settings=get_settings())
    model_uri = s3_model_uri(stack.mlflow_bucket, logged.experiment_id, logged.model_id)
    model, version = load_model(model_uri, settings=get_settings())
    assert version == logged.run_id
    assert make_prediction(model, [EXAMPLE]).tolist() == pytest.approx(
        make_prediction(trained_model["pipeline"], [EXAMPLE]).tolist()
    )

    # When the artifacts ARE gone, loading says so, and where.
    bucket, _, prefix = logged.s3_uri.removeprefix("s3://").partition("/")
    s3 = s3_client(get_settings())
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    with pytest.raises(ModelNotFound) as excinfo:
        load_model(model_uri, settings=get_settings())
    message = str(excinfo.value)
    assert "artifacts are missing" in message
    assert logged.s3_uri.rstrip("/") in message and stack.url("s3") in message


def test_port_taken_by_someone_else(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    stack = LocalStack(
        local_dir=tmp_path, ports={"s3": port, "mlflow": free_port(), "prefect": free_port()}, quiet=True
    )
    try:
        with pytest.raises(StackError, match=f"port {port} .*taken"):
            stack.up(("s3",))
    finally:
        blocker.close()


def test_stack_cli_status_and_env(own_stack, monkeypatch, capsys):
    from workbench.stack import main

    monkeypatch.setenv("LOCAL_DIR", str(own_stack.local_dir))
    for name, port in own_stack.ports.items():
        monkeypatch.setenv(f"STACK_{name.upper()}_PORT", str(port))
    assert main(["status"]) == 0
    assert "down" in capsys.readouterr().out
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    # moto serves Kinesis and every other AWS API; S3 (boto3, s3fs, MLflow) goes to SeaweedFS
    assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{own_stack.ports['kinesis']}" in out
    assert f"export AWS_ENDPOINT_URL_S3=http://127.0.0.1:{own_stack.ports['s3']}" in out
    assert f"export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:{own_stack.ports['s3']}" in out
    assert "export AWS_ACCESS_KEY_ID=test" in out


def test_aws_profile_used_when_endpoint_unset(monkeypatch):
    """With no endpoint variables, clients target AWS itself (the user's profile)."""
    from ride_duration.aws import s3_client, storage_options

    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert s3_client(get_settings()).meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert "endpoint_url" not in storage_options("s3://b/k", get_settings())["client_kwargs"]
    assert config.get_settings().aws_endpoint_url is None


# ------------------------------------------------------------------ crash of the stack
def _kill_9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    try:
        os.waitpid(pid, 0)  # started by this process: reap it, as its parent would
    except ChildProcessError:
        pass


def test_upgrade_from_the_moto_s3_version_loses_no_object(tmp_path, capsys):
    """An older checkout kept S3 in moto's memory, saved to `.local/s3` by `down`. Its
    snapshot, and the objects of its stack still running, end up in SeaweedFS."""
    import boto3

    stack = LocalStack(local_dir=tmp_path / "local", ports={n: free_port() for n in ("s3", "mlflow", "prefect")})
    old = stack.legacy_snapshot_dir / "mlflow-models-ride-duration" / "1" / "models" / "m-1" / "artifacts"
    old.mkdir(parents=True)
    (old / "MLmodel").write_text("flavors: {}\n")
    # The older version's S3 (moto on what is now the Kinesis port), started as it did, with a pid file.
    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(stack.ports["kinesis"])]
    moto = subprocess.Popen(
        cmd, cwd=stack.local_dir, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    stack.run_dir.mkdir(parents=True)
    stack._pidfile("s3").write_text(json.dumps({"pid": moto.pid, "port": stack.ports["kinesis"], "cmd": cmd}))
    try:
        old_s3 = boto3.client(
            "s3",
            endpoint_url=stack.url("kinesis"),
            region_name="eu-west-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        for _ in range(100):
            if port_in_use(stack.ports["kinesis"]):
                break
            time.sleep(0.1)
        old_s3.create_bucket(
            Bucket="nyc-duration-prediction", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        old_s3.put_object(Bucket="nyc-duration-prediction", Key="taxi_type=green/p.parquet", Body=b"in memory")

        stack.up(("s3",))
        out = capsys.readouterr().out
        assert f"saved 1 object(s) from the running older stack's in-memory S3 (moto, {stack.url('kinesis')})" in out
        assert f"imported 2 object(s) from the snapshot an older version left in {stack.legacy_snapshot_dir}" in out
        assert not stack.legacy_snapshot_dir.exists() and (stack.local_dir / "s3.imported").is_dir()
        assert moto.wait(timeout=10) is not None
        s3, _ = stack._clients()
        body = s3.get_object(Bucket="mlflow-models-ride-duration", Key="1/models/m-1/artifacts/MLmodel")["Body"]
        assert body.read() == b"flavors: {}\n"
        assert s3.get_object(Bucket="nyc-duration-prediction", Key="taxi_type=green/p.parquet")["Body"].read() == (
            b"in memory"
        )
    finally:
        stack.down()
        if moto.poll() is None:
            moto.kill()


# ------------------------------------------------------------------ processes whose pid files are gone (item 10)
def _listen_addresses(ports) -> set[str]:
    """host:port of every listening TCP socket (IPv4 and IPv6) on one of `ports`."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.split(":")
            if state == "0A" and int(port, 16) in ports:
                host = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)) if width == 8 else address
                found.add(f"{host}:{int(port, 16)}")
    return found


def test_every_listener_is_on_loopback_and_lost_pid_files_are_found(tmp_path, capsys, monkeypatch):
    stack = LocalStack(local_dir=tmp_path / "local", ports={n: free_port() for n in ("s3", "mlflow", "prefect")})
    try:
        stack.up(("s3",))  # SeaweedFS and moto
        # SeaweedFS: S3 + master, volume, filer, admin and their gRPC ports, nothing else, all on 127.0.0.1
        expected = {*stack._service_ports("s3"), stack.ports["kinesis"]}
        for _ in range(100):  # its admin server starts last, after S3 answers
            processes = stack.processes()
            listening = {port for p in processes for port in p["ports"]}
            if listening == expected:
                break
            time.sleep(0.1)
        assert {p["service"] for p in processes} == {"s3", "kinesis"}
        assert listening == expected
        assert _listen_addresses(listening) == {f"127.0.0.1:{port}" for port in listening}
        # moto runs as its stock server; an S3 endpoint set to it (an older .env) is named at `up`
        assert any("moto.server" in p["cmd"] for p in processes if p["service"] == "kinesis")
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", stack.url("kinesis"))
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", stack.url("s3"))
        assert s3_on_moto(stack) == ["MLFLOW_S3_ENDPOINT_URL"]

        shutil.rmtree(stack.run_dir)  # as `rm -rf .local/run` (or all of .local) with the stack running
        orphans = stack.orphans()
        assert sorted(p["pid"] for p in orphans) == sorted(p["pid"] for p in processes)
        from workbench.stack import main

        monkeypatch.setenv("LOCAL_DIR", str(stack.local_dir))
        capsys.readouterr()
        assert main(["status"]) == 0
        assert capsys.readouterr().out.count("running without a pid file (`stack down` stops it)") == 2
        stack.up(("s3",))  # names them, stops them, starts afresh
        out, err = capsys.readouterr()
        assert (
            f"error: MLFLOW_S3_ENDPOINT_URL={stack.url('kinesis')} sends S3 to moto (Kinesis), which keeps objects "
            f"in memory only; set it to SeaweedFS at {stack.url('s3')}" in err
        )
        for p in processes:
            assert f"{p['service']:8s} pid {p['pid']} listening on 127.0.0.1:" in out
        assert out.count("running without a pid file (deleted, or its parent process crashed): stopped it") == 2
        assert all(info["healthy"] for name, info in stack.status().items() if name in ("s3", "kinesis"))

        shutil.rmtree(stack.run_dir)
        LocalStack(local_dir=stack.local_dir, ports=stack.ports).down()  # a new shell: no pid file
        assert not any(port_in_use(port) for port in listening)
        assert stack.processes() == []
    finally:
        stack.down()


# ------------------------------------------------------------------ custom ports (item 9)
def test_custom_ports_each_ui_talks_to_its_own_server_and_a_new_shell_sees_them(stack, tmp_path, monkeypatch):
    own = LocalStack(local_dir=tmp_path / "local", ports={n: free_port() for n in SERVICES}, quiet=True)
    try:
        own.up(("s3", "prefect"))
        # Prefect's UI reads the API's address from /ui-settings: its own server, not :4200.
        ui = requests.get(f"{own.url('prefect')}/ui-settings", timeout=10).json()
        assert ui["api_url"] == f"{own.url('prefect')}/api"

        # A new shell knows only LOCAL_DIR: `stack env` prints the running stack's endpoints.
        env = {k: v for k, v in os.environ.items() if not k.startswith("STACK_")}
        env["LOCAL_DIR"] = str(own.local_dir)

        def stack_cli(command: str) -> str:
            cmd = [sys.executable, "-m", "workbench.stack", command]
            return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout

        out = stack_cli("env")
        assert f"export AWS_ENDPOINT_URL_S3={own.url('s3')}\n" in out
        assert f"export AWS_ENDPOINT_URL={own.url('kinesis')}\n" in out
        assert f"export MLFLOW_TRACKING_URI={own.url('mlflow')}\n" in out
        assert f"export PREFECT_API_URL={own.url('prefect')}/api\n" in out
        status = stack_cli("status")
        assert f"prefect  up                   {own.url('prefect')}" in status
        for key in [k for k in os.environ if k.startswith("STACK_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("LOCAL_DIR", str(own.local_dir))
        assert LocalStack.from_settings().ports == own.ports
    finally:
        own.down()
    # After `down` the folder's stack is the default one again.
    assert LocalStack.running_ports(own.local_dir) == {}

    # MLflow's UI calls its API with URLs relative to the page: whatever port it is served on.
    page = requests.get(f"{stack.url('mlflow')}/", timeout=10)
    assert page.ok and "5000" not in page.text and "http" not in page.text.split("<body")[0].split("<script")[0]
    search = requests.get(f"{stack.url('mlflow')}/ajax-api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert search.ok


# ------------------------------------------------------------------ which servers a CLI uses (item 6)
_SERVER_SETTINGS = (
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


@pytest.fixture
def unconfigured(stack, monkeypatch):
    """No server settings at all (no .env either), LOCAL_DIR = the running session stack's folder."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key in _SERVER_SETTINGS or key.startswith(("AWS_ENDPOINT_URL_", "STACK_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("LOCAL_DIR", str(stack.local_dir))
    monkeypatch.setattr(config, "load_env_file", lambda path=None: None)
    yield stack
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
    "settings",
    [
        {"MLFLOW_TRACKING_URI": "http://mlflow.example.internal:5000"},
        {"AWS_PROFILE": "course"},
        {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret"},
        {"AWS_ENDPOINT_URL_S3": "https://s3.example.internal"},
        {"PREFECT_API_URL": "https://prefect.example.internal/api"},
    ],
    ids=["tracking-uri", "aws-profile", "aws-keys", "s3-endpoint", "prefect-api"],
)
def test_activate_if_running_never_replaces_configured_servers(unconfigured, monkeypatch, settings):
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    before = dict(os.environ)
    assert unconfigured.healthy("s3")
    assert activate_if_running(announce=False) is False
    assert dict(os.environ) == before


def test_activate_if_running_when_nothing_is_configured_or_the_stack_is_named(unconfigured, monkeypatch):
    stack = unconfigured
    assert activate_if_running(announce=False) is True
    assert {key: os.environ[key] for key in stack.env()} == stack.env()
    # An older .env that points at the stack (S3 on moto's port) is completed and corrected.
    for key in stack.env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.url("mlflow"))
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", stack.url("kinesis"))
    assert activate_if_running(announce=False) is True
    assert os.environ["MLFLOW_S3_ENDPOINT_URL"] == os.environ["AWS_ENDPOINT_URL_S3"] == stack.url("s3")


# ------------------------------------------------------------------ git and image ignore files (item 10)
def test_env_files_stay_out_of_git_and_images_but_the_example_is_tracked():
    repo = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (repo / ".git").exists():
        pytest.skip("not a git checkout")
    names = [".env", ".env.aws", ".env.local", ".env.example"]
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", *names], cwd=repo, capture_output=True, text=True, check=False
    )
    assert done.stdout.split() == [".env", ".env.aws", ".env.local"]
    for image in ("web-service", "streaming"):
        lines = (repo / "docker" / image / "Dockerfile.dockerignore").read_text().split()
        assert {".env*", ".local", "data"} <= set(lines), image
