"""Local Prefect workers for the batch work pool: each one is what a machine would run.

    python -m workbench.workers start 2      # make workers N=2
    python -m workbench.workers start 2 --kind process
    python -m workbench.workers status
    python -m workbench.workers stop         # make services-down runs it first

Two kinds serve the same process pool, one month at a time each:
- `warm` (default): `python -m ride_duration.batch worker`, which runs each month it takes
  inside its own long-lived process, Prefect and the model kept loaded (`ride_duration.batch.worker`);
- `process`: Prefect's own `prefect worker start --type process`, a new process per month.
On other machines the same commands run with PREFECT_API_URL and the S3/MLflow endpoints
set; here the workers run in the background, in sessions of their own, with pid files in
`.local/run/worker-<n>.json` and logs in `.local/logs/worker-<n>.log`, where the lines
"Worker 'local-worker-1' submitting flow run '<id>'" say which worker took which month.
`kill(n)` ends a worker and its month at once with SIGKILL, as when a machine dies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import requests

from ride_duration.batch import WORK_POOL
from ride_duration.config import repo_root

from .process import ProcessFailed, log_tail, spawn
from .stack import MARKER, LocalStack, activate_if_running, pid_alive

# Plain log files: INFO says which worker took which month, no terminal colour codes, and each
# month's lines as they happen (a month's process writes to the worker through a pipe, which
# Python would otherwise fill in 8 KB blocks).
WORKER_ENV = {
    "PREFECT_LOGGING_LEVEL": "INFO",
    "PREFECT_LOGGING_COLORS": "false",
    "PYTHONUNBUFFERED": "1",
}
SUBMITTED = re.compile(r"^(\S+) \|.*Worker '([^']+)' submitting flow run '([0-9a-f-]{36})'")
# Two workers may reach for the same run; the server lets one have it and the other says so.
ABORTED = re.compile(r"Aborted submission of flow run '([0-9a-f-]{36})'")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # in logs written before colours were turned off


@dataclass(frozen=True)
class Worker:
    index: int
    name: str
    pid: int
    pool: str
    log_path: Path
    cpu: int | None = None
    kind: str = "process"  # pid files written before there were two kinds

    @property
    def alive(self) -> bool:
        return pid_alive(self.pid)


def _pidfile(stack: LocalStack, index: int) -> Path:
    return stack.run_dir / f"worker-{index}.json"


def _log(stack: LocalStack, index: int) -> Path:
    return stack.local_dir / "logs" / f"worker-{index}.log"


def workers(stack: LocalStack) -> list[Worker]:
    """The workers this stack's folder started whose process still runs (stale pid files removed)."""
    found = []
    for path in sorted(stack.run_dir.glob("worker-*.json")):
        try:
            info = json.loads(path.read_text())
            worker = Worker(**{**info, "log_path": Path(info["log_path"])})
        except (OSError, ValueError, TypeError, KeyError):
            path.unlink(missing_ok=True)
            continue
        if worker.alive:
            found.append(worker)
        else:
            path.unlink(missing_ok=True)
    return sorted(found, key=lambda w: w.index)


def online(pool: str, api_url: str | None = None) -> dict[str, str]:
    """Worker name -> last heartbeat time (ISO), of the workers the server lists as ONLINE in `pool`."""
    api_url = (api_url or os.environ["PREFECT_API_URL"]).rstrip("/")
    response = requests.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=10)
    if response.status_code == 404:  # no such pool yet: the first worker creates it
        return {}
    response.raise_for_status()
    return {w["name"]: w["last_heartbeat_time"] for w in response.json() if w.get("status") == "ONLINE"}


def start(
    count: int,
    *,
    stack: LocalStack,
    pool: str | None = None,
    pin: bool = False,
    kind: str = "warm",
    env: dict | None = None,
    timeout: float = 90,
) -> list[Worker]:
    """Make `count` workers run (`local-worker-1`..`count`): start the missing ones and wait
    until the server has a heartbeat from each. `pin`: worker n runs on core (n-1) mod cores only
    (its months' processes inherit that), to measure scaling one core per worker.

    The workers get this process's environment (PREFECT_API_URL, the S3 and MLflow endpoints,
    BATCH_INPUT_PREFIX...) with `env` on top."""
    pool = pool or WORK_POOL
    api_url = (env or {}).get("PREFECT_API_URL") or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ProcessFailed("PREFECT_API_URL is not set: start the stack (`make services-up`) or point it at a server")
    running = {w.index for w in workers(stack)}
    # Not the stack's marker: `stack up` stops marked processes it has no pid file for.
    # Prefect's worker finds runs only by polling, every 10 s by default; the local server answers
    # a poll a second easily, so a month waits ~0.5 s for a free worker, not ~5 s. The warm worker
    # is told by the server's events and keeps the default as its fallback.
    poll = {"PREFECT_WORKER_QUERY_SECONDS": "1"} if kind == "process" else {}
    child_env = {k: v for k, v in {**os.environ, **WORKER_ENV, **poll, **(env or {})}.items() if k != MARKER}
    started = []
    cores = sorted(os.sched_getaffinity(0))
    for index in range(1, count + 1):
        if index in running:
            continue
        name = f"local-worker-{index}"
        if kind == "warm":
            cmd = [sys.executable, "-m", "ride_duration.batch", "worker", "--pool", pool, "--name", name]
        elif kind == "process":
            cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
            cmd += ["--limit", "1", "--name", name]
        else:
            raise ValueError(f"unknown worker kind {kind!r}: 'warm' or 'process'")
        log_path = _log(stack, index)
        proc = spawn(cmd, log_path, env=child_env, cwd=repo_root() or stack.local_dir.parent)
        cpu = cores[(index - 1) % len(cores)] if pin else None
        if cpu is not None:
            # Before the worker starts any month: the processes it starts inherit the affinity.
            os.sched_setaffinity(proc.pid, {cpu})
        worker = Worker(index, name, proc.pid, pool, log_path, cpu, kind)
        stack.run_dir.mkdir(parents=True, exist_ok=True)
        _pidfile(stack, index).write_text(json.dumps({**worker.__dict__, "log_path": str(log_path)}))
        started.append((worker, proc, time.time()))
    deadline = time.monotonic() + timeout
    for worker, proc, since in started:
        while True:
            if proc.poll() is not None:
                _pidfile(stack, worker.index).unlink(missing_ok=True)
                raise ProcessFailed(
                    f"{worker.name} exited with code {proc.returncode} while starting "
                    f"(log {worker.log_path}):\n{log_tail(worker.log_path)}"
                )
            beat = online(pool, api_url).get(worker.name)
            if beat and _epoch(beat) >= since - 1:  # a heartbeat from this process, not a previous one's
                break
            if time.monotonic() > deadline:
                stop(stack)
                raise ProcessFailed(f"{worker.name} sent no heartbeat within {timeout:.0f} s (log {worker.log_path})")
            time.sleep(0.3)
    return workers(stack)


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (Linux /proc): a worker runs each month in a child
    process of its own session, which a signal to the worker's group would miss."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _running(stack: LocalStack, index: int) -> Worker:
    worker = next((w for w in workers(stack) if w.index == index), None)
    if worker is None:
        raise ProcessFailed(f"worker {index} is not running")
    return worker


def kill(stack: LocalStack, index: int) -> list[int]:
    """SIGKILL worker `index` and the month it is running, at once: no handler runs, nothing
    is reported to the server, as when its machine dies. Returns the pids killed."""
    worker = _running(stack, index)
    tree = descendants(worker.pid)
    _signal(tree, signal.SIGSTOP)  # frozen first: no new child appears while the tree is killed
    _signal(descendants(worker.pid), signal.SIGKILL)
    _signal(tree, signal.SIGKILL)
    _wait_gone(tree, 10)
    _pidfile(stack, index).unlink(missing_ok=True)
    return tree


@contextlib.contextmanager
def paused(stack: LocalStack, index: int) -> Iterator[Worker]:
    """Worker `index` frozen (SIGSTOP, its whole tree) inside the block, as a machine that
    hangs: it takes no run; it goes on where it was when the block ends."""
    worker = _running(stack, index)
    tree = descendants(worker.pid)
    _signal(tree, signal.SIGSTOP)
    try:
        yield worker
    finally:
        _signal(tree, signal.SIGCONT)


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        for pid in pids:  # reap the ones this process started, or they stay zombies
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)
    return True


def stop(stack: LocalStack, timeout: float = 15) -> list[str]:
    """Stop every worker of this stack and the months they run (SIGTERM, SIGKILL after
    `timeout`); an interrupted month is reported crashed by its process. Returns their names."""
    found = workers(stack)
    trees = [pid for worker in found for pid in descendants(worker.pid)]
    # The `prefect worker start` process passes the signal on to its worker process (1 s);
    # signalling every process of the tree at once makes them wait on each other instead.
    _signal([worker.pid for worker in found], signal.SIGTERM)
    _wait_gone([worker.pid for worker in found], timeout)
    left = [pid for pid in trees if pid_alive(pid)]
    _signal(left, signal.SIGTERM)
    if not _wait_gone(left, 5):
        _signal(left, signal.SIGKILL)
        _wait_gone(left, 5)
    for worker in found:
        _pidfile(stack, worker.index).unlink(missing_ok=True)
    return [worker.name for worker in found]


def log_sizes(stack: LocalStack) -> dict[str, int]:
    """Each worker log's size now: `wait_for_line(..., since=...)` then reads only what follows."""
    return {str(path): path.stat().st_size for path in (stack.local_dir / "logs").glob("worker-*.log")}


def wait_for_line(stack: LocalStack, text: str, *, since: dict[str, int] | None = None, timeout: float = 120) -> Worker:
    """The running worker whose log gets a line containing `text` (after `since`, from `log_sizes`)."""
    since = since or {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers(stack):
            with open(worker.log_path, "rb") as log:
                log.seek(since.get(str(worker.log_path), 0))
                if text in log.read().decode(errors="replace"):
                    return worker
        time.sleep(0.05)
    raise ProcessFailed(f"no worker logged {text!r} within {timeout:.0f} s")


def runs_taken(stack: LocalStack) -> dict[str, list[str]]:
    """Flow run id -> the workers that took it, in the order they did (from the workers' logs,
    whose lines start with the time; a month whose worker died is taken again by another)."""
    taken = []
    for path in sorted((stack.local_dir / "logs").glob("worker-*.log")):
        for line in COLOUR.sub("", path.read_text(errors="replace")).splitlines():
            if submitted := SUBMITTED.match(line):
                taken.append(submitted.groups())
            elif aborted := ABORTED.search(line):
                last = max((i for i, (_, _, run) in enumerate(taken) if run == aborted[1]), default=None)
                if last is not None:
                    del taken[last]
    runs: dict[str, list[str]] = {}
    for _, name, run_id in sorted(taken):
        runs.setdefault(run_id, []).append(name)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workbench.workers", description="Local Prefect workers for the batch work pool."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    start_cmd = sub.add_parser("start", help="make N workers run on the stack's Prefect server")
    start_cmd.add_argument("count", type=int, nargs="?", default=2)
    start_cmd.add_argument("--pin", action="store_true", help="worker n on one core only")
    start_cmd.add_argument(
        "--kind",
        choices=["warm", "process"],
        default="warm",
        help="warm: months in the worker's own process (default); process: Prefect's, a new process per month",
    )
    start_cmd.add_argument("--pool", help="work pool (default: the batch deployment's)")
    sub.add_parser("stop", help="stop every worker of this stack")
    sub.add_parser("status", help="list the workers")
    kill_cmd = sub.add_parser("kill", help="SIGKILL worker N and its month (a machine dies)")
    kill_cmd.add_argument("index", type=int)
    args = parser.parse_args(argv)
    activate_if_running(announce=False)  # the stack's endpoints, unless the environment names others
    stack = LocalStack.from_settings(quiet=True)
    try:
        if args.command == "start":
            for worker in start(args.count, stack=stack, pool=args.pool, pin=args.pin, kind=args.kind):
                pinned = f", core {worker.cpu}" if worker.cpu is not None else ""
                print(
                    f"{worker.name} ({worker.kind}, pid {worker.pid}{pinned}) polls pool {worker.pool}; "
                    f"log {worker.log_path}"
                )
        elif args.command == "stop":
            for name in stop(stack):
                print(f"{name} stopped")
        elif args.command == "kill":
            print(f"killed {', '.join(map(str, kill(stack, args.index)))}")
        else:
            for worker in workers(stack):
                print(f"{worker.name} ({worker.kind}) pid {worker.pid} pool {worker.pool} log {worker.log_path}")
    except (ProcessFailed, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
