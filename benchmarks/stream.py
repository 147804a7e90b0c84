"""The stream function against the 2022 design, and its cold start against its floor."""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from ride_duration.aws import kinesis_client, s3_client, split_s3_uri
from ride_duration.config import get_settings
from ride_duration.fastmodel import FILES
from ride_duration.features import prepare_features
from ride_duration.predict import SERVING_DIR
from ride_duration.registry import ModelNotFound, load_model, production_model_s3
from ride_duration.stream import KinesisWriter, ModelService
from ride_duration.stream.codec import _records, decode_record, prediction_event
from ride_duration.tlc import synthetic_month
from workbench.event_source import kinesis_event
from workbench.stack import LocalStack

from . import figures

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = 100  # the event source mapping's default BatchSize for Kinesis


class ConstantModel:
    """The course's first Lambda: every ride takes 10 minutes. Shows the plumbing without a model."""

    def __init__(self, minutes: float = 10.0):
        self.minutes = minutes

    def predict(self, features):
        return np.full(len(features), self.minutes)


def constant_handler(event, context=None) -> dict:
    """The 2022 course's first handler (constant 10 minutes), without writing anywhere."""
    return ModelService(ConstantModel(10.0), version="constant").lambda_handler(event, context)


def per_record_handler(event, model, version, client, stream_name: str) -> dict:
    """The 2022 design, kept to measure against: one predict and one put_record per record."""
    events = []
    for record in _records(event):
        ride_id, ride, _ = decode_record(record)
        duration = float(model.predict(prepare_features(ride))[0])
        out = prediction_event(ride_id, duration, version)
        client.put_record(StreamName=stream_name, Data=json.dumps(out), PartitionKey=str(ride_id))
        events.append(out)
    return {"predictions": events}


class _CountingClient:
    """Wraps a boto3 Kinesis client and counts the write calls (put_record / put_records)."""

    def __init__(self, client):
        self._client = client
        self.writes = 0

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name in ("put_record", "put_records"):

            def counted(*args, **kwargs):
                self.writes += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def synthetic_event(n: int = MAX_BATCH_SIZE, seed: int = 42) -> dict:
    """A Lambda Kinesis event of `n` realistic rides (from the synthetic TLC month)."""
    rides = synthetic_month(2021, 2, n_rows=n, seed=seed)
    payloads = [
        {
            "ride": {
                "PULocationID": int(r.PULocationID),
                "DOLocationID": int(r.DOLocationID),
                "trip_distance": float(r.trip_distance),
            },
            "ride_id": i,
        }
        for i, r in enumerate(rides.itertuples(index=False))
    ]
    return kinesis_event(payloads)


def compare_designs(model, version, client, out_batch: str, out_loop: str, event: dict, repeats: int = 5) -> dict:
    """The project's handler vs the 2022 per-record loop on the same event, alternating, median times."""
    times = {"batch": [], "per_record": []}
    writes = {}
    for _ in range(repeats):
        counting = _CountingClient(client)
        service = ModelService(model, version, [KinesisWriter(out_batch, counting)])
        start = time.perf_counter()
        batch = service.lambda_handler(event)
        times["batch"].append(time.perf_counter() - start)
        writes["batch"] = counting.writes
        counting = _CountingClient(client)
        start = time.perf_counter()
        loop = per_record_handler(event, model, version, counting, out_loop)
        times["per_record"].append(time.perf_counter() - start)
        writes["per_record"] = counting.writes
    same = np.allclose(
        [p["prediction"]["ride_duration"] for p in batch["predictions"]],
        [p["prediction"]["ride_duration"] for p in loop["predictions"]],
    )
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "records": len(event["Records"]),
        "seconds": median,
        "writes": writes,
        "same_predictions": bool(same),
        "speedup": median["per_record"] / median["batch"],
    }


# The course's captured AWS event (scripts/test_docker.py), answered by a new interpreter.
_COLD_START = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("course_event", {event_script!r})
course = importlib.util.module_from_spec(spec); spec.loader.exec_module(course)
t0 = time.perf_counter()
from ride_duration.stream import lambda_handler
t1 = time.perf_counter()
response = lambda_handler(course.event, None)
t2 = time.perf_counter()
heavy = sorted(m for m in ("sklearn", "skops", "mlflow", "pandas") if m in sys.modules)
print(json.dumps({{"import": t1 - t0, "first_invocation": t2 - t1, "predictions": response["predictions"],
                  "heavy_modules": heavy}}))
"""

# The floor: what any Python Lambda on this model pays. A new interpreter imports boto3 and
# numpy and downloads the same objects the handler downloads, from the same S3.
_FLOOR = """
import sys
import boto3, numpy
client = boto3.client("s3", endpoint_url={endpoint!r}, region_name={region!r})
for key in {keys!r}:
    client.get_object(Bucket={bucket!r}, Key=key)["Body"].read()
"""


def _wall(code: str, env: dict) -> tuple[float, str]:
    """Seconds for a new interpreter to run `code`, start to exit (what a container pays), and its output."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"the cold-start interpreter failed:\n{out.stderr[-2000:]}")
    return seconds, out.stdout


def measure_cold_start(model_s3: dict, settings, repeats: int = 5) -> dict:
    """Cold start vs floor, medians of `repeats`, alternated so both see the same machine.

    `model_s3`: `registry.production_model_s3()` (MODEL_ID, EXPERIMENT_ID, uri). The handler is
    configured as on AWS (MODEL_ID + EXPERIMENT_ID, no tracking server, TEST_RUN: no writes)."""
    bucket, prefix = split_s3_uri(model_s3["uri"].rstrip("/"))
    keys = [f"{prefix}/MLmodel", *(f"{prefix}/{SERVING_DIR}/{name}" for name in FILES)]
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or settings.mlflow_s3_endpoint_url
    env = {
        **os.environ,
        "TEST_RUN": "True",
        "MODEL_ID": model_s3["MODEL_ID"],
        "EXPERIMENT_ID": model_s3["EXPERIMENT_ID"],
        "MODEL_URI": "",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # nothing listens: the handler must not need it
    }
    handler_code = _COLD_START.format(
        event_script=str(Path(__file__).resolve().parents[1] / "scripts" / "test_docker.py")
    )
    floor_code = _FLOOR.format(endpoint=endpoint, region=settings.aws_region, keys=keys, bucket=bucket)
    cold, floor, detail = [], [], {}
    for _ in range(repeats):
        seconds, out = _wall(handler_code, env)
        cold.append(seconds)
        detail = json.loads(out.strip().splitlines()[-1])
        floor.append(_wall(floor_code, env)[0])
    return {
        "cold_start": statistics.median(cold),
        "floor": statistics.median(floor),
        "ratio": statistics.median(cold) / statistics.median(floor),
        "import": detail["import"],
        "first_invocation": detail["first_invocation"],
        "prediction": detail["predictions"][0]["prediction"]["ride_duration"],
        "heavy_modules": detail["heavy_modules"],
        "downloaded_bytes": sum(
            s3_client(settings).head_object(Bucket=bucket, Key=key)["ContentLength"] for key in keys
        ),
    }


def main(argv=None) -> int:
    """`make bench-stream`: a 100-record Kinesis batch through the project's handler (one
    predict, one put_records) vs the 2022 design (predict + put_record per record), both writing
    to the same local Kinesis; then the cold start vs its floor. Needs `make services-up train`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=main.__doc__)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    stack = LocalStack.from_settings(quiet=True)
    stack.up(("s3", "kinesis", "mlflow"))
    stack.activate()
    settings = get_settings()
    try:
        model, version = load_model(settings=settings)
        model_s3 = production_model_s3(settings)
    except ModelNotFound as exc:
        print(f"error: {exc}. Train and promote a model first: make train", file=sys.stderr)
        return 1
    client = kinesis_client(settings)
    streams = [f"bench-{name}-{uuid.uuid4().hex[:6]}" for name in ("batch", "loop")]
    for name in streams:
        client.create_stream(StreamName=name, ShardCount=1)
        client.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.2})
    try:
        result = compare_designs(model, version, client, *streams, synthetic_event(args.records), args.repeats)
    finally:
        for name in streams:
            client.delete_stream(StreamName=name)
    sec, writes = result["seconds"], result["writes"]
    print(f"{result['records']}-record batch, median of {args.repeats}, local Kinesis (moto):\n")
    print("| design | output API calls | time per batch | ms per record |")
    print("|---|---:|---:|---:|")
    for label, key in (
        ("project: 1 predict + put_records", "batch"),
        ("2022: predict + put_record per record", "per_record"),
    ):
        print(f"| {label} | {writes[key]} | {sec[key] * 1000:.1f} ms | {sec[key] * 1000 / result['records']:.2f} |")
    print(
        f"\nspeed-up (2022 time / project time): {result['speedup']:.1f}x; "
        f"output calls {writes['per_record']} -> {writes['batch']}; same predictions: {result['same_predictions']}"
    )
    cold = measure_cold_start(model_s3, settings, repeats=args.repeats)
    print(f"\ncold start, new interpreters, medians of {args.repeats} (alternated), model from the local S3:\n")
    print("| | seconds |")
    print("|---|---:|")
    print(f"| handler: start, import, load the model, answer the course's event | {cold['cold_start']:.2f} |")
    print(
        f"| floor: start, import boto3 + numpy, download the same {cold['downloaded_bytes'] / 1e6:.1f} MB | {cold['floor']:.2f} |"
    )
    print(
        f"\nratio {cold['ratio']:.2f}x (target <= 2); the handler's import {cold['import']:.2f} s, first invocation "
        f"{cold['first_invocation']:.2f} s; example ride {cold['prediction']:.2f} min; "
        f"heavy modules imported: {', '.join(cold['heavy_modules']) or 'none'}"
    )
    path = figures.record(
        "stream",
        {
            "batch_records": result["records"],
            "repeats": args.repeats,
            "batch_ms": round(sec["batch"] * 1000, 1),
            "batch_2022_ms": round(sec["per_record"] * 1000, 1),
            "speedup_vs_2022": round(result["speedup"], 1),
            "output_calls": writes["batch"],
            "output_calls_2022": writes["per_record"],
            "same_predictions": bool(result["same_predictions"]),
            "cold_start_s": round(cold["cold_start"], 2),
            "cold_start_floor_s": round(cold["floor"], 2),
            "cold_start_over_floor": round(cold["ratio"], 2),
            "cold_start_over_floor_target": 2,
            "heavy_modules_imported": ", ".join(cold["heavy_modules"]) or "none",
        },
    )
    print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
