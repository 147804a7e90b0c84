#!/usr/bin/env python
"""Post the example ride to the web service and print the answer (the course's test.py).

python scripts/predict_client.py --host localhost:9696
"""

from __future__ import annotations

import argparse
import json
import sys

import requests

from ride_duration.features import EXAMPLE_RIDE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="localhost:9696", help="host:port of the service (default localhost:9696)")
    parser.add_argument(
        "--ride", type=json.loads, default=EXAMPLE_RIDE, help="a ride as JSON (default: the example ride)"
    )
    args = parser.parse_args(argv)
    url = f"http://{args.host}/predict"
    try:
        response = requests.post(url, json=args.ride, timeout=30)
    except requests.RequestException as exc:
        print(
            f"error: no answer from {url} ({exc.__class__.__name__}); is the service running? (make serve)",
            file=sys.stderr,
        )
        return 1
    try:
        answer = response.json()
    except ValueError:
        print(f"error: {url} answered {response.status_code} without JSON", file=sys.stderr)
        return 1
    if not response.ok:
        print(f"error: {url} answered {response.status_code}: {answer.get('error', answer)}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
