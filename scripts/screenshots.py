#!/usr/bin/env python
"""Screenshots of the local MLflow and Prefect UIs for the notebooks, checked for real content.

Needs the default-port stack with a production model (notebook 02) and, for the Prefect pages, the
`monthly` deployment and a completed run of it (notebooks 05/06), and Debian's `chromium` (installed with
apt-get when missing and this runs as root). Each page is loaded in headless Chromium, whose text must name
what the page is about (the run, the model and its alias, the deployment, the flow run) and must not show
what the notebooks say is not there (MLflow's assistant panel: the pages are taken in MLflow's Model training
view with the panel closed; a temporary path in a Prefect log), so a UI that breaks or renders empty fails;
then, unless `--check`, it is saved as a PNG, shrunk and quantised to a few tens of KB under notebooks/img/.

    python scripts/screenshots.py            # `make screenshots`: check and save every page
    python scripts/screenshots.py --check    # DOM checks only, no files written (`make test`)
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from websockets.sync.client import connect  # Prefect's dependency, in the dev environment

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "notebooks" / "img"
MODEL_NAME = "NYCRideDurationModel"
TRAINING_VIEW = "workflowType=machine_learning"  # MLflow's Model training view, also when named in the URL
ASSISTANT_PANEL = "Ask questions about your"  # the open panel's text (its closed button is labelled too)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
# MLflow UI settings (localStorage, `<key>_v<version>` holding JSON): the Model training view, assistant closed.
MLFLOW_VIEW = {
    "mlflow.workflowType_v1": "machine_learning",
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
}
# A temporary path in a captured log says where one machine kept a file, not what the flow did.
TEMP_PATHS = sorted({"/tmp/", tempfile.gettempdir().rstrip("/") + "/"})


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
            "url": f"{mlflow}/#/experiments/{run['info']['experiment_id']}/runs/{run_id}?{TRAINING_VIEW}",
            "window": "1400,1350",
            "expect": [run["info"]["run_name"], "rmse_valid"],
            "forbid": [ASSISTANT_PANEL],
        },
        {
            "file": "02-mlflow-registered-model.png",
            "url": f"{mlflow}/#/models/{MODEL_NAME}?{TRAINING_VIEW}",
            "window": "1400,900",
            "expect": [MODEL_NAME, "production"],
            "forbid": [ASSISTANT_PANEL],
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
            "limit": 10,
        },
    )
    if not runs:
        raise Unavailable(f"Prefect at {prefect} has no completed run of `monthly`: run notebook 06.")
    # The newest run whose log names no temporary path (the page shows the log).
    for candidate in runs:
        logs = _ask("Prefect", f"{prefect}/api/logs/filter", {"logs": {"flow_run_id": {"any_": [candidate["id"]]}}})
        if not any(tmp in entry["message"] for entry in logs for tmp in TEMP_PATHS):
            runs = [candidate]
            break
    else:
        raise Unavailable(
            f"every recent completed run of `monthly` logs a temporary path ({', '.join(TEMP_PATHS)}): "
            "the flow's log should name S3 keys and months, not where a worker kept a file."
        )
    out += [
        {
            "file": "06-prefect-monthly-deployment.png",
            "url": f"{prefect}/deployments/deployment/{deployment['id']}",
            "window": "1400,1000",
            "expect": ["monthly", "ride-duration-prediction"],
            "forbid": TEMP_PATHS,
        },
        {
            "file": "06-prefect-flow-run.png",
            "url": f"{prefect}/runs/flow-run/{runs[0]['id']}",
            "window": "1400,1000",
            # Each month is a task run named by its month; its summary line gives rides and RMSE.
            "expect": [runs[0]["name"], "Task run", " rides, RMSE "],
            "forbid": TEMP_PATHS,
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


class Browser:
    """Headless Chromium driven over the DevTools protocol (documented, stable): one tab, its own profile.

    The protocol, not `--screenshot`, because the MLflow pages need their view settings in the origin's
    localStorage before the app starts."""

    def __init__(self, binary: str):
        self.profile = tempfile.TemporaryDirectory(prefix="screenshots-")
        self.process = subprocess.Popen(
            [
                binary,
                *CHROMIUM_FLAGS,
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile.name}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile.name) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise Unavailable("Chromium did not open its DevTools port within 30 s.")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        tabs = _call(f"http://127.0.0.1:{port}/json/list")
        tab = next(t for t in tabs if t.get("type") == "page")
        self.socket = connect(tab["webSocketDebuggerUrl"], max_size=None, open_timeout=30)
        self.next_id = 0

    def send(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive between answers; only the answer to this call matters
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, width: int, height: int, expect: list[str], wait: float = 30) -> str:
        """Load `url` and wait until its text names everything in `expect` (or `wait` s pass); the page text."""
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + wait
        while True:
            time.sleep(0.5)
            text = self.evaluate("document.body ? document.body.innerText : ''") or ""
            if all(item in text for item in expect) or time.monotonic() > deadline:
                time.sleep(1)  # the last requests and renders settle
                return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.profile.cleanup()


def prepare_mlflow(browser: Browser, mlflow: str) -> None:
    """MLflow's UI keeps its view settings in the origin's localStorage: the *Model training* view (it opens in
    *GenAI*), and its assistant panel closed and already offered (on a local server it opens itself on the first
    page). Set on a static file of the origin, so no app has started with other settings."""
    browser.open(f"{mlflow}/static-files/favicon.ico", 200, 200, [], wait=0)
    for key, value in MLFLOW_VIEW.items():
        browser.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(json.dumps(value))})")


def render(browser: Browser, page: dict, png: Path | None) -> list[str]:
    """What is wrong with the page (expected texts missing, forbidden ones shown); with `png` and nothing
    wrong, also the screenshot."""
    width, height = (int(n) for n in page["window"].split(","))
    text = browser.open(page["url"], width, height, page["expect"])
    problems = [f"missing {item!r}" for item in page["expect"] if item not in text]
    problems += [f"shows {item!r}" for item in page.get("forbid", ()) if item in text]
    if png is not None and not problems:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.png"
            browser.screenshot(raw)
            shrink(raw, png)
    return problems


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
    session = Browser(browser)
    try:
        prepare_mlflow(session, args.mlflow.rstrip("/"))
        for page in todo:
            problems = render(session, page, None if args.check else IMG / page["file"])
            print(f"{page['file']:34s} {'ok' if not problems else '; '.join(problems)}")
            failed += bool(problems)
    finally:
        session.close()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
