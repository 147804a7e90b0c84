"""scripts/screenshots.py says in one sentence what is missing instead of a traceback."""

import subprocess
import sys
from pathlib import Path

from workbench.stack import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "screenshots.py"


def test_check_names_the_server_that_does_not_answer():
    # Nothing listens on these ports: the check fails before it needs a browser.
    mlflow, prefect = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--mlflow", mlflow, "--prefect", prefect],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"screenshots: MLflow is not answering at {mlflow} (")
    assert lines[0].endswith("run `make services-up`.")
    assert "Traceback" not in out.stderr
