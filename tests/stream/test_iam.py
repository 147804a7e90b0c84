"""The streaming function's IAM policies (docker/streaming/iam/): valid, least privilege,
and granting every call the function and its event source make (recorded against the
local stack) on the resources they make it on. Issue 11, item 10."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from fnmatch import fnmatchcase

from ride_duration import config
from ride_duration.registry import s3_model_uri
from ride_duration.stream import Checkpoint, EventSourceRunner, KinesisWriter, ModelService, S3DeadLetters

from .conftest import REPO
from .helpers import put_payloads, ride_payload

IAM = REPO / "docker" / "streaming" / "iam"
FUNCTION_LOG_GROUP = "arn:aws:logs:REGION:ACCOUNT_ID:log-group:/aws/lambda/ride-duration-prediction:*"


def policies() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(IAM.glob("*.json"))}


def statements(names=None) -> list[dict]:
    out = []
    for name, policy in policies().items():
        if name != "lambda-trust-policy.json" and (names is None or name in names):
            out += policy["Statement"]
    return out


def _list(value) -> list:
    return value if isinstance(value, list) else [value]


def allowed(action: str, resource: str, prefix: str | None = None) -> bool:
    """Whether an Allow statement grants `action` on `resource` (`prefix`: the s3:prefix of a ListBucket)."""
    for statement in statements():
        if statement["Effect"] != "Allow":
            continue
        if not any(fnmatchcase(action, a) for a in _list(statement["Action"])):
            continue
        if not any(fnmatchcase(resource, r) for r in _list(statement["Resource"])):
            continue
        condition = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if condition is not None and (prefix is None or not any(fnmatchcase(prefix, c) for c in _list(condition))):
            continue
        return True
    return False


def test_policies_are_valid_and_least_privilege():
    found = policies()
    assert "dead-letter-write.json" in found
    for name, policy in found.items():
        assert policy["Version"] == "2012-10-17", name
        for statement in policy["Statement"]:
            assert statement["Effect"] == "Allow", name
            if name != "lambda-trust-policy.json":
                assert "*" not in _list(statement["Resource"]), (name, statement)
    actions = {a for statement in statements() for a in _list(statement["Action"])}
    assert "kinesis:ListStreams" not in actions  # the event source needs the one stream only
    assert "kinesis:SubscribeToShard" not in actions  # enhanced fan-out: not used
    assert not any(a.endswith("*") for a in actions)


def test_model_read_is_limited_to_the_models_prefix():
    bucket = config.MLFLOW_BUCKET
    model = s3_model_uri(bucket, "1", "m-0123456789abcdef").removeprefix(f"s3://{bucket}/")
    assert allowed("s3:GetObject", f"arn:aws:s3:::{bucket}/{model}/MLmodel")
    assert allowed("s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix=f"{model}/")
    for outside in ("1/0a1b2c/artifacts/metrics.json", "mlflow.db", "1/meta.yaml"):
        assert not allowed("s3:GetObject", f"arn:aws:s3:::{bucket}/{outside}"), outside
    assert not allowed("s3:ListBucket", f"arn:aws:s3:::{bucket}", prefix="")
    assert not allowed("s3:GetObject", f"arn:aws:s3:::{config.PREDICTIONS_BUCKET}/dead-letter/ride_events/x.json")


def test_logs_only_in_the_functions_own_log_group():
    for action in ("logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"):
        grants = [s for s in statements() if action in _list(s["Action"])]
        assert grants and all(_list(s["Resource"]) == [FUNCTION_LOG_GROUP] for s in grants), action
    assert not allowed("logs:CreateLogGroup", "arn:aws:logs:REGION:ACCOUNT_ID:log-group:/aws/lambda/other-function")


@contextmanager
def recording(*clients):
    """Every AWS operation the clients make meanwhile, as (IAM action, API parameters)."""
    calls = []

    def record(params, model, **kwargs):
        calls.append((f"{model.service_model.signing_name}:{model.name}", dict(params)))

    for client in clients:
        client.meta.events.register("before-parameter-build.*.*", record)
    try:
        yield calls
    finally:
        for client in clients:
            client.meta.events.unregister("before-parameter-build.*.*", record)


def test_policies_grant_what_the_function_and_its_event_source_call(
    kinesis, s3, streams, stub_model, settings, tmp_path
):
    """The handler (PutRecords, a dead letter) under the runner (what the event source mapping calls),
    including a batch that ends at the on-failure destination. Names are mapped to the deployed ones."""
    deployed = dataclasses.replace(settings, dead_letter_uri=None, input_stream=config.INPUT_STREAM)
    dead_letters = S3DeadLetters(f"s3://{settings.predictions_bucket}/dead-letter/{streams['input']}/", s3)
    service = ModelService(stub_model, "v", [KinesisWriter(streams["output"], kinesis)], dead_letters=dead_letters)
    put_payloads(kinesis, streams["input"], [ride_payload(0), b"not json", ride_payload(2)])
    with recording(kinesis, s3) as calls:
        EventSourceRunner(
            service.lambda_handler, streams["input"], client=kinesis, s3=s3, checkpoint=Checkpoint(tmp_path / "cp.json")
        ).run(once=True)
    put_payloads(kinesis, streams["input"], [ride_payload(3)])
    with recording(kinesis, s3) as failing_calls:
        EventSourceRunner(
            lambda event, context: 1 / 0,
            streams["input"],
            client=kinesis,
            s3=s3,
            max_retries=0,
            checkpoint=Checkpoint(tmp_path / "cp.json"),
        ).run(once=True)

    names = {streams["input"]: config.INPUT_STREAM, streams["output"]: config.PREDICTIONS_STREAM}
    checked = set()
    for action, params in calls + failing_calls:
        if "StreamName" in params:
            resource = f"arn:aws:kinesis:REGION:ACCOUNT_ID:stream/{names[params['StreamName']]}"
        elif "Key" in params:
            key = params["Key"].replace(f"/{streams['input']}/", f"/{config.INPUT_STREAM}/")
            resource = f"arn:aws:s3:::{params['Bucket']}/{key}"
        else:  # GetRecords names its stream in the iterator
            resource = f"arn:aws:kinesis:REGION:ACCOUNT_ID:stream/{config.INPUT_STREAM}"
        assert allowed(action, resource), (action, resource)
        checked.add(action)
    assert {
        "kinesis:GetRecords",
        "kinesis:GetShardIterator",
        "kinesis:ListShards",
        "kinesis:DescribeStreamSummary",
        "kinesis:PutRecords",
        "s3:PutObject",
    } <= checked
    assert sum(action == "s3:PutObject" and "/failures/" not in f"/{params['Key']}" for action, params in calls) == 1
    assert any(action == "s3:PutObject" and params["Key"].startswith("failures/") for action, params in failing_calls)
    # the default dead-letter location is the one the policy allows
    assert allowed(
        "s3:PutObject",
        "arn:aws:s3:::{}/{}x.json".format(*deployed.dead_letter_prefix.removeprefix("s3://").split("/", 1)),
    )
