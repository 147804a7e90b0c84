#!/usr/bin/env python
"""`make test`: pytest (unit + integration), then nbval over every notebook, then the UI check.

Two pytest processes, not one: the tests point their own process at servers on
free ports (and leave that environment set until the session ends), while the
notebooks must see the learner's environment and use the default local stack
(4566/4572/5000/4200) like a learner would. The two share nothing, so they run at
the same time: most of either is waiting on a server, and side by side they
finish in about the time of the longer one. The notebooks' report is printed
after the tests'. If the default stack was not running before, it is stopped
again afterwards, so `make test` leaves the machine as it found it.

The UI check (scripts/screenshots.py --check) runs right after nbval, while the stack
the notebooks used still runs with their model, deployment and flow run: each MLflow and
Prefect page must render in headless Chromium and name what it shows.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from workbench.stack import LocalStack

ROOT = Path(__file__).resolve().parents[1]
# The tests in two processes, each module (the batch package, the real-data model) kept in one of them
# (tests/conftest.py groups them): they mostly wait on servers, so two share 2 cores and the notebooks.
XDIST = ["-n", os.environ.get("TEST_PROCESSES", "2"), "--dist", "loadgroup"]


def main() -> int:
    extra = sys.argv[1:]
    stack = LocalStack.from_settings(quiet=True)
    was_up = any(info["pid"] for info in stack.status().values())
    pytest = [sys.executable, "-m", "pytest", "--durations", "15"]
    nbval = ["--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg", "--nbval-cell-timeout", "900"]
    try:
        with tempfile.TemporaryFile("w+") as log:
            nb = subprocess.Popen(
                [*pytest, "notebooks", *nbval, *extra],
                cwd=ROOT,
                env=dict(os.environ),
                stdout=log,
                stderr=log,
                text=True,
            )
            tests = subprocess.call([*pytest, "tests", *XDIST, *extra], cwd=ROOT, env=dict(os.environ))
            notebooks = nb.wait()
            log.seek(0)
            print("==> nbval over every notebook (ran beside the tests)", flush=True)
            sys.stdout.write(log.read())
            sys.stdout.flush()
        print("==> the MLflow and Prefect UIs render (scripts/screenshots.py --check)", flush=True)
        uis = subprocess.call([sys.executable, "scripts/screenshots.py", "--check"], cwd=ROOT, env=dict(os.environ))
        return tests or notebooks or uis
    finally:
        if not was_up:
            stack.down()


if __name__ == "__main__":
    raise SystemExit(main())
