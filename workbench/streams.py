"""Putting rides on the input stream and reading what the function wrote (predictions, dead letters)."""

from __future__ import annotations

import json
import logging
import time

from ride_duration.aws import s3_client, split_s3_uri
from ride_duration.config import get_settings

log = logging.getLogger(__name__)


def put_ride(client, stream_name: str, ride: dict, ride_id) -> str:
    """Put one ride event on the input stream (what `aws kinesis put-record` does); returns its sequence number."""
    data = json.dumps({"ride": ride, "ride_id": ride_id})
    response = client.put_record(StreamName=stream_name, Data=data, PartitionKey=str(ride_id))
    return response["SequenceNumber"]


def read_stream(
    client,
    stream_name: str,
    position: str = "TRIM_HORIZON",
    after: dict | None = None,
    wait: float = 0.0,
    limit: int = 1000,
) -> list[dict]:
    """The records on a stream, decoded from JSON (undecodable ones as {'raw': ...}).

    `position`: TRIM_HORIZON (every retained record) or LATEST (only records that
    arrive after the iterators are taken; `wait` seconds are given for them to come).
    `after`: {shard_id: sequence_number} to start after, e.g. positions recorded
    with `stream_positions` before putting.
    """
    iterators = []
    for shard in client.list_shards(StreamName=stream_name)["Shards"]:
        shard_id = shard["ShardId"]
        kwargs = {"ShardIteratorType": position}
        if after and after.get(shard_id):
            kwargs = {"ShardIteratorType": "AFTER_SEQUENCE_NUMBER", "StartingSequenceNumber": after[shard_id]}
        iterators.append(client.get_shard_iterator(StreamName=stream_name, ShardId=shard_id, **kwargs)["ShardIterator"])
    if wait:
        time.sleep(wait)
    out = []
    for iterator in iterators:
        while iterator:
            response = client.get_records(ShardIterator=iterator, Limit=limit)
            for record in response["Records"]:
                try:
                    out.append(json.loads(record["Data"]))
                except ValueError:
                    out.append({"raw": record["Data"].decode("utf-8", "replace")})
            if not response["Records"] and not response.get("MillisBehindLatest"):
                break
            iterator = response.get("NextShardIterator")
    return out


def stream_positions(client, stream_name: str) -> dict:
    """{shard_id: last sequence number on it now} (None for an empty shard); read after these later."""
    positions = {}
    for shard in client.list_shards(StreamName=stream_name)["Shards"]:
        positions[shard["ShardId"]] = None
        iterator = client.get_shard_iterator(
            StreamName=stream_name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        while iterator:
            response = client.get_records(ShardIterator=iterator, Limit=10000)
            if response["Records"]:
                positions[shard["ShardId"]] = response["Records"][-1]["SequenceNumber"]
            elif not response.get("MillisBehindLatest"):
                break
            iterator = response.get("NextShardIterator")
    return positions


def read_dead_letters(uri: str, client=None) -> list[dict]:
    """The dead letters under an `s3://bucket/prefix/` (e.g. `Settings.dead_letter_prefix`), in key order
    (shard, then sequence number); each with its `uri`."""
    client = client or s3_client(get_settings())
    bucket, prefix = split_s3_uri(uri)
    letters = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = json.loads(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
            letters.append({"uri": f"s3://{bucket}/{obj['Key']}", **body})
    return letters
