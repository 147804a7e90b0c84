"""Local workers for the batch part, each what a machine would run, all stock components:

- Prefect's worker on the `ride-duration` process pool (`prefect worker start --pool
  ride-duration`; `make worker` runs one in the foreground): it takes the `monthly`
  deployment's runs, a new process per run.
- A Dask cluster for a backfill's scale-out (`dask scheduler`, `dask worker`): the backfill's
  months run on its workers (`score_backfill.py --dask tcp://...`).

    python -m workbench.workers start 2      # N Prefect workers in the background
    python -m workbench.workers status
    python -m workbench.workers stop         # make services-down runs it first

Background workers run in sessions of their own, with pid files in `.local/run/worker-<n>.json`
and logs in `.local/logs/worker-<n>.log`. `kill(...)` ends a process at once with SIGKILL, as
when a machine dies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from ride_duration.batch import WORK_POOL
from ride_duration.config import repo_root

from .process import ProcessFailed, spawn, wait_until_ready
from .process import stop as stop_process
from .stack import HOST, MARKER, LocalStack, activate_if_running, free_port, pid_alive

# Plain log files, lines as they happen.
WORKER_ENV = {"PREFECT_LOGGING_COLORS": "false", "PYTHONUNBUFFERED": "1"}


@dataclass(frozen=True)
class Worker:
    index: int
    name: str
    pid: int
    pool: str
    log_path: Path


def _pidfile(stack: LocalStack, index: int) -> Path:
    return stack.run_dir / f"worker-{index}.json"


def _child_env(env: dict | None = None) -> dict:
    # Not the stack's marker: `stack up` stops marked processes it has no pid file for.
    return {k: v for k, v in {**os.environ, **WORKER_ENV, **(env or {})}.items() if k != MARKER}


def workers(stack: LocalStack) -> list[Worker]:
    """The workers this stack's folder started whose process still runs (stale pid files removed)."""
    found = []
    for path in sorted(stack.run_dir.glob("worker-*.json")):
        try:
            info = json.loads(path.read_text())
            worker = Worker(**{**info, "log_path": Path(info["log_path"])})
        except (OSError, ValueError, TypeError, KeyError):
            worker = None
        if worker is not None and pid_alive(worker.pid):
            found.append(worker)
        else:
            path.unlink(missing_ok=True)
    return sorted(found, key=lambda w: w.index)


def online(pool: str, api_url: str | None = None) -> set[str]:
    """Names of the workers the Prefect server lists as ONLINE in `pool`."""
    api_url = (api_url or os.environ["PREFECT_API_URL"]).rstrip("/")
    response = requests.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=10)
    if response.status_code == 404:  # no such pool yet: the first worker creates it
        return set()
    response.raise_for_status()
    return {w["name"] for w in response.json() if w.get("status") == "ONLINE"}


def start(count: int, *, stack: LocalStack, pool: str = WORK_POOL, env: dict | None = None, timeout: float = 90):
    """Make `count` Prefect workers run (`local-worker-1`..`count`), `prefect worker start --pool`
    as shipped, and wait until the server lists each one online."""
    running = {w.index for w in workers(stack)}
    started = []
    for index in range(1, count + 1):
        if index in running:
            continue
        name = f"local-worker-{index}"
        log_path = stack.local_dir / "logs" / f"worker-{index}.log"
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--name", name]
        proc = spawn(cmd, log_path, env=_child_env(env), cwd=repo_root() or stack.local_dir.parent)
        worker = Worker(index, name, proc.pid, pool, log_path)
        stack.run_dir.mkdir(parents=True, exist_ok=True)
        _pidfile(stack, index).write_text(json.dumps({**worker.__dict__, "log_path": str(log_path)}))
        started.append((worker, proc))
    for worker, proc in started:
        ready = lambda name=worker.name: name in online(pool)  # noqa: E731
        wait_until_ready(proc, ready, name=worker.name, log_path=worker.log_path, timeout=timeout)
    return workers(stack)


def kill(pid: int) -> None:
    """SIGKILL `pid` and every process below it: no handler runs, as when its machine dies."""
    tree = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for each in [pid, *map(int, tree)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def stop(stack: LocalStack, timeout: float = 15) -> list[str]:
    """Stop every Prefect worker this stack started (SIGTERM to its session, SIGKILL after `timeout`)."""
    found = workers(stack)
    for worker in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(pid_alive(w.pid) for w in found) and time.monotonic() < deadline:
        time.sleep(0.1)
    for worker in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)
        _pidfile(stack, worker.index).unlink(missing_ok=True)
    return [worker.name for worker in found]


@dataclass
class DaskCluster:
    address: str
    workers: list[subprocess.Popen]


@contextlib.contextmanager
def dask_cluster(
    count: int, log_dir: Path, *, cores: list[int] | None = None, env: dict | None = None, timeout: float = 60
) -> Iterator[DaskCluster]:
    """`dask scheduler` and `count` `dask worker`s (one thread each, no nanny: a killed worker stays
    dead), worker n pinned to `cores[n]` when given; they get this environment (PREFECT_API_URL,
    the S3 and MLflow endpoints) with `env` on top. Everything is stopped at the end."""
    from distributed import Client

    address = f"tcp://{HOST}:{free_port()}"
    child_env = _child_env(env)
    dask = str(Path(sys.executable).with_name("dask"))  # the CLI installed beside this Python
    port = address.rsplit(":", 1)[1]
    cmd = [dask, "scheduler", "--host", HOST, "--port", port, "--dashboard-address", ":0"]
    procs = [spawn(cmd, log_dir / "dask-scheduler.log", env=child_env)]
    try:
        for n in range(count):
            cmd = [dask, "worker", address, "--nthreads", "1", "--no-nanny", "--name", f"dask-worker-{n + 1}"]
            cmd = ["taskset", "-c", str(cores[n]), *cmd] if cores else cmd
            procs.append(spawn(cmd, log_dir / f"dask-worker-{n + 1}.log", env=child_env))
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(count, timeout=timeout)
        yield DaskCluster(address, procs[1:])
    finally:
        for proc in reversed(procs):
            stop_process(proc, timeout=5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workbench.workers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("start", help="N Prefect workers on the pool").add_argument("count", type=int, nargs="?", default=2)
    sub.add_parser("stop", help="stop every worker of this stack")
    sub.add_parser("status", help="list the workers")
    args = parser.parse_args(argv)
    activate_if_running(announce=False)  # the stack's endpoints, unless the environment names others
    stack = LocalStack.from_settings(quiet=True)
    try:
        if args.command == "start":
            for worker in start(args.count, stack=stack):
                print(f"{worker.name} (pid {worker.pid}) polls pool {worker.pool}; log {worker.log_path}")
        elif args.command == "stop":
            for name in stop(stack):
                print(f"{name} stopped")
        else:
            for worker in workers(stack):
                print(f"{worker.name} pid {worker.pid} pool {worker.pool} log {worker.log_path}")
    except (ProcessFailed, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
