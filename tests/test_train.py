"""Training records what it learned from, and never uses synthetic data unasked
(the session's MLflow server, tests/conftest.py)."""

from __future__ import annotations

import hashlib

import pytest

from ride_duration import tlc
from ride_duration.config import get_settings
from ride_duration.train import SyntheticDataRefused, ensure_production_model
from ride_duration.train import main as train_main

pytestmark = pytest.mark.integration


@pytest.fixture
def no_real_data(tmp_path, monkeypatch):
    """An empty data cache, an empty mirror, the official URL on a closed port:
    the situation where the old code trained on a synthetic January."""
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TLC_MIRROR", str(tmp_path / "mirror-without-january"))
    monkeypatch.delenv("TLC_SYNTHETIC_FALLBACK", raising=False)  # the fallback's default: on
    monkeypatch.setattr(tlc, "BASE_URL", "http://127.0.0.1:9/trip-data")
    return tmp_path / "cache"


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_refuses_a_missing_month_without_allow_synthetic(stack, no_real_data, tmp_path, capsys):
    code = train_main(["--promote", "--tracking-uri", stack.url("mlflow")])
    out, err = capsys.readouterr()
    assert code == 1
    mirror = tmp_path / "mirror-without-january" / "green_tripdata_2021-01.parquet"
    assert err.startswith(f"error: green 2021-01 is not available (tried: {mirror} (")
    assert err.endswith(
        "): set TLC_MIRROR to a folder or URL prefix holding green_tripdata_2021-01.parquet, "
        "or pass --allow-synthetic to train on a synthetic month whose figures will not match "
        "the course's\n"
    )
    assert err.count("\n") == 1 and "trained on" not in out
    assert not no_real_data.exists() or not any(no_real_data.iterdir())  # no synthetic month was written


def test_cli_refuses_a_given_synthetic_file(stack, synthetic_months, capsys):
    jan, feb = synthetic_months[(2021, 1)], synthetic_months[(2021, 2)]
    code = train_main(["--tracking-uri", stack.url("mlflow"), "--train-path", str(jan), "--valid-path", str(feb)])
    assert code == 1
    assert capsys.readouterr().err == (
        f"error: the train file green_tripdata_2021-01.parquet ({jan}) is synthetic data: "
        "pass --allow-synthetic to train on it, or give a real TLC month\n"
    )


def test_cli_with_allow_synthetic_records_the_provenance(stack, synthetic_months, capsys):
    import mlflow

    from ride_duration.registry import load_model

    jan, feb = synthetic_months[(2021, 1)], synthetic_months[(2021, 2)]
    code = train_main(
        [
            "--tracking-uri",
            stack.url("mlflow"),
            "--no-register",
            "--allow-synthetic",
            "--train-path",
            str(jan),
            "--valid-path",
            str(feb),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"trained on   green_tripdata_2021-01.parquet (SYNTHETIC, 4,000 rows, sha256 {_sha256(jan)[:12]}" in out
    assert "WARNING: this model was trained on SYNTHETIC data" in err
    run_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("run id:"))

    mlflow.set_tracking_uri(stack.url("mlflow"))
    run = mlflow.get_run(run_id)
    assert run.data.tags["data.synthetic"] == "true"
    assert (run.data.tags["data.train_file"], run.data.tags["data.valid_file"]) == (jan.name, feb.name)
    params = run.data.params
    assert (params["train_file"], params["train_sha256"], params["train_size"], params["train_rows"]) == (
        jan.name,
        _sha256(jan),
        str(jan.stat().st_size),
        "4000",
    )
    assert (params["valid_sha256"], params["valid_rows"], params["valid_source"]) == (_sha256(feb), "3000", str(feb))

    # The same record in the MLmodel file, which a service loading from S3 alone reads.
    recorded = mlflow.models.get_model_info(f"runs:/{run_id}/model").metadata["training_data"]
    assert recorded["synthetic"] is True
    assert recorded["train"] == {
        "file": jan.name,
        "sha256": _sha256(jan),
        "size": jan.stat().st_size,
        "rows": 4000,
        "source": str(jan),
        "synthetic": True,
        "verified": False,
    }
    model, _ = load_model(f"runs:/{run_id}/model", settings=get_settings())
    assert model.training_data == recorded


def test_fixture_model_is_recorded_as_synthetic_on_run_and_registry(trained_model, settings):
    """The tests' model (explicit synthetic files, no flag needed by the library call)
    is recorded as synthetic: on the run, on the registered version, in the MLmodel."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logged = trained_model["logged"]
    assert trained_model["result"].training_data["synthetic"] is True
    client = MlflowClient(settings.mlflow_tracking_uri)
    assert client.get_run(logged.run_id).data.tags["data.synthetic"] == "true"
    version = client.get_model_version(settings.model_name, logged.registered_version)
    assert version.tags["data.synthetic"] == "true"
    metadata = mlflow.models.get_model_info(logged.model_uri).metadata
    assert metadata["training_data"] == trained_model["result"].training_data


def test_ensure_production_model_refuses_synthetic_data(stack, no_real_data, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MODEL_NAME", "NoProductionModelYet")
    with pytest.raises(
        SyntheticDataRefused,
        match=r"^green 2021-01 is not available \(tried: .*\): set TLC_MIRROR "
        r"to a folder or URL prefix holding green_tripdata_2021-01.parquet, or pass "
        r"allow_synthetic=True to train",
    ):
        ensure_production_model(get_settings())
    assert MlflowClient(stack.url("mlflow")).search_registered_models("name = 'NoProductionModelYet'") == []
