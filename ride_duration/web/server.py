"""Running the service under gunicorn: `python -m ride_duration.web serve`, and a
`GunicornServer` handle that tests, the benchmark and notebook 03 share.

The Flask development server is never used: gunicorn is the only way this
package serves HTTP.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import requests

from ..config import WEB_PORT, repo_root

APP_SPEC = "ride_duration.web:create_app()"
CONFIG_NAME = "gunicorn.conf.py"


class ServerError(RuntimeError):
    pass


def gunicorn_config_path() -> Path:
    """The repo's gunicorn.conf.py (checkout root), else the one in the cwd (the image's /app)."""
    for folder in (repo_root(), Path.cwd()):
        if folder is not None and (folder / CONFIG_NAME).is_file():
            return folder / CONFIG_NAME
    raise ServerError(f"no {CONFIG_NAME} in the checkout or the current folder")


def gunicorn_command(
    app: str = APP_SPEC, *, bind: str | None = None, config: Path | None | bool = True, args: tuple = ()
) -> list[str]:
    """`python -m gunicorn -c gunicorn.conf.py [--bind ...] [args] APP`.

    config=True: the repo's config; a path: that file; None/False: gunicorn's defaults.
    """
    cmd = [sys.executable, "-m", "gunicorn"]
    if config is True:
        config = gunicorn_config_path()
    if config:
        cmd += ["-c", str(config)]
    if bind:
        cmd += ["--bind", bind]
    return [*cmd, *args, app]


class GunicornServer:
    """A gunicorn process on 127.0.0.1:<port>, started and stopped by its owner.

    with GunicornServer(port=free_port()) as server:
        requests.post(server.url + "/predict", json=ride)
    """

    def __init__(
        self,
        app: str = APP_SPEC,
        *,
        port: int,
        config: Path | None | bool = True,
        args: tuple = (),
        env: dict | None = None,
        log_path: Path | None = None,
    ):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.cmd = gunicorn_command(app, bind=f"127.0.0.1:{port}", config=config, args=args)
        self.env = {**os.environ, **(env or {})}
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="gunicorn-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Self:
        # Without -c, gunicorn still reads ./gunicorn.conf.py: start it in a neutral folder then.
        cwd = None if "-c" in self.cmd else tempfile.gettempdir()
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=cwd,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"gunicorn exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"gunicorn did not answer /health within {timeout:.0f} s:\n{tail}")

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=5).json()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15) -> None:
        """Stop gunicorn (master and workers); drop the log we made for it."""
        if self.proc is not None and self.proc.poll() is None:
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                # Again every second: a worker still booting has the master's signal
                # handlers and drops a TERM; the master would then wait graceful_timeout.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(host: str = "0.0.0.0", port: int = WEB_PORT, app: str = APP_SPEC) -> None:
    """Replace this process with gunicorn (what `make serve` and the image run)."""
    cmd = gunicorn_command(app, bind=f"{host}:{port}")
    os.execv(cmd[0], cmd)
