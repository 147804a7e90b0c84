#!/usr/bin/env python
"""Put one ride event on the input stream, like `aws kinesis put-record`.

    python scripts/put_ride_event.py --ride-id 256 --pu 130 --do 205 --distance 3.66
    python scripts/put_ride_event.py --data '{"ride": {...}, "ride_id": 256}'

AWS CLI v2 equivalent (v2 expects base64 unless told the blob is raw text):
    aws kinesis put-record --stream-name ride_events --partition-key 1 \
        --cli-binary-format raw-in-base64-out \
        --data '{"ride": {"PULocationID": 130, "DOLocationID": 205, "trip_distance": 3.66}, "ride_id": 256}'
"""

import argparse
import json
import sys

from botocore.exceptions import BotoCoreError, ClientError

from ride_duration.aws import kinesis_client
from ride_duration.config import get_settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", help="default: INPUT_STREAM_NAME or ride_events")
    parser.add_argument("--ride-id", default="256")
    parser.add_argument("--pu", type=int, default=130, help="PULocationID")
    parser.add_argument("--do", type=int, default=205, help="DOLocationID")
    parser.add_argument("--distance", type=float, default=3.66, help="trip_distance in miles")
    parser.add_argument("--data", help="the whole JSON payload, sent as is (overrides the other fields)")
    args = parser.parse_args(argv)
    stream = args.stream or get_settings().input_stream
    if args.data is not None:
        try:
            json.loads(args.data)
        except ValueError as exc:
            print(f"error: --data is not JSON: {exc}", file=sys.stderr)
            return 1
        data, key = args.data, args.ride_id
    else:
        ride_id = int(args.ride_id) if args.ride_id.isdigit() else args.ride_id
        ride = {"PULocationID": args.pu, "DOLocationID": args.do, "trip_distance": args.distance}
        data, key = json.dumps({"ride": ride, "ride_id": ride_id}), str(ride_id)
    try:
        response = kinesis_client(get_settings()).put_record(StreamName=stream, Data=data, PartitionKey=key)
    except (BotoCoreError, ClientError) as exc:
        print(f"error: could not put the record on stream {stream!r}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"ShardId": response["ShardId"], "SequenceNumber": response["SequenceNumber"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
