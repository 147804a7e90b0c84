"""The course's test_docker.py: post the canonical Kinesis event to the Lambda
invoke endpoint (the image's RIE on :8080, or `make invoke-server`) and print the response.

    docker run -it --rm -p 8080:8080 -e TEST_RUN=True ... stream-model-duration:v2
    python scripts/test_docker.py
"""

import argparse
import json
import sys

import requests

URL = "http://localhost:8080/2015-03-31/functions/function/invocations"

# The course's event: one record, ride 256 from zone 130 to 205, 3.66 miles (data is base64 JSON).
event = {
    "Records": [
        {
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": "1",
                "sequenceNumber": "49630081666084879290581185630324770398608704880802529282",
                "data": "ewogICAgICAgICJyaWRlIjogewogICAgICAgICAgICAiUFVMb2NhdGlvbklEIjogMTMwLAogICAgICAgICAgICAiRE9Mb2NhdGlvbklEIjogMjA1LAogICAgICAgICAgICAidHJpcF9kaXN0YW5jZSI6IDMuNjYKICAgICAgICB9LCAKICAgICAgICAicmlkZV9pZCI6IDI1NgogICAgfQ==",
                "approximateArrivalTimestamp": 1654161514.132,
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": "shardId-000000000000:49630081666084879290581185630324770398608704880802529282",
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": "arn:aws:iam::XXXXXXXXX:role/lambda-kinesis-role",
            "awsRegion": "eu-west-1",
            "eventSourceARN": "arn:aws:kinesis:eu-west-1:XXXXXXXXX:stream/ride_events",
        }
    ]
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Post the course's Kinesis event to a Lambda invoke endpoint.")
    parser.add_argument("--url", default=URL)
    args = parser.parse_args(argv)
    try:
        response = requests.post(args.url, json=event, timeout=60)
    except requests.ConnectionError:
        print(f"error: nothing answers at {args.url}; start `make invoke-server` or the image first", file=sys.stderr)
        return 1
    print(json.dumps(response.json(), indent=2))
    return 0 if response.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
