"""`make test` relies on pytest-xdist's `--dist loadgroup` keeping each group of tests/conftest.py (a module,
the batch package, the real-data model) on one worker, so its expensive fixture is made once. Nothing fails
when grouping stops: pytest 9.2 with pytest-xdist 3.8 silently drops it (pytest-dev/pytest-xdist#1386), and so
does a conftest hook that marks the tests after xdist has read the marks. This runs two fast modules of the
suite itself, through its own conftest, and reads back which worker ran each test."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_features.py", "tests/test_docs.py"]


def test_each_group_runs_on_one_worker():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *MODULES, "-m", "not integration", "-n", "2", "--dist", "loadgroup", "-v"]
        + ["-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    workers = defaultdict(set)
    for worker, module in re.findall(r"\[(gw\d)\] .*?PASSED (\S+?\.py)::", run.stdout):
        workers[module].add(worker)
    assert sorted(workers) == sorted(MODULES), run.stdout[-3000:]
    assert {module: len(seen) for module, seen in workers.items()} == dict.fromkeys(MODULES, 1), dict(workers)
