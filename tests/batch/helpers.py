"""S3 helpers for the batch tests."""

from __future__ import annotations


def object_exists(uri: str) -> bool:
    from botocore.exceptions import ClientError

    from ride_duration.aws import s3_client, split_s3_uri

    bucket, key = split_s3_uri(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    return True


def list_keys(bucket: str, prefix: str = "") -> list[str]:
    from ride_duration.aws import s3_client

    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
