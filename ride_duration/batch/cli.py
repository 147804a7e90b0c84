"""Command lines of the batch part (scripts/score*.py and `python -m ride_duration.batch`).

Settings are read once here and passed down. Prefect (3 s to import) and papermill are
imported only once the command's arguments, the Prefect server and the model have been
checked: a mistake costs a second, not the import.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime

import requests

from ..config import Settings, get_settings
from ..registry import resolve_model
from ..tlc import TAXI_TYPES
from . import FULL_NAME, WORK_POOL


class CliError(RuntimeError):
    pass


def _month(value: str) -> tuple[int, int]:
    try:
        parsed = datetime.strptime(value, "%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, got {value!r}") from None
    return parsed.year, parsed.month


def _prefect_ready() -> str:
    """PREFECT_API_URL of a live server (`get_settings` has loaded `.env` into the environment)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise CliError(
            "PREFECT_API_URL is not set: run `make services-up` and use the make targets or scripts/ (they find "
            'the local stack), or `eval "$(python -m workbench.stack env)"`, or set it to your Prefect server'
        )
    try:
        ok = requests.get(f"{url.rstrip('/')}/health", timeout=5).ok
    except requests.RequestException:
        ok = False
    if not ok:
        raise CliError(f"the Prefect server at {url} does not answer: start it with `make services-up`")
    return url


def _run(body) -> int:
    try:
        body()
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (FileNotFoundError, LookupError, ValueError, RuntimeError, TimeoutError) as exc:
        # InputNotFound, ModelNotFound, bad columns, failed months, no workers: one sentence, exit 1.
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--taxi-type", default="green", choices=TAXI_TYPES)
    parser.add_argument(
        "--run-id",
        help="model: an MLflow run id, an alias, a models:/ or S3 URI (default: as the "
        "services: MODEL_URI, MODEL_ID + EXPERIMENT_ID from S3, else the production alias)",
    )


def _pinned_model(ref: str | None, settings: Settings) -> str:
    """Resolve the model before any flow run exists: a tracking server that is down
    fails here in seconds with one sentence, and the flow gets the pinned URI."""
    model = resolve_model(ref, settings)
    print(f"model {model.uri} (run {model.run_id})", file=sys.stderr)
    return model.uri


# ----------------------------------------------------------------------------- score
def score_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Score ONE month with the Prefect flow, in this process. --year/--month name the month "
        "scored (2021 2 = February 2021); the flow's run date is 2021-03-02 03:00, as the schedule would use."
    )
    _common(parser)
    parser.add_argument("--year", type=int, required=True)
    parser.add_argument("--month", type=int, required=True, choices=range(1, 13), metavar="1-12")
    args = parser.parse_args(argv)
    settings = get_settings()

    def body():
        _prefect_ready()
        model = _pinned_model(args.run_id, settings)
        # Imported once the server and the model are known to answer (Prefect takes 3 s).
        from .flows import ride_duration_prediction
        from .paths import run_date_for

        result = ride_duration_prediction(
            taxi_type=args.taxi_type, run_id=model, run_date=run_date_for(args.year, args.month)
        )
        print(json.dumps(result, indent=1))

    return _run(body)


def backfill_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Score every month from --start to --end (inclusive): one run of the `monthly` deployment "
        "per month, executed by the work pool's workers (start them with `make workers N=2`); "
        "--local scores them in this process instead, one after the other."
    )
    _common(parser)
    parser.add_argument("--start", type=_month, required=True, help="first month, YYYY-MM")
    parser.add_argument("--end", type=_month, required=True, help="last month, YYYY-MM")
    parser.add_argument("--local", action="store_true", help="no workers: score the months in this process")
    parser.add_argument("--timeout", type=float, help="give up after this many seconds (default: no limit)")
    args = parser.parse_args(argv)
    settings = get_settings()

    def body():
        _prefect_ready()
        model = _pinned_model(args.run_id, settings)
        # Imported once the server and the model are known to answer (Prefect takes 3 s).
        from .deploy import create_deployment, deployment_exists
        from .flows import run_backfill

        if not args.local and not deployment_exists():
            create_deployment(settings, args.taxi_type)
        (y0, m0), (y1, m1) = args.start, args.end
        results = run_backfill(
            taxi_type=args.taxi_type,
            run_id=model,
            start_date=f"{y0:04d}-{m0:02d}",
            end_date=f"{y1:04d}-{m1:02d}",
            workers=not args.local,
            timeout=args.timeout,
        )
        for r in results:
            print(
                f"{r['year']:04d}-{r['month']:02d}  {r['rows']:>9,d} rides  RMSE {r['rmse']:.3f}  "
                f"{r['rejected']:>5,d} rejected  -> {r['output_file']}"
            )

    return _run(body)


def report_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="papermill: execute notebooks/05-batch-scoring.ipynb for a month "
        "into reports/<taxi>-<YYYY>-<MM>.ipynb."
    )
    parser.add_argument("--taxi-type", default="green", choices=TAXI_TYPES)
    parser.add_argument("--month", type=_month, required=True, help="month to score, YYYY-MM")
    parser.add_argument("--model", help="alias, MLflow run id or model URI (default: the notebook's)")
    parser.add_argument("--input-file", help="override the input parquet (s3://, URL or path)")
    parser.add_argument("--output-file", help="override where the predictions go")
    parser.add_argument("--output-dir", help="where the executed notebook goes (default: reports/)")
    args = parser.parse_args(argv)

    def body():
        # Imported once the arguments are checked: papermill and nbformat take a second.
        from .report import ReportFailed, read_summary, run_report

        try:
            path = run_report(
                args.taxi_type,
                *args.month,
                model=args.model,
                input_file=args.input_file,
                output_file=args.output_file,
                output_dir=args.output_dir,
            )
        except ReportFailed as exc:
            raise CliError(str(exc)) from exc
        print(f"report: {path}")
        print(json.dumps(read_summary(path), indent=1))

    return _run(body)


def worker_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ride_duration.batch worker",
        description="Take months from the work pool and score them in this process, one at a time, "
        "the model and imports kept loaded between months (Prefect's own `prefect worker start` works too).",
    )
    parser.add_argument("--pool", default=WORK_POOL, help="the work pool (default: %(default)s)")
    parser.add_argument("--name", help="the worker's name in the UI (default: a random one)")
    args = parser.parse_args(argv)
    get_settings()  # loads `.env` (PREFECT_API_URL and the endpoints) as every entry point does

    def body():
        _prefect_ready()
        from .worker import serve

        serve(args.pool, args.name)

    return _run(body)


# ----------------------------------------------------------------------------- deploy
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ride_duration.batch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    deploy = sub.add_parser(
        "deploy", help="create/update the work pool and the `monthly` deployment; preview its next 3 runs"
    )
    schedule = sub.add_parser("schedule", help="the same as deploy (the 2022 course's name)")
    for p in (deploy, schedule):
        p.add_argument("--taxi-type", default="green", choices=TAXI_TYPES)
        p.add_argument(
            "--model",
            help="alias, run id or model URI every run uses (default: each run finds its "
            "model as the services do, in its worker's environment)",
        )
    delegated = {"score": score_main, "backfill": backfill_main, "report": report_main, "worker": worker_main}
    for name in delegated:
        sub.add_parser(name, help=f"see `{name} --help`", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in delegated:
        return delegated[args.command](rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    settings = get_settings()

    def body():
        _prefect_ready()
        # Imported once the server is known to answer (Prefect takes 3 s).
        from .deploy import CRON, TIMEZONE, create_deployment, preview_schedule, read_deployment
        from .pool import online_workers

        logging.getLogger("prefect").setLevel(logging.WARNING)
        create_deployment(settings, args.taxi_type, args.model)
        deployment = read_deployment()
        print(
            f"deployment {FULL_NAME} on work pool {WORK_POOL!r}: cron {CRON!r} ({TIMEZONE}), "
            f"tags {deployment.tags}, parameters {deployment.parameters}"
        )
        for when in preview_schedule(3):
            print(f"  next run: {when:%Y-%m-%d %H:%M %Z}")
        workers = online_workers()
        print(
            f"workers online: {', '.join(workers)}"
            if workers
            else f"no worker polls {WORK_POOL!r} yet: `make workers N=2` here, or `prefect worker start "
            f"--pool {WORK_POOL}` on any machine with this package and the same endpoints"
        )

    return _run(body)
