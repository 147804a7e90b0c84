#!/usr/bin/env python
"""`make course`: execute every notebook in order, as a learner would, into reports/course/.

The committed notebooks stay untouched (their outputs are what nbval compares);
the freshly executed copies land in reports/course/ for you to open.
"""

import sys
import time
from pathlib import Path

import papermill

ROOT = Path(__file__).resolve().parents[1]


def main(notebooks: list[str]) -> int:
    out_dir = ROOT / "reports" / "course"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in notebooks:
        source = ROOT / name
        start = time.perf_counter()
        print(f"==> {source.name}", flush=True)
        try:
            papermill.execute_notebook(
                str(source),
                str(out_dir / source.name),
                cwd=str(source.parent),
                kernel_name="ride-duration",
                progress_bar=False,
            )
        except papermill.PapermillExecutionError as exc:
            print(f"error: {source.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}", file=sys.stderr)
            return 1
        print(f"    ok in {time.perf_counter() - start:.0f} s -> {out_dir / source.name}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
