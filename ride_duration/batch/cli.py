"""Command lines of the batch part (scripts/score*.py and `python -m ride_duration.batch`).

Prefect reads its settings when first imported, so the environment (`.env`, the
local stack) is settled here before anything imports the flows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime

from ..config import get_settings
from ..tlc import TAXI_TYPES


class CliError(RuntimeError):
    pass


def _month(value: str) -> tuple[int, int]:
    try:
        parsed = datetime.strptime(value, "%Y-%m")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM, got {value!r}") from None
    return parsed.year, parsed.month


def _prefect_ready() -> str:
    """PREFECT_API_URL of a live server; the default local stack if nothing is set."""
    import requests

    get_settings()  # loads .env into os.environ if present
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
    except (FileNotFoundError, LookupError, ValueError, RuntimeError) as exc:
        # InputNotFound, ModelNotFound, bad columns, failed months: one sentence, exit 1.
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


def _pinned_model(ref: str | None) -> str:
    """Resolve the model before any flow run exists: a tracking server that is down
    fails here in seconds with one sentence, and the flow gets the pinned URI."""
    from ..registry import resolve_model

    model = resolve_model(ref)
    print(f"model {model.uri} (run {model.run_id})", file=sys.stderr)
    return model.uri


# ----------------------------------------------------------------------------- score
def score_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Score ONE month with the Prefect flow. --year/--month name the month scored "
        "(2021 2 = February 2021); the flow's run date is 2021-03-02 03:00, as the schedule would use."
    )
    _common(parser)
    parser.add_argument("--year", type=int, required=True)
    parser.add_argument("--month", type=int, required=True, choices=range(1, 13), metavar="1-12")
    args = parser.parse_args(argv)

    def body():
        _prefect_ready()
        model = _pinned_model(args.run_id)  # before importing Prefect (3 s): fail fast
        from .flows import ride_duration_prediction
        from .paths import run_date_for

        result = ride_duration_prediction(
            taxi_type=args.taxi_type, run_id=model, run_date=run_date_for(args.year, args.month)
        )
        print(json.dumps(result, indent=1))

    return _run(body)


def backfill_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Score every month from --start to --end (inclusive), months in parallel, one Prefect subflow each."
    )
    _common(parser)
    parser.add_argument("--start", type=_month, required=True, help="first month, YYYY-MM")
    parser.add_argument("--end", type=_month, required=True, help="last month, YYYY-MM")
    parser.add_argument("--sequential", action="store_true", help="one month after the other")
    args = parser.parse_args(argv)

    def body():
        _prefect_ready()
        model = _pinned_model(args.run_id)  # before importing Prefect (3 s): fail fast
        from .flows import ride_duration_prediction_backfill

        (y0, m0), (y1, m1) = args.start, args.end
        results = ride_duration_prediction_backfill(
            taxi_type=args.taxi_type,
            run_id=model,
            parallel=not args.sequential,
            start_date=f"{y0:04d}-{m0:02d}",
            end_date=f"{y1:04d}-{m1:02d}",
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


# ----------------------------------------------------------------------------- deploy
def _print_schedule(n: int = 3) -> None:
    from .deploy import CRON, FULL_NAME, TIMEZONE, preview_schedule, read_deployment

    deployment = read_deployment()
    print(
        f"deployment {FULL_NAME}: cron {CRON!r} ({TIMEZONE}), tags {deployment.tags}, "
        f"parameters {deployment.parameters}"
    )
    for when in preview_schedule(n):
        print(f"  next run: {when:%Y-%m-%d %H:%M %Z}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ride_duration.batch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    deploy = sub.add_parser("deploy", help="create the `monthly` deployment and serve its runs (blocking)")
    deploy.add_argument("--no-serve", action="store_true", help="only create it and preview the schedule")
    schedule = sub.add_parser("schedule", help="create/update the deployment and preview its next 3 runs")
    for p in (deploy, schedule):
        p.add_argument("--taxi-type", default="green", choices=TAXI_TYPES)
        p.add_argument(
            "--model",
            help="alias, run id or model URI every run uses (default: each run finds its "
            "model as the services do, in the runner's environment)",
        )
    delegated = {"score": score_main, "backfill": backfill_main, "report": report_main}
    for name in delegated:
        sub.add_parser(name, help=f"see `{name} --help`", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command in delegated:
        return delegated[args.command](rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    def body():
        _prefect_ready()
        from .deploy import create_deployment, serve_monthly

        create_deployment(args.taxi_type, args.model)
        _print_schedule()
        if args.command == "deploy" and not args.no_serve:
            logging.basicConfig(level=logging.INFO)
            serve_monthly(args.taxi_type, args.model)

    return _run(body)
