"""Fixtures for the streaming tests: the course's event, a stub model, and
Kinesis streams with unique names on the session's moto server."""

from __future__ import annotations

import copy
import importlib.util
import uuid
from pathlib import Path

import pytest

from ride_duration.config import get_settings

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def canonical_event() -> dict:
    """The course's test_docker.py event (ride 256: 130 -> 205, 3.66 miles)."""
    return copy.deepcopy(_load_script("test_docker").event)


class StubModel:
    """Only `.predict`: 1 minute per mile; counts calls so tests can check batching."""

    def __init__(self):
        self.calls = []

    def predict(self, features):
        self.calls.append(list(features))
        return [f["trip_distance"] for f in features]


@pytest.fixture
def stub_model() -> StubModel:
    return StubModel()


@pytest.fixture
def kinesis(stack):
    from ride_duration.aws import kinesis_client

    return kinesis_client(get_settings())


@pytest.fixture
def make_stream(kinesis):
    """Create streams with unique names (deleted afterwards), so tests do not see each other's records."""
    created = []

    def make(prefix: str = "test", shards: int = 1) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        kinesis.create_stream(StreamName=name, ShardCount=shards)
        kinesis.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.1, "MaxAttempts": 100})
        created.append(name)
        return name

    yield make
    for name in created:
        kinesis.delete_stream(StreamName=name, EnforceConsumerDeletion=True)


@pytest.fixture
def streams(make_stream, monkeypatch):
    """A fresh input and output stream; the handler writes to the output one, and its
    dead letters go under the default prefix of the input one."""
    names = {"input": make_stream("rides"), "output": make_stream("preds")}
    monkeypatch.setenv("INPUT_STREAM_NAME", names["input"])
    monkeypatch.setenv("PREDICTIONS_STREAM_NAME", names["output"])
    return names


@pytest.fixture
def s3(stack):
    from ride_duration.aws import s3_client

    return s3_client(get_settings())
