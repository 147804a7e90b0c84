"""The CloudFormation template (infra/stream.yaml), and the template deployed into moto once per
session with the session's trained model as the function's model."""

from __future__ import annotations

import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from cfnlint.decode import decode

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "infra" / "stream.yaml"


def load_template() -> dict:
    """The template as data (intrinsic functions as {"Ref": ...}, {"Fn::Sub": ...})."""
    template, errors = decode(str(TEMPLATE))
    assert not errors, errors
    return template


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def aws(service: str, endpoint: str, region: str = "eu-west-1"):
    """A client of the local endpoint (moto takes any credentials)."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def deploy(cloudformation, name: str, parameters: dict) -> dict:
    """Create the stack and wait for it; its outputs."""
    cloudformation.create_stack(
        StackName=name,
        TemplateBody=TEMPLATE.read_text(),
        Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": str(v)} for k, v in parameters.items()],
    )
    cloudformation.get_waiter("stack_create_complete").wait(StackName=name, WaiterConfig={"Delay": 1})
    stack = cloudformation.describe_stacks(StackName=name)["Stacks"][0]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


@dataclass
class Deployment:
    endpoint: str  # moto
    region: str
    stack_name: str
    parameters: dict
    outputs: dict

    def client(self, service: str):
        return aws(service, self.endpoint, self.region)


@pytest.fixture(scope="session")
def moto_server():
    """A moto server of this process (its state readable through moto's backends), free port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def deploy_for(moto_server, settings):
    """`deploy_for(experiment_id, model_id)`: the template deployed into moto for that model.

    Its own moto, not the stack's: moto's Kinesis invokes a mapped function on every put, in Docker
    (no engine here), so the trigger is unlinked from the stream inside moto once created, and the
    local event-source runner stands in for it. The buckets take the stack's names, so the role's S3
    grants name the buckets the handler really uses (on the stack's SeaweedFS); moto creates them in
    its memory. Non-default shard counts prove the parameters reach the streams."""
    from moto.kinesis.models import kinesis_backends

    region = settings.aws_region
    account = aws("sts", moto_server, region).get_caller_identity()["Account"]
    cloudformation = aws("cloudformation", moto_server, region)
    created = []

    def deploy_model(experiment_id: str, model_id: str) -> Deployment:
        suffix = uuid.uuid4().hex[:8]
        parameters = {
            "CreateBuckets": "false" if created else "true",  # bucket names are per moto, like per AWS
            "ModelBucketName": settings.mlflow_bucket,
            "PredictionsBucketName": settings.predictions_bucket,
            "InputStreamName": f"ride_events-{suffix}",
            "InputShardCount": 2,
            "PredictionsStreamName": f"ride_predictions-{suffix}",
            "PredictionsShardCount": 1,
            "FunctionName": f"ride-duration-{suffix}",
            "RepositoryName": f"duration-model-{suffix}",
            "ImageUri": f"{account}.dkr.ecr.{region}.amazonaws.com/duration-model-{suffix}:v2",
            "ExperimentId": experiment_id,
            "ModelId": model_id,
        }
        name = f"infra-test-{suffix}"
        outputs = deploy(cloudformation, name, parameters)
        created.append(name)
        kinesis_backends[account][region].streams[parameters["InputStreamName"]].lambda_event_source_mappings.clear()
        return Deployment(moto_server, region, name, parameters, outputs)

    yield deploy_model
    for name in created:
        cloudformation.delete_stack(StackName=name)


@pytest.fixture(scope="session")
def deployed(deploy_for, trained_model):
    """The template deployed for the session's trained model."""
    return deploy_for(trained_model["logged"].experiment_id, trained_model["logged"].model_id)
