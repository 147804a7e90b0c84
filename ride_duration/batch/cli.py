"""Command lines of the batch part (scripts/score*.py and `python -m ride_duration.batch`).

Settings are read once here. Prefect (3 s to import) and papermill are imported once the arguments, the Prefect
server and the model are checked: a mistake costs a second. A failure is one sentence on stderr, exit code 1;
Prefect's log lines (tracebacks included) go to its server and UI, not the terminal."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from datetime import datetime

import requests

from ..config import get_settings
from ..registry import resolve_model
from ..tlc import TAXI_TYPES
from . import FULL_NAME, WORK_POOL


def _month(value: str) -> str:
    try:
        return datetime.strptime(value, "%Y-%m").strftime("%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, got {value!r}") from None


def _prefect_ready() -> str:
    """The UI's address of a live Prefect server (PREFECT_API_URL; `get_settings` loaded `.env`)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise LookupError(
            "PREFECT_API_URL is not set: run `make services-up` and use the make targets or scripts/ (they find "
            'the local stack), or `eval "$(python -m workbench.stack env)"`, or set it to your Prefect server'
        )
    try:
        requests.get(f"{url.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException:
        raise LookupError(f"the Prefect server at {url} does not answer: start it with `make services-up`") from None
    return url.rstrip("/").removesuffix("/api")


@contextlib.contextmanager
def terminal_quiet():
    """The root logger's handlers (Prefect's console) silenced; its records still reach the server."""
    levels = {handler: handler.level for handler in logging.getLogger().handlers}
    for handler in levels:
        handler.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for handler, level in levels.items():
            handler.setLevel(level)


def _run(body, prefect: bool = True) -> int:
    """`body(the Prefect UI's address)` once `.env` is loaded; its failure as one sentence, exit 1."""
    get_settings()  # loads `.env` into the environment
    try:
        body(_prefect_ready() if prefect else None)
    except (OSError, LookupError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--taxi-type", default="green", choices=TAXI_TYPES)
    model = "model: a run id, an alias, a models:/ or S3 URI, a folder (default: the services', see registry)"
    parser.add_argument("--run-id", help=model)
    parser.add_argument("--force", action="store_true", help="score months again even if scored with this model")
    return parser


def _flow_run(url: str, run, args, **parameters):
    """Pin the model (a tracking server that is down fails here in seconds), run the flow quietly,
    say where it is in the UI; its result, or its failure's sentence."""
    model = resolve_model(args.run_id, get_settings())
    print(f"model {model.uri} (run {model.run_id})", file=sys.stderr)
    with terminal_quiet():
        state = run(taxi_type=args.taxi_type, run_id=model.uri, force=args.force, return_state=True, **parameters)
    flow_run_id = state.state_details.flow_run_id
    print(f"flow run {flow_run_id}: {url}/runs/flow-run/{flow_run_id}", file=sys.stderr)
    return state.result()


def score_main(argv=None) -> int:
    parser = _parser("Score ONE month with the Prefect flow, here: --year 2021 --month 2 is run date 2021-03-02 03:00.")
    parser.add_argument("--year", type=int, required=True)
    parser.add_argument("--month", type=int, required=True, choices=range(1, 13), metavar="1-12")
    args = parser.parse_args(argv)

    def body(url):
        from .flows import ride_duration_prediction
        from .paths import run_date_for

        summary = _flow_run(url, ride_duration_prediction, args, run_date=run_date_for(args.year, args.month))
        print(json.dumps(summary, indent=1))

    return _run(body)


def backfill_main(argv=None) -> int:
    parser = _parser("Score --start to --end in one flow run, a task per month, skipping months already scored.")
    parser.add_argument("--start", type=_month, required=True, help="first month, YYYY-MM")
    parser.add_argument("--end", type=_month, required=True, help="last month, YYYY-MM")
    parser.add_argument("--dask", metavar="ADDRESS", help="a Dask scheduler (tcp://host:8786): months on its workers")
    args = parser.parse_args(argv)

    def body(url):
        from .flows import run_backfill

        print(f"backfill {args.start}..{args.end} {'on ' + args.dask if args.dask else 'here'}", file=sys.stderr)
        for r in _flow_run(url, run_backfill, args, dask=args.dask, start_date=args.start, end_date=args.end):
            month = f"{r['year']:04d}-{r['month']:02d}  {r['rows']:>9,d} rides  RMSE {r['rmse']:.3f}"
            print(f"{month}  {r['rejected']:>5,d} rejected  -> {r['output_file']}")

    return _run(body)


def report_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="papermill: notebook 05 for a month into reports/")
    parser.add_argument("--taxi-type", default="green", choices=TAXI_TYPES)
    parser.add_argument("--month", type=_month, required=True, help="month to score, YYYY-MM")
    parser.add_argument("--model", help="alias, MLflow run id or model URI (default: the notebook's)")
    parser.add_argument("--input-file", help="override the input parquet (s3://, URL or path)")
    parser.add_argument("--output-file", help="override where the predictions go")
    parser.add_argument("--output-dir", help="where the executed notebook goes (default: reports/)")
    args = parser.parse_args(argv)

    def body(_):
        from .report import read_summary, run_report

        year, month = map(int, args.month.split("-"))
        options = {k: getattr(args, k) for k in ("model", "input_file", "output_file", "output_dir")}
        path = run_report(args.taxi_type, year, month, **options)
        print(f"report: {path}")
        print(json.dumps(read_summary(path), indent=1))

    return _run(body, prefect=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ride_duration.batch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("deploy", "schedule"):  # schedule: the 2022 course's name
        deploy = sub.add_parser(name, help="create/update the work pool and the `monthly` deployment")
        deploy.add_argument("--taxi-type", default="green", choices=TAXI_TYPES)
        deploy.add_argument("--model", help="the model every run uses (default: found where each run runs)")
    delegated = {"score": score_main, "backfill": backfill_main, "report": report_main}
    for name in delegated:
        sub.add_parser(name, help=f"see `{name} --help`", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in delegated:
        return delegated[args.command](rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    def body(_):
        from .deploy import CRON, TIMEZONE, create_deployment, deployment_and_workers

        with terminal_quiet():
            create_deployment(args.taxi_type, args.model)
        deployment, workers = deployment_and_workers()
        print(f"deployment {FULL_NAME} on work pool {WORK_POOL!r}: cron {CRON!r} ({TIMEZONE}), tags {deployment.tags}")
        print(f"parameters {deployment.parameters}; upcoming runs: the deployment's page in the Prefect UI")
        start = f"`make worker`, or `prefect worker start --pool {WORK_POOL}` on a machine with this package"
        print(f"workers online: {', '.join(workers) or 'none yet: ' + start}")

    return _run(body)
