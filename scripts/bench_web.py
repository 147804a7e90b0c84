#!/usr/bin/env python
"""`make bench-web`: the project's service vs the 2022 design vs hello world, same load.

Needs the model in the registry (`make services-up train`); prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

from ride_duration.stack import LocalStack
from ride_duration.web import ServerError
from ride_duration.web.bench import format_table, run_benchmark


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load duration per server (default 10)")
    parser.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections (default 8)")
    args = parser.parse_args(argv)
    # Default to the local stack (make services-up) for whatever the environment does not set.
    for key, value in LocalStack.from_settings(quiet=True).env().items():
        os.environ.setdefault(key, value)
    try:
        results = run_benchmark(seconds=args.seconds, connections=args.connections)
    except ServerError as exc:
        print(f"error: a server did not start: {exc}", file=sys.stderr)
        return 1
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
