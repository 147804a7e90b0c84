"""The template deployed into moto's CloudFormation: every resource reaches CREATE_COMPLETE, and
what was created is read back from the services themselves."""

from __future__ import annotations

import ast
import json


def test_every_resource_is_created(deployed):
    resources = deployed.client("cloudformation").describe_stack_resources(StackName=deployed.stack_name)
    created = {r["LogicalResourceId"]: (r["ResourceType"], r["ResourceStatus"]) for r in resources["StackResources"]}
    assert created == {
        "ModelBucket": ("AWS::S3::Bucket", "CREATE_COMPLETE"),
        "PredictionsBucket": ("AWS::S3::Bucket", "CREATE_COMPLETE"),
        "InputStream": ("AWS::Kinesis::Stream", "CREATE_COMPLETE"),
        "PredictionsStream": ("AWS::Kinesis::Stream", "CREATE_COMPLETE"),
        "Repository": ("AWS::ECR::Repository", "CREATE_COMPLETE"),
        "LogGroup": ("AWS::Logs::LogGroup", "CREATE_COMPLETE"),
        "FunctionRole": ("AWS::IAM::Role", "CREATE_COMPLETE"),
        "ModelReadPolicy": ("AWS::IAM::Policy", "CREATE_COMPLETE"),
        "Function": ("AWS::Lambda::Function", "CREATE_COMPLETE"),
        "Trigger": ("AWS::Lambda::EventSourceMapping", "CREATE_COMPLETE"),
    }
    physical = {r["LogicalResourceId"]: r["PhysicalResourceId"] for r in resources["StackResources"]}
    s3 = deployed.client("s3")
    for name in ("ModelBucket", "PredictionsBucket"):
        assert physical[name] == deployed.parameters[f"{name}Name"]
        # moto keeps a bucket's encryption (not its versioning or public access block: test_template.py)
        (rule,) = s3.get_bucket_encryption(Bucket=physical[name])["ServerSideEncryptionConfiguration"]["Rules"]
        assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "AES256"}


def test_streams_have_the_requested_shards(deployed):
    kinesis = deployed.client("kinesis")
    shards = {}
    for name in (deployed.outputs["InputStreamName"], deployed.outputs["PredictionsStreamName"]):
        summary = kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]
        assert summary["StreamStatus"] == "ACTIVE"
        shards[name] = summary["OpenShardCount"]
    assert shards == {
        deployed.parameters["InputStreamName"]: 2,
        deployed.parameters["PredictionsStreamName"]: 1,
    }


def test_function_memory_timeout_image_and_environment(deployed):
    p = deployed.parameters
    function = deployed.client("lambda").get_function(FunctionName=p["FunctionName"])
    config = function["Configuration"]
    assert (config["MemorySize"], config["Timeout"]) == (1024, 60)
    assert config["Role"] == deployed.outputs["RoleArn"]
    assert config["Architectures"] == ["x86_64"]
    assert function["Code"]["ImageUri"] == p["ImageUri"]
    assert config["Environment"]["Variables"] == {
        "MLFLOW_BUCKET": p["ModelBucketName"],
        "EXPERIMENT_ID": p["ExperimentId"],
        "MODEL_ID": p["ModelId"],
        "PREDICTIONS_BUCKET": p["PredictionsBucketName"],
        "INPUT_STREAM_NAME": p["InputStreamName"],
        "PREDICTIONS_STREAM_NAME": p["PredictionsStreamName"],
        "DEAD_LETTER_URI": f"s3://{p['PredictionsBucketName']}/dead-letter/{p['InputStreamName']}/",
    }


def test_trigger_batches_reports_item_failures_bisects_and_retries_twice(deployed):
    (mapping,) = deployed.client("lambda").list_event_source_mappings(FunctionName=deployed.parameters["FunctionName"])[
        "EventSourceMappings"
    ]
    assert mapping["UUID"] == deployed.outputs["TriggerId"]
    assert mapping["EventSourceArn"] == deployed.outputs["InputStreamArn"]
    assert mapping["FunctionArn"] == deployed.outputs["FunctionArn"]
    assert mapping["BatchSize"] == 100
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert mapping["BisectBatchOnFunctionError"] is True
    assert mapping["MaximumRetryAttempts"] == 2
    assert mapping["StartingPosition"] == "LATEST"
    assert mapping["DestinationConfig"] == {
        "OnFailure": {"Destination": f"arn:aws:s3:::{deployed.parameters['PredictionsBucketName']}"}
    }


def test_log_group_and_repository(deployed):
    (group,) = deployed.client("logs").describe_log_groups(logGroupNamePrefix=_log_group(deployed))["logGroups"]
    assert (group["logGroupName"], group["retentionInDays"]) == (
        f"/aws/lambda/{deployed.parameters['FunctionName']}",
        14,
    )
    (repository,) = deployed.client("ecr").describe_repositories(
        repositoryNames=[deployed.parameters["RepositoryName"]]
    )["repositories"]
    assert repository["repositoryUri"] == deployed.outputs["RepositoryUri"]
    assert repository["imageTagMutability"] == "IMMUTABLE"
    assert deployed.parameters["ImageUri"].startswith(repository["repositoryUri"] + ":")


def _policies(deployed) -> dict:
    iam = deployed.client("iam")
    role = deployed.outputs["RoleArn"].rsplit("/", 1)[1]
    documents = {}
    for name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
        document = iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        documents[name] = _document(document)
    return documents


def _document(document) -> dict:
    # moto returns a policy given inline in the template as a Python repr, others as JSON.
    if not isinstance(document, str):
        return document
    try:
        return json.loads(document)
    except ValueError:
        return ast.literal_eval(document)


def test_role_actions_and_resources(deployed):
    p, out = deployed.parameters, deployed.outputs
    iam = deployed.client("iam")
    role = iam.get_role(RoleName=out["RoleArn"].rsplit("/", 1)[1])["Role"]
    trust = role["AssumeRolePolicyDocument"]
    trust = _document(trust)
    assert trust["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}
    ]
    assert iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"] == []

    grants = {}
    for name, document in _policies(deployed).items():
        for statement in document["Statement"]:
            assert statement["Effect"] == "Allow"
            actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
            grants[(name, statement["Sid"])] = (sorted(actions), statement["Resource"], statement.get("Condition"))
    model = f"{p['ExperimentId']}/models/{p['ModelId']}/artifacts"
    group = deployed.client("logs").describe_log_groups(logGroupNamePrefix=_log_group(deployed))["logGroups"][0]
    assert grants == {
        ("read-ride-events", "ReadRideEvents"): (
            [
                "kinesis:DescribeStream",
                "kinesis:DescribeStreamSummary",
                "kinesis:GetRecords",
                "kinesis:GetShardIterator",
                "kinesis:ListShards",
            ],
            out["InputStreamArn"],
            None,
        ),
        ("write-predictions", "WritePredictions"): (["kinesis:PutRecords"], out["PredictionsStreamArn"], None),
        ("read-model", "ReadModelFiles"): (["s3:GetObject"], f"arn:aws:s3:::{p['ModelBucketName']}/{model}/*", None),
        ("write-dead-letters", "WriteDeadLetters"): (
            ["s3:PutObject"],
            f"arn:aws:s3:::{p['PredictionsBucketName']}/dead-letter/{p['InputStreamName']}/*",
            None,
        ),
        ("on-failure-destination", "WriteFailedBatches"): (
            ["s3:PutObject"],
            f"arn:aws:s3:::{p['PredictionsBucketName']}/aws/lambda/*",
            None,
        ),
        ("on-failure-destination", "FailureDestinationBucket"): (
            ["s3:ListBucket"],
            f"arn:aws:s3:::{p['PredictionsBucketName']}",
            None,
        ),
        # moto's Arn of a log group has no ":*" suffix; AWS's has (both name this group only).
        ("write-logs", "WriteOwnLogs"): (["logs:CreateLogStream", "logs:PutLogEvents"], group["logGroupArn"], None),
    }


def _log_group(deployed) -> str:
    # The template's name for it (moto drops the LogGroupName output when the stack is updated).
    return f"/aws/lambda/{deployed.parameters['FunctionName']}"
