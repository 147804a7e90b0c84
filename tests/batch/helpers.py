"""S3 helpers and a polling wait for the batch tests."""

from __future__ import annotations

import time


def object_exists(uri: str) -> bool:
    from botocore.exceptions import ClientError

    from ride_duration.aws import s3_client, split_s3_uri
    from ride_duration.config import get_settings

    bucket, key = split_s3_uri(uri)
    try:
        s3_client(get_settings()).head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


def list_keys(bucket: str, prefix: str = "") -> list[str]:
    from ride_duration.aws import s3_client
    from ride_duration.config import get_settings

    pages = s3_client(get_settings()).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def month_with_bad_rows(source, target, bad: dict[int, dict]):
    """Copy the month `source` to `target` (parquet) with the rows `bad` ({row: {column: value}})
    changed; zone ids stay int64 columns with nulls (arrow), as a TLC file would have them."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pd.read_parquet(source)
    columns = {name: df[name].astype(object) for name in ("PULocationID", "DOLocationID", "trip_distance")}
    for row, changes in bad.items():
        for name, value in changes.items():
            columns[name].iloc[row] = value
    table = pa.Table.from_pandas(df, preserve_index=False)
    for name, values in columns.items():
        kind = pa.float64() if name == "trip_distance" else pa.int64()
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values.tolist(), type=kind))
    pq.write_table(table, target)
    return target


def rides_of_1_to_60_minutes(path) -> list[int]:
    """Row numbers (in the file) of the rides the duration filter keeps."""
    import pandas as pd

    df = pd.read_parquet(path, columns=["lpep_pickup_datetime", "lpep_dropoff_datetime"])
    minutes = (df["lpep_dropoff_datetime"] - df["lpep_pickup_datetime"]).dt.total_seconds() / 60
    return [int(i) for i in df.index[(minutes >= 1) & (minutes <= 60)]]


def wait_for(condition, timeout: float, what: str, every: float = 0.05):
    """`condition()`'s first true value, polled every `every` s; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)
    return value
