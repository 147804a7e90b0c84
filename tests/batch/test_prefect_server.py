"""The stack's Prefect server (workbench.prefect_server): its SQLite write transactions begin
IMMEDIATE, so concurrent writers queue for the lock instead of being refused (HTTP 503), and
it serves HTTP with uvloop and httptools."""

from __future__ import annotations

import concurrent.futures
import os
import uuid
from pathlib import Path

import pytest
import requests

# Prefect is imported by the tests, not at collection (see test_worker.py).


class _Connection:
    def __init__(self) -> None:
        self.statements: list[str] = []

    def exec_driver_sql(self, statement: str) -> None:
        self.statements.append(statement)


@pytest.mark.parametrize(
    ("mode", "emitted"), [(None, []), ("DEFERRED", ["BEGIN IMMEDIATE"]), ("IMMEDIATE", ["BEGIN IMMEDIATE"])]
)
def test_every_transaction_prefect_begins_takes_the_write_lock_first(mode, emitted):
    from prefect.server.database.configurations import SQLITE_BEGIN_MODE

    from workbench import prefect_server

    conn = _Connection()
    token = SQLITE_BEGIN_MODE.set(mode)
    try:
        prefect_server.begin_immediate(None, conn)
    finally:
        SQLITE_BEGIN_MODE.reset(token)
    assert conn.statements == emitted  # None: Prefect opened no transaction (a plain read)


def concurrent_writes(api: str, n: int = 160, threads: int = 8) -> list[int]:
    """Status codes of `n` read-then-write requests (new runs, label updates) sent from `threads`
    threads at once, without the retries Prefect's client would add."""
    flow = requests.post(f"{api}/flows/", json={"name": f"lock-test-{uuid.uuid4().hex[:8]}"}, timeout=30).json()
    runs = [requests.post(f"{api}/flow_runs/", json={"flow_id": flow["id"]}, timeout=30).json()["id"] for _ in range(4)]

    def write(i: int) -> int:
        if i % 2:
            labels = {f"n{i}": str(i)}
            return requests.patch(f"{api}/flow_runs/{runs[i % 4]}/labels", json=labels, timeout=90).status_code
        return requests.post(f"{api}/flow_runs/", json={"flow_id": flow["id"]}, timeout=90).status_code

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(write, range(n)))


@pytest.mark.integration
def test_concurrent_writers_are_never_refused(batch_stack):
    """On Prefect's stock SQLite setup some of these come back 503 ("database is locked");
    on the stack's server none."""
    codes = concurrent_writes(os.environ["PREFECT_API_URL"])
    assert set(codes) <= {200, 201, 204}, sorted(set(codes))


@pytest.mark.integration
def test_the_server_runs_on_uvloop_and_parses_http_with_httptools(batch_stack):
    """uvicorn falls back to asyncio's loop and the pure-Python h11 parser without complaint
    when these are missing; the stack installs them (its `stack` extra) for the CPU they save
    on the cores the workers share."""
    maps = Path(f"/proc/{batch_stack.pid('prefect')}/maps").read_text()
    assert "/uvloop/" in maps and "/httptools/" in maps
