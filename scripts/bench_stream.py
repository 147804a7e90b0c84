#!/usr/bin/env python
"""`make bench-stream`: a 100-record Kinesis batch through the project's handler
(one predict, one put_records) vs the 2022 design (predict + put_record per
record), both writing to the same local Kinesis; plus the cold start.

Needs the local stack with the model registered (`make services-up train`).
"""

from __future__ import annotations

import argparse
import sys
import uuid

from ride_duration.stack import LocalStack


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    stack = LocalStack.from_settings(quiet=True)
    stack.up(("s3", "mlflow"))
    stack.activate()

    from ride_duration.aws import kinesis_client
    from ride_duration.registry import ModelNotFound, load_model, production_model_s3
    from ride_duration.stream import compare_designs, measure_cold_start, synthetic_event

    try:
        model, version = load_model()
        s3_uri = production_model_s3()["uri"]
    except ModelNotFound as exc:
        print(f"error: {exc}. Train and promote a model first: make train", file=sys.stderr)
        return 1
    client = kinesis_client()
    streams = [f"bench-{name}-{uuid.uuid4().hex[:6]}" for name in ("batch", "loop")]
    for name in streams:
        client.create_stream(StreamName=name, ShardCount=1)
        client.get_waiter("stream_exists").wait(StreamName=name, WaiterConfig={"Delay": 0.2})
    try:
        result = compare_designs(model, version, client, *streams, synthetic_event(args.records), args.repeats)
    finally:
        for name in streams:
            client.delete_stream(StreamName=name)
    cold = measure_cold_start(s3_uri)

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
    print(
        f"cold start (new interpreter): import {cold['import']:.2f} s + model load from local S3 "
        f"{cold['load']:.2f} s = {cold['import'] + cold['load']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
