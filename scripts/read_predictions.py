#!/usr/bin/env python
"""Read the prediction events from the predictions stream and print them, one JSON per line.

    python scripts/read_predictions.py                  # everything retained (TRIM_HORIZON)
    python scripts/read_predictions.py --position LATEST --wait 10
    python scripts/read_predictions.py --dead-letters   # the records the function could never score, and why

AWS CLI v2 equivalent (the Data field comes back base64-encoded):
    SHARD_ITERATOR=$(aws kinesis get-shard-iterator --stream-name ride_predictions \
        --shard-id shardId-000000000000 --shard-iterator-type TRIM_HORIZON --query ShardIterator --output text)
    aws kinesis get-records --shard-iterator "$SHARD_ITERATOR" --query 'Records[].Data' --output text \
        | tr '\t' '\n' | while read -r d; do echo "$d" | base64 -d; echo; done
    aws s3 ls --recursive s3://nyc-duration-prediction/dead-letter/ride_events/
"""

import argparse
import json
import sys

from botocore.exceptions import BotoCoreError, ClientError

from ride_duration.aws import kinesis_client
from ride_duration.config import get_settings
from workbench.streams import read_dead_letters, read_stream


def print_dead_letters(uri: str) -> int:
    try:
        letters = read_dead_letters(uri)
    except (BotoCoreError, ClientError) as exc:
        print(f"error: could not read the dead letters under {uri}: {exc}", file=sys.stderr)
        return 1
    for letter in letters:
        kinesis = letter.get("kinesis", {})
        print(
            json.dumps(
                {
                    "uri": letter["uri"],
                    "time": letter.get("time"),
                    "reason": letter.get("reason"),
                    "sequenceNumber": kinesis.get("sequenceNumber"),
                    "data": kinesis.get("data"),
                }
            )
        )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", help="default: PREDICTIONS_STREAM_NAME or ride_predictions")
    parser.add_argument("--position", choices=["TRIM_HORIZON", "LATEST"], default="TRIM_HORIZON")
    parser.add_argument("--wait", type=float, default=0, help="with LATEST: seconds to collect new records")
    parser.add_argument(
        "--dead-letters",
        nargs="?",
        const="",
        metavar="S3_URI",
        help="print the dead letters instead (default DEAD_LETTER_URI or "
        "s3://<PREDICTIONS_BUCKET>/dead-letter/<INPUT_STREAM_NAME>/); data stays base64",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.dead_letters is not None:
        return print_dead_letters(args.dead_letters or settings.dead_letter_prefix)
    stream = args.stream or settings.predictions_stream
    client = kinesis_client(get_settings())
    try:
        events = read_stream(client, stream, position=args.position, wait=args.wait)
    except (BotoCoreError, ClientError) as exc:
        print(f"error: could not read stream {stream!r}: {exc}", file=sys.stderr)
        return 1
    for event in events:
        print(json.dumps(event))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
