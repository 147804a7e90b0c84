"""scripts/aws.sh, the AWS CLI commands behind `make aws-plan`, `aws-deploy`, `aws-push` and
`aws-destroy`, run against moto (AWS_ENDPOINT_URL): plan, the two deployment steps, destroy."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import REPO, aws, free_port

# The dev set's AWS CLI (this environment's bin/) first, else one on PATH.
PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("aws", path=PATH) is None, reason="the AWS CLI is not installed"),
]
SCRIPT = REPO / "scripts" / "aws.sh"
# What the user may have set that would change what the script does.
SETTINGS = {
    *("STACK_NAME", "MLFLOW_BUCKET", "PREDICTIONS_BUCKET", "CREATE_BUCKETS", "INPUT_STREAM_NAME"),
    *("PREDICTIONS_STREAM_NAME", "MODEL_ID", "EXPERIMENT_ID", "IMAGE_TAG", "NO_BUILD", "PARAMS", "DRY_RUN"),
    *("AWS_PROFILE", "AWS_REGION"),
}


def script_env(endpoint: str, tmp_path, **settings) -> dict:
    # Per-service endpoints (AWS_ENDPOINT_URL_S3, ...) that other tests' stacks left set would win over
    # AWS_ENDPOINT_URL in the AWS CLI: the script's every call must reach this one endpoint.
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS and not k.startswith("AWS_ENDPOINT_URL_")}
    env.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test",
        AWS_DEFAULT_REGION="eu-west-1",
        AWS_CONFIG_FILE=str(tmp_path / "no-config"),  # the user's profiles stay out of it
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
        AWS_PAGER="",
        PATH=PATH,
        **settings,
    )
    return env


def run(command: str, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def statuses(cloudformation, name: str) -> set[str]:
    return {s["StackStatus"] for s in cloudformation.list_stacks()["StackSummaries"] if s["StackName"] == name}


def test_plan_deploy_and_destroy(moto_server, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    names = {
        "STACK_NAME": f"script-{suffix}",
        "MLFLOW_BUCKET": f"models-{suffix}",
        "PREDICTIONS_BUCKET": f"predictions-{suffix}",
        "INPUT_STREAM_NAME": f"ride_events-{suffix}",
        "PREDICTIONS_STREAM_NAME": f"ride_predictions-{suffix}",
        "PARAMS": f"FunctionName=ride-duration-{suffix} RepositoryName=duration-model-{suffix} InputShardCount=2",
    }
    env = script_env(moto_server, tmp_path, **names)
    cloudformation, ecr = aws("cloudformation", moto_server), aws("ecr", moto_server)

    # plan: every resource would be added, with the function since MODEL_ID is set; nothing is left behind
    planned = run("plan", {**env, "MODEL_ID": "m-1", "EXPERIMENT_ID": "1"})
    assert f"target: {moto_server} (AWS_ENDPOINT_URL is set: not AWS)" in planned.stderr
    rows = sorted(tuple(line.split("\t")[:3]) for line in planned.stdout.splitlines())
    assert rows == sorted(
        [
            ("Add", "ModelBucket", "AWS::S3::Bucket"),
            ("Add", "PredictionsBucket", "AWS::S3::Bucket"),
            ("Add", "InputStream", "AWS::Kinesis::Stream"),
            ("Add", "PredictionsStream", "AWS::Kinesis::Stream"),
            ("Add", "Repository", "AWS::ECR::Repository"),
            ("Add", "LogGroup", "AWS::Logs::LogGroup"),
            ("Add", "FunctionRole", "AWS::IAM::Role"),
            ("Add", "ModelReadPolicy", "AWS::IAM::Policy"),
            ("Add", "Function", "AWS::Lambda::Function"),
            ("Add", "Trigger", "AWS::Lambda::EventSourceMapping"),
        ]
    )
    assert statuses(cloudformation, names["STACK_NAME"]) <= {"DELETE_COMPLETE"}

    # deploy without a model: the stack without function, and the outputs for the next step
    first = run("deploy", env)
    outputs = dict(line.split("\t") for line in first.stdout.splitlines())
    assert outputs["InputStreamName"] == names["INPUT_STREAM_NAME"]
    assert "FunctionArn" not in outputs
    assert "then run again with MODEL_ID and EXPERIMENT_ID set" in first.stderr
    kinesis = aws("kinesis", moto_server)
    summary = kinesis.describe_stream_summary(StreamName=names["INPUT_STREAM_NAME"])["StreamDescriptionSummary"]
    assert summary["OpenShardCount"] == 2  # PARAMS reach the template

    # what `aws.sh push` would have pushed (no Docker engine here): an image under the tag
    repository = f"duration-model-{suffix}"
    config = hashlib.sha256(suffix.encode()).hexdigest()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": 1,
            "digest": f"sha256:{config}",
        },
        "layers": [],
    }
    digest = ecr.put_image(repositoryName=repository, imageManifest=json.dumps(manifest), imageTag="v2")["image"][
        "imageId"
    ]["imageDigest"]

    # deploy a model without its serving form: refused before anything is deployed
    model = {"MODEL_ID": "m-1", "EXPERIMENT_ID": "1", "NO_BUILD": "1", "IMAGE_TAG": "v2"}
    refused = subprocess.run(
        ["bash", str(SCRIPT), "deploy"], env={**env, **model}, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 1
    assert "model m-1 has no serving form at s3://" in refused.stderr
    assert "FunctionArn" not in dict(line.split("\t") for line in run("outputs", env).stdout.splitlines())
    aws("s3", moto_server).put_object(
        Bucket=names["MLFLOW_BUCKET"], Key="1/models/m-1/artifacts/serving/forest.json", Body=b"{}"
    )

    # deploy with the model: one update adds the function, on the image by digest, and its trigger
    second = run("deploy", {**env, **model})
    outputs = dict(line.split("\t") for line in second.stdout.splitlines())
    function = aws("lambda", moto_server).get_function(FunctionName=f"ride-duration-{suffix}")
    assert function["Code"]["ImageUri"] == f"{outputs['RepositoryUri']}@{digest}"
    assert function["Configuration"]["Environment"]["Variables"]["MODEL_ID"] == "m-1"
    assert function["Configuration"]["FunctionArn"] == outputs["FunctionArn"]
    assert outputs["InputStreamName"] == names["INPUT_STREAM_NAME"]  # the first step's values are kept

    # destroy: the stack goes, its buckets stay (moto ignores EmptyOnDelete, so the image goes first)
    ecr.batch_delete_image(repositoryName=repository, imageIds=[{"imageDigest": digest}])
    gone = run("destroy", env)
    assert f"kept (DeletionPolicy Retain): s3://{names['MLFLOW_BUCKET']} s3://{names['PREDICTIONS_BUCKET']}" in (
        gone.stderr
    )
    assert statuses(cloudformation, names["STACK_NAME"]) == {"DELETE_COMPLETE"}
    assert names["INPUT_STREAM_NAME"] not in kinesis.list_streams()["StreamNames"]
    s3 = aws("s3", moto_server)
    assert {names["MLFLOW_BUCKET"], names["PREDICTIONS_BUCKET"]} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_dry_run_prints_the_commands_and_calls_nothing(tmp_path):
    # Nothing listens on this port: any AWS call would fail the script.
    env = script_env(f"http://127.0.0.1:{free_port()}", tmp_path, DRY_RUN="1", MODEL_ID="m-1", EXPERIMENT_ID="1")
    result = run("deploy", env)
    commands = [line[2:] for line in result.stderr.splitlines() if line.startswith("+ ")]
    expected = [
        "aws sts get-caller-identity",  # the default bucket names: of this account and region
        "aws cloudformation create-stack",
        "aws cloudformation wait stack-create-complete",
        "aws cloudformation describe-stacks",
        "aws s3api head-object",  # the model's serving form
        "aws cloudformation describe-stacks",
        "aws ecr get-login-password | docker login",
        "docker build",
        "docker push",
        "aws cloudformation describe-stacks",
        "aws ecr describe-images",
        "aws cloudformation update-stack",
        "aws cloudformation wait stack-update-complete",
        "aws cloudformation describe-stacks",
    ]
    assert len(commands) == len(expected) and all(c.startswith(e) for c, e in zip(commands, expected)), commands
    assert "ParameterKey=ModelId,ParameterValue=m-1" in commands[-3]
    assert "docker build --platform linux/amd64 --provenance=false -f docker/streaming/Dockerfile" in result.stderr
    assert "ParameterKey=ModelBucketName,ParameterValue=ride-duration-models-<account>-eu-west-1" in commands[1]


# moto never rolls a stack back, so for ROLLBACK_COMPLETE an `aws` in front of the real one answers the
# script's one status question with it; every other call, the delete and the create among them, reaches moto.
STATUS_SHIM = """#!/usr/bin/env bash
if [[ "$*" == *describe-stacks*StackStatus* && ! -e "$0.asked" ]]; then
    touch "$0.asked"
    echo ROLLBACK_COMPLETE
    exit 0
fi
exec "{real}" "$@"
"""


@pytest.mark.parametrize(
    ("status", "why"),
    [
        ("REVIEW_IN_PROGRESS", "a change set created it and was never executed"),
        ("ROLLBACK_COMPLETE", "its first deployment failed"),
    ],
)
def test_a_stack_aws_will_not_update_is_recreated(moto_server, tmp_path, status, why):
    """A stack whose first deployment failed, or that an interrupted plan's change set created: AWS updates
    neither. Deploy says so in a sentence, deletes the stack and creates it again."""
    suffix = uuid.uuid4().hex[:8]
    names = {
        "STACK_NAME": f"stuck-{suffix}",
        "MLFLOW_BUCKET": f"models-{suffix}",
        "PREDICTIONS_BUCKET": f"predictions-{suffix}",
        "INPUT_STREAM_NAME": f"ride_events-{suffix}",
        "PREDICTIONS_STREAM_NAME": f"ride_predictions-{suffix}",
        "PARAMS": f"FunctionName=ride-duration-{suffix} RepositoryName=duration-model-{suffix}",
    }
    cloudformation = aws("cloudformation", moto_server)
    cloudformation.create_change_set(
        StackName=names["STACK_NAME"],
        ChangeSetName="never-executed",
        ChangeSetType="CREATE",
        TemplateBody=(REPO / "infra" / "stream.yaml").read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[
            {"ParameterKey": "ModelBucketName", "ParameterValue": names["MLFLOW_BUCKET"]},
            {"ParameterKey": "PredictionsBucketName", "ParameterValue": names["PREDICTIONS_BUCKET"]},
        ],
    )
    (before,) = cloudformation.describe_stacks(StackName=names["STACK_NAME"])["Stacks"]
    assert before["StackStatus"] == "REVIEW_IN_PROGRESS"
    env = script_env(moto_server, tmp_path, **names)
    if status == "ROLLBACK_COMPLETE":
        shim = tmp_path / "bin" / "aws"
        shim.parent.mkdir()
        shim.write_text(STATUS_SHIM.format(real=shutil.which("aws", path=PATH)))
        shim.chmod(0o755)
        env["PATH"] = f"{shim.parent}{os.pathsep}{PATH}"
    result = run("deploy", env)
    assert f"stack {names['STACK_NAME']} is in {status}: {why}" in result.stderr
    (after,) = cloudformation.describe_stacks(StackName=names["STACK_NAME"])["Stacks"]
    assert after["StackStatus"] == "CREATE_COMPLETE"
    assert after["StackId"] != before["StackId"], "the stuck stack was deleted and a new one created"
    after_sentence = result.stderr.split(f"is in {status}")[1]
    commands = [line[2:] for line in after_sentence.splitlines() if line.startswith("+ aws cloudformation")]
    assert [c.split()[2] for c in commands[:3]] == ["delete-stack", "wait", "create-stack"], commands
    run("destroy", script_env(moto_server, tmp_path, **names))


BASH4_ONLY = {
    r"\bmapfile\b|\breadarray\b": "mapfile/readarray",
    r"\$\{[A-Za-z_][A-Za-z0-9_]*(\^\^?|,,?)\}": "case modification ${x^^}",
    r"\b(declare|local|typeset) -[a-zA-Z]*A": "associative arrays",
    r"&>>|\|&": "&>> and |&",
    r"\bcoproc\b": "coproc",
    r"\$\{[A-Za-z_][A-Za-z0-9_]*@[QEPAa]\}": "${x@Q}",
}


def test_the_script_uses_nothing_macos_bash_3_2_lacks():
    """macOS ships bash 3.2: no construct of bash 4 or later (checked here without a bash 3.2), and it parses."""
    code = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    for pattern, construct in BASH4_ONLY.items():
        found = [line for line in code if re.search(pattern, line)]
        assert not found, f"{construct} (bash 4+): {found}"
    assert subprocess.run(["bash", "--posix", "-n", str(SCRIPT)], capture_output=True, check=False).returncode == 0
