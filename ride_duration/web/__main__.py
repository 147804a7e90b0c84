"""`python -m ride_duration.web serve`: gunicorn with the repo's gunicorn.conf.py, on WEB_BIND."""

from __future__ import annotations

import argparse
import sys

from ..config import web_bind
from .server import ServerError, serve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ride_duration.web", description="Serve the ride duration model.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "serve",
        help="run gunicorn with gunicorn.conf.py on WEB_BIND (default 0.0.0.0:9696; "
        "model from MODEL_URI / MODEL_ID / the registry)",
    )
    parser.parse_args(argv)
    print(f"serving on {web_bind()} (WEB_BIND)", file=sys.stderr)
    try:
        serve()
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
