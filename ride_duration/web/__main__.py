"""`python -m ride_duration.web serve`: gunicorn with the repo's config on :9696."""

from __future__ import annotations

import argparse
import sys

from ..config import WEB_PORT
from .server import ServerError, serve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ride_duration.web", description="Serve the ride duration model.")
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser(
        "serve", help="run gunicorn with gunicorn.conf.py (model from MODEL_URI / MODEL_ID / the registry)"
    )
    cmd.add_argument("--host", default="0.0.0.0")
    cmd.add_argument("--port", type=int, default=WEB_PORT)
    args = parser.parse_args(argv)
    try:
        serve(args.host, args.port)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
