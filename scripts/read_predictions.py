"""Read the prediction events from the predictions stream and print them, one JSON per line.

    python scripts/read_predictions.py                  # everything retained (TRIM_HORIZON)
    python scripts/read_predictions.py --position LATEST --wait 10

AWS CLI v2 equivalent (the Data field comes back base64-encoded):
    SHARD_ITERATOR=$(aws kinesis get-shard-iterator --stream-name ride_predictions \
        --shard-id shardId-000000000000 --shard-iterator-type TRIM_HORIZON --query ShardIterator --output text)
    aws kinesis get-records --shard-iterator "$SHARD_ITERATOR" --query 'Records[].Data' --output text \
        | tr '\t' '\n' | while read -r d; do echo "$d" | base64 -d; echo; done
"""

import argparse
import json
import sys

from botocore.exceptions import BotoCoreError, ClientError

from ride_duration.aws import kinesis_client
from ride_duration.config import get_settings
from ride_duration.stream import read_stream


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", help="default: PREDICTIONS_STREAM_NAME or ride_predictions")
    parser.add_argument("--position", choices=["TRIM_HORIZON", "LATEST"], default="TRIM_HORIZON")
    parser.add_argument("--wait", type=float, default=0, help="with LATEST: seconds to collect new records")
    args = parser.parse_args(argv)
    stream = args.stream or get_settings().predictions_stream
    client = kinesis_client()
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
