"""The instructors' monthly run: papermill executes notebook 05 with injected
parameters in the `ride-duration` kernel; the figures are read back from it."""

from __future__ import annotations

import hashlib

import nbformat
import numpy as np
import pandas as pd
import pytest

from ride_duration.aws import storage_options
from ride_duration.batch import cli
from ride_duration.batch.report import ReportFailed, notebook_path, read_summary, run_report
from ride_duration.config import get_settings
from ride_duration.tlc import load_training_dataframe
from workbench.stack import free_port


def test_papermill_report_with_injected_parameters(batch_stack, batch_model, s3_input, synthetic_months, tmp_path):
    feb = f"{s3_input}/green_tripdata_2021-02.parquet"
    report = run_report("green", 2021, 2, model=batch_model.run_id, input_file=feb, output_dir=tmp_path)
    assert report == tmp_path / "green-2021-02.ipynb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["green-2021-02.ipynb"]

    nb = nbformat.read(str(report), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and f'model = "{batch_model.run_id}"' in injected[0].source and feb in injected[0].source
    assert any(
        o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
        for c in nb.cells
        for o in c.get("outputs", [])
    )  # the histogram of diff

    summary = read_summary(report)
    expected = load_training_dataframe(synthetic_months[(2021, 2)], get_settings())
    assert summary["rows"] == len(expected)
    assert (summary["year"], summary["month"], summary["model_version"]) == (2021, 2, batch_model.run_id)
    assert summary["output_file"].endswith(f"/year=2021/month=02/{batch_model.run_id}.parquet")
    written = pd.read_parquet(
        summary["output_file"], storage_options=storage_options(summary["output_file"], get_settings())
    )
    assert len(written) == summary["rows"]
    assert summary["rmse"] == round(float(np.sqrt((written["diff"] ** 2).mean())), 3)

    # The session's model was trained on synthetic months: the report says what and says it loudly.
    jan = synthetic_months[(2021, 1)]
    assert summary["trained_on_synthetic_data"] is True
    assert summary["training_data"]["train"]["sha256"] == hashlib.sha256(jan.read_bytes()).hexdigest()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"; MLflow: {batch_stack.url('mlflow')}\n" in text  # the servers it used, first thing
    assert f"trained on   {jan.name} (SYNTHETIC, 4,000 rows" in text
    assert (
        "THIS MODEL WAS TRAINED ON SYNTHETIC DATA (green_tripdata_2021-01.parquet, green_tripdata_2021-02.parquet)"
        in text
    )
    assert any(
        "THIS MODEL WAS TRAINED ON SYNTHETIC DATA" in o.get("data", {}).get("text/markdown", "")
        for c in nb.cells
        for o in c.get("outputs", [])
    )  # the banner, not only stdout


def test_report_notebook_never_starts_servers_or_trains():
    source = "\n".join(c.source for c in nbformat.read(str(notebook_path()), as_version=4).cells)
    assert "activate_if_running(" in source
    for forbidden in (".up(", "ensure_production_model", "train(", "log_to_mlflow", "LocalStack"):
        assert forbidden not in source, forbidden


def test_report_without_production_model_says_make_train(batch_stack, s3_input, tmp_path, monkeypatch):
    """No model has the alias: one sentence saying what to run; nothing is trained or written."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MODEL_NAME", "ReportWithoutModel")
    tracking = batch_stack.url("mlflow")
    with pytest.raises(ReportFailed) as excinfo:
        run_report("green", 2021, 2, output_dir=tmp_path)
    assert str(excinfo.value) == (
        f"green 2021-02: there is no model ReportWithoutModel@production on the tracking server {tracking}: "
        "train and promote one with `make train` (python scripts/train.py --promote), then run the report again"
    )
    assert excinfo.value.__cause__ is None  # the sentence, not papermill's traceback
    assert list(tmp_path.iterdir()) == []
    assert MlflowClient(tracking).search_registered_models("name = 'ReportWithoutModel'") == []


def test_report_uses_the_configured_tracking_server_not_the_local_stack(
    batch_stack, batch_model, tmp_path, monkeypatch
):
    """AWS-style settings (no endpoint, MLFLOW_TRACKING_URI elsewhere) while a local stack
    runs: the report talks to the configured server, finds it down and says so."""
    dead = f"http://127.0.0.1:{free_port()}"
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_KINESIS", "MLFLOW_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)  # STACK_*_PORT / LOCAL_DIR still name the running stack
    with pytest.raises(ReportFailed) as excinfo:
        run_report("green", 2021, 2, output_dir=tmp_path)
    assert str(excinfo.value) == (
        f"green 2021-02: the MLflow tracking server at {dead} is not answering: start the local stack with "
        "`make services-up`, or point MLFLOW_TRACKING_URI at your server"
    )
    assert list(tmp_path.iterdir()) == []


def test_report_cli_missing_month_exits_1(batch_stack, batch_model, s3_input, tmp_path, capsys):
    code = cli.report_main(["--month", "2021-03", "--model", batch_model.run_id, "--output-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "green 2021-03: InputNotFound: no input for green 2021-03" in err
    assert "green_tripdata_2021-03.parquet does not exist" in err
    # No report pretends to exist; the failed notebook is kept to debug.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["green-2021-03.failed.ipynb"]
