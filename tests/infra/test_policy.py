"""The role grants what the shipped handler and its trigger do, and no more.

The function's environment is read back from the deployed function and the shipped
`ride_duration.stream.lambda_handler` runs with it, cold (it loads the session's model
from S3), under the local event-source runner (what the trigger does with the function's
role), on the template's streams: good rides, a record that is dead-lettered, and a batch
that exhausts its retries and goes to the on-failure destination. Every AWS call made
meanwhile is recorded and must be allowed by the role's policies as deployed; every
action the policies grant must be used by some call, except the few that are made by
AWS itself rather than by this code (NOT_MADE_HERE, each with its reason).
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest

from ride_duration import aws as aws_module
from ride_duration.registry import ModelNotFound
from ride_duration.stream import handler
from workbench.event_source import Checkpoint, EventSourceRunner

from .conftest import aws
from .test_deploy import _policies

# S3 API operation -> the IAM action it needs (HeadObject is authorised as GetObject).
S3_ACTIONS = {
    "ListObjectsV2": "s3:ListBucket",
    "ListObjects": "s3:ListBucket",
    "HeadObject": "s3:GetObject",
    "GetObject": "s3:GetObject",
    "PutObject": "s3:PutObject",
}

# (statement, action) granted but not called by anything that runs here, and why it is granted.
NOT_MADE_HERE = {
    ("ReadRideEvents", "kinesis:DescribeStream"): (
        "CreateEventSourceMapping checks that the role may call it; polling uses DescribeStreamSummary"
    ),
    ("FailureDestinationBucket", "s3:ListBucket"): "AWS requires it of an S3 on-failure destination",
    ("WriteOwnLogs", "logs:CreateLogStream"): "the Lambda runtime ships the function's output to CloudWatch Logs",
    ("WriteOwnLogs", "logs:PutLogEvents"): "the Lambda runtime ships the function's output to CloudWatch Logs",
}


# (ride index, trip distance): "far" is never scorable, so that record is dead-lettered.
RIDES = [(0, 3.66), (1, 1.2), (2, "far"), (3, 8.5)]


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _iam_match(pattern: str, value: str, case: bool = True) -> bool:
    """IAM's wildcards: `*` any run of characters, `?` one character; nothing else is special."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, 0 if case else re.IGNORECASE) is not None


def grants(statements, action: str, resource: str, context: dict) -> list[tuple[str, str]]:
    """The (statement, action pattern) pairs that allow `action` on `resource` with these condition keys."""
    found = []
    for statement in statements:
        assert statement["Effect"] == "Allow" and not {"NotAction", "NotResource"} & set(statement), statement
        if not any(_iam_match(r, resource) for r in _as_list(statement["Resource"])):
            continue
        if not _conditions_hold(statement.get("Condition", {}), context):
            continue
        found += [(statement["Sid"], a) for a in _as_list(statement["Action"]) if _iam_match(a, action, case=False)]
    return found


def _conditions_hold(condition: dict, context: dict) -> bool:
    for operator, keys in condition.items():
        # Only what the template uses; anything else must be taught here before it is trusted.
        assert operator == "StringLike", f"this evaluator does not know the condition operator {operator}"
        for key, patterns in keys.items():
            if key not in context or not any(_iam_match(p, context[key]) for p in _as_list(patterns)):
                return False
    return True


@contextmanager
def recording(monkeypatch):
    """Every AWS API call made meanwhile by a client of `ride_duration.aws` (the handler's and the runner's),
    through botocore's documented `before-parameter-build` event on each client."""
    calls = []
    real = aws_module.client

    def client(service, settings):
        made = real(service, settings)
        endpoint = made.meta.endpoint_url

        def record(model, params, **kwargs):
            calls.append((model.service_model.service_name, model.name, dict(params), endpoint))

        made.meta.events.register("before-parameter-build", record)
        return made

    with monkeypatch.context() as patch:
        patch.setattr(aws_module, "client", client)  # the package's own factory, not a library's
        yield calls


def _as_function(deployment, monkeypatch) -> dict:
    """This process as the deployed function sees it: its environment, Kinesis at the moto the template
    was deployed to (S3 stays the stack's SeaweedFS, where the model is), and no service built yet."""
    function = deployment.client("lambda").get_function(FunctionName=deployment.parameters["FunctionName"])
    env = function["Configuration"]["Environment"]["Variables"]
    for name in ("MODEL_URI", "TEST_RUN", "RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", deployment.endpoint)
    monkeypatch.setattr(handler, "_SERVICE", None)  # a cold start: the model is loaded under the recording
    return env


def _put_rides(deployment, stream: str) -> None:
    kinesis = deployment.client("kinesis")
    for i, distance in RIDES:  # one partition key: one shard, one batch
        ride = {"PULocationID": 130 + i, "DOLocationID": 205, "trip_distance": distance}
        data = json.dumps({"ride": ride, "ride_id": f"r{i}"}).encode()
        kinesis.put_record(StreamName=stream, Data=data, PartitionKey="k")


@pytest.fixture(scope="module")
def skops_only(deploy_for, trained_model, stack, settings):
    """A deployment whose model has no serving form (a copy of the session's model without serving/,
    as a model logged before it existed): the function refuses it at its cold start."""
    logged = trained_model["logged"]
    s3 = _s3(stack, settings.aws_region)
    bucket, source = logged.s3_uri.removeprefix("s3://").split("/", 1)
    model_id = f"m-{uuid.uuid4().hex}"
    target = source.replace(logged.model_id, model_id)
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=source + "/")["Contents"]:
        relative = item["Key"].removeprefix(source + "/")
        if not relative.startswith("serving/"):
            s3.copy_object(Bucket=bucket, Key=f"{target}/{relative}", CopySource={"Bucket": bucket, "Key": item["Key"]})
    return deploy_for(logged.experiment_id, model_id)


def test_every_call_is_allowed_and_every_grant_is_used(deployed, skops_only, stack, monkeypatch, tmp_path):
    used, actions = set(), set()
    # A model without the serving form: refused in one sentence, having read nothing but its MLmodel's folder.
    env = _as_function(skops_only, monkeypatch)
    with recording(monkeypatch) as calls, pytest.raises(ModelNotFound, match="has no serving form"):
        handler.get_service()
    grants_used, actions_made = _check_calls(skops_only, env, stack, calls)
    used, actions = used | grants_used, actions | actions_made
    for deployment, source in ((deployed, "serving form"),):
        env = _as_function(deployment, monkeypatch)
        _put_rides(deployment, env["INPUT_STREAM_NAME"])
        with recording(monkeypatch) as calls:
            stats = EventSourceRunner(
                handler.lambda_handler, env["INPUT_STREAM_NAME"], checkpoint=Checkpoint(tmp_path / f"{source}.json")
            ).run(once=True)
        assert handler.get_service().model.source == source
        assert (stats.batches, stats.records, stats.dead_letters, stats.failed_records) == (1, len(RIDES), 1, 0)
        _check_outputs(deployment, env, stack)
        if source == "serving form":
            # The same batch through a function that keeps failing: after its retries the runner, as the
            # trigger would, sends it to the on-failure destination.
            with recording(monkeypatch) as failing_calls:
                failing = EventSourceRunner(
                    lambda event, context: 1 / 0,
                    env["INPUT_STREAM_NAME"],
                    checkpoint=Checkpoint(tmp_path / "failing.json"),
                    max_retries=0,
                ).run(once=True)
            assert failing.failed_records == len(RIDES)
            calls += failing_calls
        grants_used, actions_made = _check_calls(deployment, env, stack, calls)
        used, actions = used | grants_used, actions | actions_made

    # The calls that make this test meaningful were all made.
    assert actions == {
        "kinesis:DescribeStreamSummary",
        "kinesis:ListShards",
        "kinesis:GetShardIterator",
        "kinesis:GetRecords",
        "kinesis:PutRecords",
        "s3:GetObject",
        "s3:PutObject",
    }
    granted = {(s["Sid"], a) for s in _statements(deployed) for a in _as_list(s["Action"])}
    assert granted - used == set(NOT_MADE_HERE)


def _statements(deployment) -> list[dict]:
    return [s for document in _policies(deployment).values() for s in document["Statement"]]


def _check_calls(deployment, env, stack, calls) -> tuple[set, set]:
    """Assert every call went to the local stack and is allowed; the (statement, action) grants used
    and the IAM actions called."""
    out = deployment.outputs
    region, account = out["InputStreamArn"].split(":")[3:5]
    statements = _statements(deployment)
    used, actions = set(), set()
    for service, operation, params, endpoint in calls:
        assert endpoint in {deployment.endpoint, stack.url("s3")}, (service, operation, endpoint)
        action, resource, context = _authorisation(service, operation, params, env, out, region, account)
        allowed = grants(statements, action, resource, context)
        assert allowed, f"{operation} -> {action} on {resource} {context}: not allowed by the role"
        used |= set(allowed)
        actions.add(action)
    return used, actions


def _check_outputs(deployment, env, stack) -> None:
    """What the function did, read back: three predictions out, one dead letter."""
    predicted = _read_stream(deployment.client("kinesis"), env["PREDICTIONS_STREAM_NAME"])
    assert sorted(e["prediction"]["ride_id"] for e in predicted) == ["r0", "r1", "r3"]
    s3 = _s3(stack, deployment.region)
    bucket, prefix = env["DEAD_LETTER_URI"].removeprefix("s3://").split("/", 1)
    (dead,) = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    letter = json.loads(s3.get_object(Bucket=bucket, Key=dead["Key"])["Body"].read())
    assert json.loads(base64.b64decode(letter["kinesis"]["data"]))["ride_id"] == "r2"


def test_the_role_refuses_what_the_handler_never_needs(deployed):
    p, out = deployed.parameters, deployed.outputs
    statements = _statements(deployed)
    model = f"{p['ExperimentId']}/models/{p['ModelId']}/artifacts"
    other_model = f"{p['ExperimentId']}/models/m-0123456789abcdef/artifacts"
    refused = [
        ("s3:GetObject", f"arn:aws:s3:::{p['ModelBucketName']}/{other_model}/MLmodel", {}),
        ("s3:GetObject", f"arn:aws:s3:::{p['ModelBucketName']}/mlflow.db", {}),
        ("s3:ListBucket", f"arn:aws:s3:::{p['ModelBucketName']}", {"s3:prefix": ""}),
        ("s3:ListBucket", f"arn:aws:s3:::{p['ModelBucketName']}", {"s3:prefix": f"{model}/"}),
        ("s3:ListBucket", f"arn:aws:s3:::{p['ModelBucketName']}", {"s3:prefix": f"{other_model}/"}),
        ("s3:PutObject", f"arn:aws:s3:::{p['ModelBucketName']}/{model}/MLmodel", {}),
        ("s3:GetObject", f"arn:aws:s3:::{p['PredictionsBucketName']}/dead-letter/{p['InputStreamName']}/x.json", {}),
        ("s3:PutObject", f"arn:aws:s3:::{p['PredictionsBucketName']}/taxi_type=green/year=2021/month=02/x", {}),
        ("s3:PutObject", f"arn:aws:s3:::{p['PredictionsBucketName']}/dead-letter/other_stream/x.json", {}),
        ("kinesis:PutRecords", out["InputStreamArn"], {}),
        ("kinesis:PutRecord", out["PredictionsStreamArn"], {}),
        ("kinesis:GetRecords", out["PredictionsStreamArn"], {}),
        ("kinesis:ListStreams", "*", {}),
        ("kinesis:SubscribeToShard", out["InputStreamArn"], {}),
        ("logs:CreateLogGroup", "arn:aws:logs:eu-west-1:123456789012:log-group:/aws/lambda/other", {}),
    ]
    for action, resource, context in refused:
        assert grants(statements, action, resource, context) == [], (action, resource, context)
    # and the same evaluator allows the model's own files
    assert grants(statements, "s3:GetObject", f"arn:aws:s3:::{p['ModelBucketName']}/{model}/MLmodel", {})


def _authorisation(service, operation, params, env, out, region, account):
    """(IAM action, resource ARN, condition keys) of one recorded call, as AWS would authorise it."""
    if service == "kinesis":
        if operation == "GetRecords":  # names its stream through the iterator: the runner reads only the input
            name = env["INPUT_STREAM_NAME"]
        else:
            name = params["StreamName"]
        return f"kinesis:{operation}", f"arn:aws:kinesis:{region}:{account}:stream/{name}", {}
    assert service == "s3", (service, operation)
    action = S3_ACTIONS[operation]
    if action == "s3:ListBucket":
        return action, f"arn:aws:s3:::{params['Bucket']}", {"s3:prefix": params.get("Prefix", "")}
    key = params["Key"]
    if key.startswith("failures/"):
        # The local runner keeps its failed batches under failures/<stream>/<created>/<shard>/; AWS writes them
        # to aws/lambda/<mapping id>/<shard>/YYYY/MM/DD/<time>-<uuid>, which is what the role must allow.
        stream, _, shard = key.split("/")[1:4]
        assert stream == env["INPUT_STREAM_NAME"], key
        now = datetime.now(UTC)
        key = f"aws/lambda/{out['TriggerId']}/{shard}/{now:%Y/%m/%d}/{now:%Y-%m-%dT%H.%M.%S}-0a1b2c3d"
    return action, f"arn:aws:s3:::{params['Bucket']}/{key}", {}


def _s3(stack, region: str):
    return aws("s3", stack.url("s3"), region)


def _read_stream(kinesis, name: str) -> list[dict]:
    events = []
    for shard in kinesis.list_shards(StreamName=name)["Shards"]:
        iterator = kinesis.get_shard_iterator(
            StreamName=name, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        events += [json.loads(r["Data"]) for r in kinesis.get_records(ShardIterator=iterator)["Records"]]
    return events
