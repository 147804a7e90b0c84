#!/usr/bin/env python
"""`make test`: pytest (unit + integration) and nbval over every notebook, in one run.

Tests start their own servers on free ports. The notebooks use the default local
stack (4566/5000/4200) like a learner would; if it was not running before, it is
stopped again afterwards, so `make test` leaves the machine as it found it.
"""
import subprocess
import sys
from pathlib import Path

from ride_duration.stack import LocalStack

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    stack = LocalStack.from_settings(quiet=True)
    was_up = any(info["pid"] for info in stack.status().values())
    cmd = [
        sys.executable, "-m", "pytest", "tests", "notebooks",
        "--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg",
        "--nbval-cell-timeout", "900", "--durations", "15", *sys.argv[1:],
    ]
    try:
        return subprocess.call(cmd, cwd=ROOT)
    finally:
        if not was_up:
            stack.down()


if __name__ == "__main__":
    raise SystemExit(main())
