"""Helpers shared by the streaming tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from workbench.process import Server

PYTHON = sys.executable


def ride_payload(i: int, poisoned: bool = False) -> dict:
    """Deterministic test rides; a poisoned one has a string distance."""
    ride = {"PULocationID": 100 + i % 50, "DOLocationID": 200 + i % 30, "trip_distance": round(0.5 + (i % 20) * 0.7, 2)}
    if poisoned:
        ride["trip_distance"] = "far"
    return {"ride": ride, "ride_id": f"ride-{i}"}


def put_payloads(kinesis, stream: str, payloads: list) -> list[str]:
    """Put raw payloads (dicts as JSON, bytes as is); returns their sequence numbers."""
    seqs = []
    for i, payload in enumerate(payloads):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        response = kinesis.put_record(StreamName=stream, Data=data, PartitionKey=str(i))
        seqs.append(response["SequenceNumber"])
    return seqs


def stop(proc) -> None:
    """Stop a subprocess.Popen, or a workbench Server (e.g. the invoke endpoint)."""
    if isinstance(proc, Server):
        proc.stop(10)
        return
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def python_env(**extra) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    return env
