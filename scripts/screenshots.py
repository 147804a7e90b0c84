#!/usr/bin/env python
"""Screenshots of the local MLflow and Prefect UIs for the notebooks, checked for real content.

Needs the default-port stack with a production model (notebook 02) and, for the Prefect pages, the
`monthly` deployment and a completed run of it (notebooks 05/06), and Debian's `chromium` (installed with
apt-get when missing and this runs as root). Each page is rendered in headless Chromium to its DOM, which
must name what the page is about (the run, the model and its alias, the deployment, the flow run), so a UI
that breaks or renders empty fails; then, unless `--check`, to a PNG, shrunk and quantised to a few tens of
KB under notebooks/img/.

    python scripts/screenshots.py            # `make screenshots`: check and save every page
    python scripts/screenshots.py --check    # DOM checks only, no files written (`make test`)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "notebooks" / "img"
MODEL_NAME = "NYCRideDurationModel"
# Virtual time lets the single-page apps finish their API calls without waiting in real time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=20000"]


class Unavailable(RuntimeError):
    """A server or Chromium is missing; the message is the one sentence to print."""


def _call(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _ask(server: str, url: str, body: dict | None = None):
    try:
        return _call(url, body)
    except urllib.error.HTTPError as exc:
        raise Unavailable(f"{server} answered {exc.code} to {url}: is the stack from this checkout running?") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"{server} is not answering at {url} ({reason}): run `make services-up`.") from None


def pages(mlflow: str, prefect: str) -> list[dict]:
    """Each page: file, URL, window size and the texts its DOM must hold, read from the running servers."""
    alias = urllib.parse.urlencode({"name": MODEL_NAME, "alias": "production"})
    try:
        version = _call(f"{mlflow}/api/2.0/mlflow/registered-models/alias?{alias}")
    except urllib.error.HTTPError:
        raise Unavailable(
            f"MLflow at {mlflow} has no {MODEL_NAME}@production: run notebook 02 or `make train`."
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"MLflow is not answering at {mlflow} ({reason}): run `make services-up`.") from None
    run_id = version["model_version"]["run_id"]
    run = _ask("MLflow", f"{mlflow}/api/2.0/mlflow/runs/get?run_id={run_id}")["run"]
    out = [
        {
            "file": "02-mlflow-run.png",
            "url": f"{mlflow}/#/experiments/{run['info']['experiment_id']}/runs/{run_id}",
            "window": "1400,1350",
            "expect": [run["info"]["run_name"], "rmse_valid"],
        },
        {
            "file": "02-mlflow-registered-model.png",
            "url": f"{mlflow}/#/models/{MODEL_NAME}",
            "window": "1400,900",
            "expect": [MODEL_NAME, "production"],
        },
    ]
    deployments = _ask("Prefect", f"{prefect}/api/deployments/filter", {"deployments": {"name": {"any_": ["monthly"]}}})
    if not deployments:
        raise Unavailable(f"Prefect at {prefect} has no `monthly` deployment: run notebook 06 or `make deploy`.")
    deployment = deployments[0]
    runs = _ask(
        "Prefect",
        f"{prefect}/api/flow_runs/filter",
        {
            "flow_runs": {"deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["COMPLETED"]}}},
            "sort": "START_TIME_DESC",
            "limit": 1,
        },
    )
    if not runs:
        raise Unavailable(f"Prefect at {prefect} has no completed run of `monthly`: run notebook 06.")
    out += [
        {
            "file": "06-prefect-monthly-deployment.png",
            "url": f"{prefect}/deployments/deployment/{deployment['id']}",
            "window": "1400,1000",
            "expect": ["monthly", "ride-duration-prediction"],
        },
        {
            "file": "06-prefect-flow-run.png",
            "url": f"{prefect}/runs/flow-run/{runs[0]['id']}",
            "window": "1400,1000",
            "expect": [runs[0]["name"], "apply-model"],
        },
    ]
    return out


def chromium() -> str:
    """The Chromium binary; installed from Debian when missing and this process may (root, apt-get)."""
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("installing chromium (apt-get install -y chromium) ...", file=sys.stderr)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(["apt-get", "update", "-qq"], check=False, **quiet)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=False, **quiet)
        if found := shutil.which("chromium"):
            return found
    raise Unavailable("Chromium is not installed and could not be: as root, run `apt-get install -y chromium`.")


def render(browser: str, page: dict, png: Path | None) -> list[str]:
    """The expected texts missing from the page's DOM; with `png` and none missing, also the screenshot."""
    command = [browser, *CHROMIUM_FLAGS, f"--window-size={page['window']}"]
    dom = subprocess.run([*command, "--dump-dom", page["url"]], capture_output=True, text=True, timeout=120)
    missing = [text for text in page["expect"] if text not in dom.stdout]
    if png is not None and not missing:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.png"
            subprocess.run([*command, f"--screenshot={raw}", page["url"]], capture_output=True, timeout=120)
            shrink(raw, png)
    return missing


def shrink(src: Path, dst: Path, scale: float = 0.72, colors: int = 128) -> None:
    """Committed images stay small: scaled down and reduced to a palette."""
    from PIL import Image  # matplotlib's dependency, in the dev environment

    image = Image.open(src).convert("RGB")
    width, height = image.size
    image = image.resize((int(width * scale), int(height * scale)), Image.LANCZOS)
    image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="check the pages' DOM only, write no files")
    parser.add_argument("--mlflow", default="http://127.0.0.1:5000", help="MLflow UI (default: the local stack)")
    parser.add_argument("--prefect", default="http://127.0.0.1:4200", help="Prefect UI (default: the local stack)")
    args = parser.parse_args(argv)
    try:
        # The servers first: that failure needs no browser to be reported.
        todo = pages(args.mlflow.rstrip("/"), args.prefect.rstrip("/"))
        browser = chromium()
    except Unavailable as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        return 2
    failed = 0
    for page in todo:
        missing = render(browser, page, None if args.check else IMG / page["file"])
        print(f"{page['file']:34s} {'ok' if not missing else f'MISSING {missing}'}")
        failed += bool(missing)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
