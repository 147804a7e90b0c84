"""The instructors' monthly run: papermill executes notebook 05 with injected
parameters in the `ride-duration` kernel; the figures are read back from it."""

from __future__ import annotations

import nbformat
import numpy as np
import pandas as pd

from ride_duration.aws import storage_options
from ride_duration.batch import cli
from ride_duration.batch.report import read_summary, run_report
from ride_duration.utils import load_training_dataframe


def test_papermill_report_with_injected_parameters(batch_stack, batch_model, s3_input, synthetic_months, tmp_path):
    feb = f"{s3_input}/green_tripdata_2021-02.parquet"
    report = run_report("green", 2021, 2, model=batch_model.run_id, input_file=feb, output_dir=tmp_path)
    assert report == tmp_path / "green-2021-02.ipynb"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["green-2021-02.ipynb"]

    nb = nbformat.read(str(report), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and f"model = \"{batch_model.run_id}\"" in injected[0].source and feb in injected[0].source
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))  # the histogram of diff

    summary = read_summary(report)
    expected = load_training_dataframe(synthetic_months[(2021, 2)])
    assert summary["rows"] == len(expected)
    assert (summary["year"], summary["month"], summary["model_version"]) == (2021, 2, batch_model.run_id)
    assert summary["output_file"].endswith(f"/year=2021/month=02/{batch_model.run_id}.parquet")
    written = pd.read_parquet(summary["output_file"], storage_options=storage_options(summary["output_file"]))
    assert len(written) == summary["rows"]
    assert summary["rmse"] == round(float(np.sqrt((written["diff"] ** 2).mean())), 3)


def test_report_cli_missing_month_exits_1(batch_stack, batch_model, s3_input, tmp_path, capsys):
    code = cli.report_main(["--month", "2021-03", "--model", batch_model.run_id, "--output-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "green 2021-03: InputNotFound: no input for green 2021-03" in err
    assert "green_tripdata_2021-03.parquet does not exist" in err
    # No report pretends to exist; the failed notebook is kept to debug.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["green-2021-03.failed.ipynb"]
