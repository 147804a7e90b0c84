#!/usr/bin/env python
"""`make notebooks`: re-execute every notebook in order, in place, against a fresh default stack.

What the committed outputs must be: one run, top to bottom, as a learner's first run. So the
default local stack (the one learners use, on its default ports) is stopped, its state folder
(LOCAL_DIR, `.local/`: MLflow runs and registry, S3 objects, Prefect runs, logs) is removed, and
the stack is started empty; notebook 02 then trains and promotes the one production model every
later notebook shows. The stack is stopped again at the end. The TLC data (`data/`, TLC_MIRROR)
is kept. `make course` differs: it runs against whatever stack is up and writes copies to
reports/course/, leaving the committed notebooks alone.

Each notebook runs with this process's environment, as Jupyter would give it to a learner (the
notebooks find the stack themselves), and is written back only when every cell ran.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from ride_duration.config import get_settings
from workbench import workers
from workbench.stack import LocalStack

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "ride-duration"
CELL_TIMEOUT = 900


def fresh_stack() -> LocalStack:
    stack = LocalStack.from_settings(quiet=True)
    workers.stop(stack)
    stack.down()
    local_dir = get_settings().local_dir
    if local_dir.is_dir():
        print(f"removing the stack's state: {local_dir}", flush=True)
        shutil.rmtree(local_dir)
    stack = LocalStack.from_settings(quiet=True)  # default ports again, nothing running left to inherit
    stack.up()
    return stack


def execute(path: Path) -> float:
    """Run the notebook in its folder and write it back; seconds taken."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    nbformat.write(nb, path)
    return seconds


def main(names: list[str]) -> int:
    paths = [ROOT / name for name in names] or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    stack = fresh_stack()
    try:
        for path in paths:
            print(f"==> {path.name}", flush=True)
            try:
                seconds = execute(path)
            except CellExecutionError as exc:
                # The notebook on disk is left as committed; the error names the cell.
                print(f"error: {path.name} failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
                return 1
            print(f"    ok in {seconds:.0f} s", flush=True)
    finally:
        workers.stop(stack)
        stack.down()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
