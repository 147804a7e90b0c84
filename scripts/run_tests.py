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

The UI check (scripts/screenshots.py --check) runs as soon as nbval ends, beside the tests still
running, while the stack the notebooks used still runs with their model, deployment and flow run:
each MLflow and Prefect page must render in headless Chromium and name what it shows.
"""

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from workbench.stack import LocalStack

ROOT = Path(__file__).resolve().parents[1]
# The tests in two processes, each module (the batch package, the real-data model) kept in one of them
# (tests/conftest.py groups them): they mostly wait on servers, so two share 2 cores and the notebooks.
XDIST = ["-n", os.environ.get("TEST_PROCESSES", "2"), "--dist", "loadgroup"]
SUITE = ["-m", "not slow"]  # the tests that wait minutes of real time run with `make test-slow`


def main() -> int:
    extra = sys.argv[1:]
    stack = LocalStack.from_settings(quiet=True)
    was_up = any(info["pid"] for info in stack.status().values())
    pytest = [sys.executable, "-m", "pytest", "--durations", "15"]
    nbval = ["--nbval", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg", "--nbval-cell-timeout", "900"]
    try:
        with tempfile.TemporaryFile("w+") as log, tempfile.TemporaryFile("w+") as ui_log:
            nb = subprocess.Popen(
                [*pytest, "notebooks", *nbval, *extra],
                cwd=ROOT,
                env=dict(os.environ),
                stdout=log,
                stderr=log,
                text=True,
            )
            after = {}

            def check_uis() -> None:
                after["notebooks"] = nb.wait()
                after["uis"] = subprocess.call(
                    [sys.executable, "scripts/screenshots.py", "--check"],
                    cwd=ROOT,
                    env=dict(os.environ),
                    stdout=ui_log,
                    stderr=ui_log,
                )

            uis = threading.Thread(target=check_uis)
            uis.start()
            tests = subprocess.call([*pytest, "tests", *XDIST, *SUITE, *extra], cwd=ROOT, env=dict(os.environ))
            uis.join()
            for title, output in (
                ("nbval over every notebook (ran beside the tests)", log),
                ("the MLflow and Prefect UIs render (scripts/screenshots.py --check, after nbval)", ui_log),
            ):
                print(f"==> {title}", flush=True)
                output.seek(0)
                sys.stdout.write(output.read())
                sys.stdout.flush()
        return tests or after["notebooks"] or after["uis"]
    finally:
        if not was_up:
            stack.down()


if __name__ == "__main__":
    raise SystemExit(main())
