"""Start a server process, wait until it answers, stop it: written once for every stand-in.

The stack's servers, gunicorn, the invoke endpoint and the Prefect workers all start
the same way: in their own session (so stopping reaches their children), output
appended to a log file (a pipe nobody reads blocks a chatty server once it is full),
and "ready" meaning "answers over HTTP", with the log's tail in the error otherwise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import requests


class ProcessFailed(RuntimeError):
    """The process exited while starting, or did not answer in time (the message has its log's tail)."""


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when `url` answers with a status below 400."""
    try:
        return requests.get(url, timeout=timeout).ok
    except requests.RequestException:
        return False


def spawn(cmd: list[str], log_path: Path, *, env: dict | None = None, cwd: Path | str | None = None):
    """Start `cmd` in the background in its own session, stdout and stderr appended to `log_path`."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def wait_until_ready(
    proc: subprocess.Popen, ready: Callable[[], bool], *, name: str, log_path: Path, timeout: float
) -> float:
    """Poll `ready()` until it is true; the seconds it took. ProcessFailed with the log's
    tail if the process exits first or `timeout` passes (the process is then stopped)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise ProcessFailed(
                f"{name} exited with code {proc.returncode} while starting (log {log_path}):\n{log_tail(log_path)}"
            )
        if ready():
            return time.monotonic() - start
        time.sleep(0.1)
    tail = log_tail(log_path)
    stop(proc)
    raise ProcessFailed(f"{name} did not answer within {timeout:.0f} s (log {log_path}):\n{tail}")


def stop(proc: subprocess.Popen, timeout: float = 15, *, resend: float = 1.0) -> int | None:
    """SIGTERM the process group (again every `resend` s: a child still booting may drop the
    first one), SIGKILL it after `timeout`; the exit code."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(min(resend, max(deadline - time.monotonic(), 0.01)))
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return proc.returncode


class Server:
    """A server subprocess owned by its caller, ready once `ready_url` answers.

    with Server([...], ready_url="http://127.0.0.1:8080/health", name="invoke", log_path=...) as server:
        ...
    """

    def __init__(
        self,
        cmd: list[str],
        *,
        ready_url: str,
        name: str,
        log_path: Path,
        env: dict | None = None,
        cwd: Path | str | None = None,
        ready: Callable[[], bool] | None = None,
    ):
        self.cmd = cmd
        self.ready_url = ready_url
        self.name = name
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.ready = ready or (lambda: http_ok(self.ready_url))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Self:
        self.proc = spawn(self.cmd, self.log_path, env=self.env, cwd=self.cwd)
        wait_until_ready(self.proc, self.ready, name=self.name, log_path=self.log_path, timeout=timeout)
        return self

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log_path, chars)

    def stop(self, timeout: float = 15) -> int | None:
        return stop(self.proc, timeout) if self.proc is not None else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
