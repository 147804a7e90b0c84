"""AWS clients, made once here.

boto3 already honours `AWS_ENDPOINT_URL` (and per-service `AWS_ENDPOINT_URL_S3`,
`AWS_ENDPOINT_URL_KINESIS`); we pass the endpoint explicitly anyway so that the
value read by `config` is the one used, and pandas/s3fs get the same endpoint.
With the variables unset, everything falls back to the user's AWS profile.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

from .config import Settings

# Imported inside functions, to keep them lazy: boto3 (only when a client is made).

# The local stack accepts any credentials; AWS never sees these.
LOCAL_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
}


def _client_kwargs(settings: Settings, service: str) -> dict:
    kwargs = {"region_name": settings.aws_region}
    specific = os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}")
    endpoint = specific or settings.aws_endpoint_url
    if endpoint:
        kwargs["endpoint_url"] = endpoint
    return kwargs


def client(service: str, settings: Settings):
    import boto3

    return boto3.session.Session().client(service, **_client_kwargs(settings, service))


def s3_client(settings: Settings):
    return client("s3", settings)


def kinesis_client(settings: Settings):
    return client("kinesis", settings)


def storage_options(path: str, settings: Settings) -> dict | None:
    """`storage_options` for pandas on an `s3://` path (None for other paths)."""
    if not str(path).startswith("s3://"):
        return None
    kwargs = _client_kwargs(settings, "s3")
    return {"client_kwargs": kwargs}


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")
