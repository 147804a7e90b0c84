"""The instructors' monthly run: papermill executes notebooks/05-batch-scoring.ipynb
with the month as parameters into `reports/<taxi>-<YYYY>-<MM>.ipynb`.

The executed notebook is the report (row count, RMSE, histogram of `diff`, where
the predictions went); its cell tagged `summary` prints those figures as JSON so
code can read them back (`read_summary`), without scrapbook.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import repo_root

NOTEBOOK = "05-batch-scoring.ipynb"
KERNEL = "ride-duration"
SUMMARY_TAG = "summary"


class ReportFailed(RuntimeError):
    pass


def notebook_path() -> Path:
    root = repo_root()
    if root is None or not (root / "notebooks" / NOTEBOOK).is_file():
        raise ReportFailed(f"notebooks/{NOTEBOOK} not found: run the report from the course checkout")
    return root / "notebooks" / NOTEBOOK


def report_path(taxi_type: str, year: int, month: int, output_dir: str | os.PathLike | None = None) -> Path:
    folder = Path(output_dir) if output_dir else (repo_root() or Path.cwd()) / "reports"
    return folder / f"{taxi_type}-{int(year):04d}-{int(month):02d}.ipynb"


def run_report(taxi_type: str, year: int, month: int, *, model: str | None = None, input_file: str | None = None,
               output_file: str | None = None, output_dir: str | os.PathLike | None = None,
               kernel_name: str = KERNEL) -> Path:
    """Execute the notebook for one month; the report appears only if every cell ran.

    A failed run is kept beside it as `<name>.failed.ipynb` (with the error cell) to debug.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebook_path()
    target = report_path(taxi_type, year, month, output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.running.ipynb")
    parameters = {"taxi_type": taxi_type, "year": int(year), "month": int(month)}
    # Only what was given: the notebook's own defaults stay documented in one place.
    parameters.update({k: v for k, v in {"model": model, "input_file": input_file,
                                         "output_file": output_file}.items() if v})
    try:
        papermill.execute_notebook(
            str(source), str(partial), parameters=parameters, kernel_name=kernel_name,
            cwd=str(source.parent), progress_bar=False, log_output=False,
        )
    except PapermillExecutionError as exc:
        failed = target.with_name(f"{target.stem}.failed.ipynb")
        os.replace(partial, failed)
        raise ReportFailed(
            f"{taxi_type} {int(year):04d}-{int(month):02d}: {exc.ename}: {exc.evalue} (notebook kept at {failed})"
        ) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    return target


def read_summary(path: str | os.PathLike) -> dict:
    """The JSON printed by the executed notebook's cell tagged `summary`."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            if not text.strip():
                raise ReportFailed(f"{path}: the summary cell has no output (was the notebook executed?)")
            return json.loads(text)
    raise ReportFailed(f"{path}: no cell tagged {SUMMARY_TAG!r}")
