"""The one place measured figures are kept: `docs/figures.json`, written by the benchmarks.

Each benchmark records its own section (`record("web", {...})`) after a run; the README,
`docs/benchmarks.md` and notebook 07 quote the figures from this file, so a figure has one
value and one source. A section is replaced whole, with the date and machine it was measured on.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures.json"


def load() -> dict:
    """Every recorded section ({} before the first benchmark run)."""
    return json.loads(FIGURES.read_text()) if FIGURES.exists() else {}


def record(section: str, values: dict) -> Path:
    """Replace `section` with `values` (JSON-serialisable; round them to what matters)."""
    figures = load()
    figures[section] = {
        "measured_on": date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}",
        **values,
    }
    FIGURES.parent.mkdir(exist_ok=True)
    FIGURES.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    # The page that quotes the figures is rendered with them, so the two never disagree.
    from benchmarks import report

    report.PAGE.write_text(report.render(load()))
    return FIGURES
