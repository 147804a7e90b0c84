"""The repository speaks of the product, the README is a front door, and figures have one source.

- No tracked file tells the project's history ("session 5", "the issue's measure", "earlier today",
  "on the final code"): git keeps the story, the files say what the product does.
- README.md stays within 250 lines.
- docs/benchmarks.md is exactly what `python -m benchmarks.report` renders from docs/figures.json, and
  neither the README nor notebook 07's text writes a measured ratio or latency by hand: they quote the file.
- The README's course map gives each notebook the study and run time its header gives, and that run time
  is about what its cells took in the committed run.
"""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from benchmarks import figures, report

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
APPENDIX = ROOT / "notebooks" / "07-performance-and-internals.ipynb"

# Phrases that only make sense in a work log. "session" alone is not one: pytest and requests have sessions.
HISTORY = re.compile(
    r"\bsessions? \d"
    r"|\b(?:this|last|previous|earlier|later|next) (?:work )?session\b"
    r"|\bthe issue\b|\bissue's\b"
    r"|\bearlier today\b|\bfinal code\b"
    r"|\b(?:before|after) this change\b|\bthis commit\b"
    r"|\bnow (?:does|uses|runs|reads|writes|loads|takes|gives|has|starts|sends|waits|no longer)\b",
    re.IGNORECASE,
)
# A measured figure written by hand: a ratio ("45x", "2.26x faster") or a latency / throughput.
HAND_FIGURE = re.compile(r"\b\d+(?:\.\d+)?x\b|\b\d+(?:\.\d+)? ?(?:ms|req/s)\b")
# Files that hold no prose of ours.
SKIP_SUFFIXES = (".lock", ".png", ".jpg", ".parquet", ".npz", ".ico")


def tracked_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    here = Path(__file__).resolve()
    return [
        path
        for name in names.split("\0")
        if name and not name.endswith(SKIP_SUFFIXES)
        for path in [ROOT / name]
        if path.is_file() and path.resolve() != here
    ]


def test_no_tracked_file_tells_the_projects_history():
    hits = []
    for path in tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary
        for number, line in enumerate(text.splitlines(), 1):
            if match := HISTORY.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:100]!r}")
    assert not hits, "history words (git keeps the story):\n" + "\n".join(hits)


def test_the_history_words_are_caught():
    caught = ["session 5: 15.1 s", "the issue's repro", "Earlier today it was 11 s", "on the final code", "it now uses"]
    kept = ['@pytest.fixture(scope="session")', "requests.Session()", "the session's stack", "answers 403 today"]
    assert all(HISTORY.search(text) for text in caught)
    assert not any(HISTORY.search(text) for text in kept)


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move depth into docs/"


def test_benchmarks_page_is_generated_from_the_figures_file():
    page = figures.FIGURES.parent / "benchmarks.md"
    assert page.read_text() == report.render(figures.load()), "run `python -m benchmarks.report`"


def test_readme_and_appendix_quote_figures_from_the_file_only():
    appendix = json.loads(APPENDIX.read_text())
    markdown = "\n".join("".join(cell["source"]) for cell in appendix["cells"] if cell["cell_type"] == "markdown")
    code = "\n".join("".join(cell["source"]) for cell in appendix["cells"] if cell["cell_type"] == "code")
    for name, text in (("README.md", README.read_text()), (APPENDIX.name, markdown)):
        written = sorted(set(HAND_FIGURE.findall(text)))
        assert not written, f"{name} writes measured figures by hand: {written}; quote docs/figures.json"
    assert "figures.load()" in code, "notebook 07 reads its figures from docs/figures.json"


@pytest.mark.parametrize(
    "recorded",
    [{}, {"web": {"measured_on": "2026-01-01", "machine": "2 cores", "a_over_b": 91.5, "rounds": [1.5, 2]}}],
)
def test_the_generator_renders_what_is_recorded(recorded):
    page = report.render(recorded)
    assert page.startswith("# Benchmarks")
    if recorded:
        assert "## Web service" in page and "| a_over_b | 91.5 |" in page and "| rounds | 1.5, 2 |" in page
    else:
        assert "No benchmark has recorded" in page


def _seconds(amount: str, unit: str) -> float:
    return float(amount) * (60 if unit.startswith("min") else 1)


def _header_times(notebook: Path) -> tuple[float, float]:
    header = " ".join("".join(json.loads(notebook.read_text())["cells"][0]["source"]).split())
    study = re.search(r"\*\*Study time:\*\* about (\d+) minutes", header)
    run = re.search(r"\*\*Run time:\*\* about (\d+(?:\.\d+)?) (seconds?|minutes?)", header)
    assert study and run, f"{notebook.name}: its header gives no study time or run time"
    return _seconds(study[1], "min"), _seconds(run[1], run[2])


def _recorded_run(notebook: Path) -> float:
    """Seconds from the first cell's start to the last cell's reply in the committed outputs."""
    stamps = [
        stamp
        for cell in json.loads(notebook.read_text())["cells"]
        for key in ("iopub.execute_input", "shell.execute_reply")
        if (stamp := cell.get("metadata", {}).get("execution", {}).get(key))
    ]
    if not stamps:
        pytest.skip(f"{notebook.name} has no recorded cell timings")
    return (datetime.fromisoformat(max(stamps)) - datetime.fromisoformat(min(stamps))).total_seconds()


COURSE_MAP = re.compile(r"^\| \[[^\]]+\]\(notebooks/([^)]+)\) \| .+ \| (\d+) min \| ~(\d+(?:\.\d+)?) (s|min) \|$", re.M)


def test_course_map_times_are_the_notebooks_own():
    rows = {
        name: (_seconds(study, "min"), _seconds(run, unit))
        for name, study, run, unit in COURSE_MAP.findall(README.read_text())
    }
    notebooks = sorted(ROOT.glob("notebooks/[0-9]*.ipynb"))
    assert sorted(rows) == [nb.name for nb in notebooks], "the README's course map lists every notebook once"
    for notebook in notebooks:
        assert rows[notebook.name] == _header_times(notebook), f"README and {notebook.name}'s header disagree"


@pytest.mark.parametrize("notebook", sorted(ROOT.glob("notebooks/[0-9]*.ipynb")), ids=lambda p: p.stem[:3])
def test_header_run_time_matches_the_committed_run(notebook):
    _, said = _header_times(notebook)
    took = _recorded_run(notebook)
    # "About" a figure: within half and one and a half times what the cells took.
    assert said / 2 <= took <= said * 1.5, f"{notebook.name} says about {said:g} s; its cells took {took:.0f} s"
