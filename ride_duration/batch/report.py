"""The instructors' monthly run: papermill executes notebooks/05-batch-scoring.ipynb with the month as parameters into
`reports/<taxi>-<YYYY>-<MM>.ipynb`, the report (rows, RMSE, `diff`, where the predictions went, what the model was
trained on). Its cell tagged `summary` prints those figures as JSON (`read_summary`). It uses the servers the
environment names and never starts or trains anything: a server down or no model raises `ReportStopped` in the
notebook, one sentence saying what to run, which `run_report` turns into `ReportFailed`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .. import registry
from ..config import Settings, repo_root
from ..tlc import describe_training_data

# Imported inside functions, to keep them lazy: mlflow (2-3 s, only to check the model), papermill,
# nbformat and IPython (only when a report runs, not when the CLI fails fast first).

log = logging.getLogger(__name__)

NOTEBOOK = "05-batch-scoring.ipynb"
KERNEL = "ride-duration"
SUMMARY_TAG = "summary"


class ReportFailed(RuntimeError):
    """The report was not made: one sentence (and where the failed notebook is kept)."""


class ReportStopped(RuntimeError):
    """Raised inside the notebook: the report cannot be made; the message says what to run."""


def servers(settings: Settings) -> str:
    """Which servers this report talks to, for its first output (S3 as `aws.s3_client` chooses it)."""
    s3 = os.environ.get("AWS_ENDPOINT_URL_S3") or settings.mlflow_s3_endpoint_url or settings.aws_endpoint_url
    return f"S3: {s3 or 'AWS (no endpoint configured)'}; MLflow: {settings.mlflow_tracking_uri}"


def require_model(model: str | None, settings: Settings):
    """The model to score with, pinned (`ModelRef`). ReportStopped, one sentence saying
    what to run, when its tracking server is down or no model has the alias."""
    uri, ref = settings.mlflow_tracking_uri, model or registry.default_model_uri(settings)
    named = "/" in ref or ":" in ref  # an alias or a run id is a bare word
    # An alias, a run id or a models:/ or runs:/ URI is resolved by the tracking server; S3 or a folder is not.
    if ref.startswith(("models:/", "runs:/")) or not named:
        try:
            registry.check_tracking_server(uri)
        except registry.TrackingServerDown:
            raise ReportStopped(
                f"the MLflow tracking server at {uri} is not answering: start the local stack with "
                "`make services-up`, or point MLFLOW_TRACKING_URI at your server"
            ) from None
    try:
        return registry.resolve_model(model, settings)
    except registry.ModelNotFound:
        if ref != settings.registry_uri and (named or registry.RUN_ID_PATTERN.match(ref)):
            raise  # a model named exactly (run id, URI): its own error says which
        alias = settings.model_alias if ref == settings.registry_uri else ref
        raise ReportStopped(
            f"there is no model {settings.model_name}@{alias} on the tracking server {uri}: train and "
            "promote one with `make train` (python scripts/train.py --promote), then run the report again"
        ) from None


def training_data(model, ref=None) -> dict | None:
    """What the model was trained on: `model.training_data` (set by predict.load_model
    from the MLmodel metadata), else the logged model's metadata; None if never recorded."""
    recorded = getattr(model, "training_data", None)
    if recorded is not None or ref is None:
        return recorded
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return (mlflow.models.get_model_info(ref.uri).metadata or {}).get("training_data")
    except (MlflowException, OSError) as exc:
        log.warning("could not read the training data of %s: %s", ref.uri, exc)
        return None


def training_warning(data: dict | None) -> str | None:
    """The loud sentence a report carries when its model's training data is synthetic or unknown."""
    if data is None:
        return (
            "The model's training data was not recorded (it was logged before provenance was): "
            "nothing here says it learned from real rides; retrain it with `make train`."
        )
    if data["synthetic"]:
        files = ", ".join(data[part]["file"] for part in ("train", "valid") if data[part]["synthetic"])
        return (
            f"THIS MODEL WAS TRAINED ON SYNTHETIC DATA ({files}): its predictions and this report's RMSE "
            "say nothing about real rides; train it on the real months (`make train` with TLC_MIRROR set)."
        )
    return None


def show_training_data(data: dict | None) -> None:
    """Print the provenance; a synthetic or unknown one also as a banner in the report."""
    print(describe_training_data(data))
    warning = training_warning(data)
    if warning is None:
        return
    print(f"\n{'!' * 78}\n!! {warning}\n{'!' * 78}")
    try:
        from IPython.display import Markdown, display
    except ImportError:
        return
    display(Markdown(f'<div style="border:3px solid #c00;padding:8px;color:#c00"><b>⚠ {warning}</b></div>'))


def summary_fields(data: dict | None) -> dict:
    """The provenance entries of the report's summary JSON."""
    return {"trained_on_synthetic_data": None if data is None else bool(data["synthetic"]), "training_data": data}


def notebook_path() -> Path:
    root = repo_root()
    if root is None or not (root / "notebooks" / NOTEBOOK).is_file():
        raise ReportFailed(f"notebooks/{NOTEBOOK} not found: run the report from the course checkout")
    return root / "notebooks" / NOTEBOOK


def report_path(taxi_type: str, year: int, month: int, output_dir: str | os.PathLike | None = None) -> Path:
    folder = Path(output_dir) if output_dir else (repo_root() or Path.cwd()) / "reports"
    return folder / f"{taxi_type}-{int(year):04d}-{int(month):02d}.ipynb"


def run_report(taxi_type: str, year: int, month: int, *, output_dir=None, kernel_name: str = KERNEL, **given) -> Path:
    """Execute the notebook for one month (`given`: model, input_file, output_file; the notebook's
    defaults otherwise); the report appears only if every cell ran. A failed run is kept beside
    it as `<name>.failed.ipynb` (with the error cell) to debug."""
    # Here, not at the top: the notebook imports this module, and papermill (1 s) is only for running it.
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source = notebook_path()
    target = report_path(taxi_type, year, month, output_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.running.ipynb")
    parameters = {"taxi_type": taxi_type, "year": int(year), "month": int(month)}
    parameters |= {k: v for k, v in given.items() if v}  # the notebook's own defaults stay in one place
    options = {"kernel_name": kernel_name, "cwd": str(source.parent), "progress_bar": False, "log_output": False}
    try:
        papermill.execute_notebook(str(source), str(partial), parameters=parameters, **options)
    except PapermillExecutionError as exc:
        label = f"{taxi_type} {int(year):04d}-{int(month):02d}"
        if exc.ename == ReportStopped.__name__:
            partial.unlink(missing_ok=True)  # nothing ran: the sentence is the whole story
            raise ReportFailed(f"{label}: {exc.evalue}") from None
        failed = target.with_name(f"{target.stem}.failed.ipynb")
        os.replace(partial, failed)
        raise ReportFailed(f"{label}: {exc.ename}: {exc.evalue} (notebook kept at {failed})") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)
    summary = read_summary(target)
    warning = training_warning(summary["training_data"]) if "training_data" in summary else None
    if warning:
        log.warning("%s: %s", target, warning)
    return target


def read_summary(path: str | os.PathLike) -> dict:
    """The JSON printed by the executed notebook's cell tagged `summary`."""
    import nbformat

    for cell in nbformat.read(str(path), as_version=4).cells:
        if SUMMARY_TAG in cell.get("metadata", {}).get("tags", []):
            text = "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")
            if not text.strip():
                raise ReportFailed(f"{path}: the summary cell has no output (was the notebook executed?)")
            return json.loads(text)
    raise ReportFailed(f"{path}: no cell tagged {SUMMARY_TAG!r}")
