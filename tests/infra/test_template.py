"""infra/stream.yaml passes cfn-lint, and the settings moto does not keep when it deploys the
template (bucket versioning and public access block, ECR scan-on-push and lifecycle, stream
encryption) are checked here, on the template itself."""

from __future__ import annotations

import json

from cfnlint.api import lint

from .conftest import TEMPLATE, load_template


def test_cfn_lint_passes():
    matches = lint(TEMPLATE.read_text(), regions=["eu-west-1", "us-east-1"])
    assert [str(m) for m in matches] == []


def test_cfn_lint_catches_a_broken_mapping():
    # The lint test can fail: a misspelt response type is an error cfn-lint reports.
    broken = TEMPLATE.read_text().replace("[ReportBatchItemFailures]", "[ReportBatchItemFailure]")
    assert broken != TEMPLATE.read_text()
    assert any(m.rule.id.startswith("E") and "ReportBatchItemFailure" in m.message for m in lint(broken))


def test_buckets_are_private_encrypted_kept_and_the_artifacts_versioned():
    resources = load_template()["Resources"]
    for name in ("ModelBucket", "PredictionsBucket"):
        bucket = resources[name]
        props = bucket["Properties"]
        assert (bucket["DeletionPolicy"], bucket["UpdateReplacePolicy"]) == ("Retain", "Retain"), name
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }, name
        rules = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert [r["ServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in rules] == ["AES256"], name
    assert resources["ModelBucket"]["Properties"]["VersioningConfiguration"] == {"Status": "Enabled"}
    assert "VersioningConfiguration" not in resources["PredictionsBucket"]["Properties"]


def test_streams_are_provisioned_and_encrypted():
    resources = load_template()["Resources"]
    for name, shards in (("InputStream", "InputShardCount"), ("PredictionsStream", "PredictionsShardCount")):
        props = resources[name]["Properties"]
        assert props["StreamModeDetails"] == {"StreamMode": "PROVISIONED"}
        assert props["ShardCount"] == {"Ref": shards}
        assert props["StreamEncryption"] == {"EncryptionType": "KMS", "KeyId": "alias/aws/kinesis"}


def test_repository_never_expires_a_tagged_image_and_lets_the_function_pull():
    template = load_template()
    props = template["Resources"]["Repository"]["Properties"]
    assert props["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert props["EmptyOnDelete"] is True
    assert props["ImageTagMutability"] == "IMMUTABLE"  # a tag names one image for good
    # ${UntaggedImageDays} substituted as CloudFormation would, then read as the JSON ECR receives.
    text = props["LifecyclePolicy"]["LifecyclePolicyText"]["Fn::Sub"].replace("${UntaggedImageDays}", "7")
    (rule,) = json.loads(text)["rules"]
    assert rule["selection"] == {
        "tagStatus": "untagged",
        "countType": "sinceImagePushed",
        "countUnit": "days",
        "countNumber": 7,
    }
    assert rule["action"] == {"type": "expire"}
    (statement,) = props["RepositoryPolicyText"]["Statement"]
    assert statement["Principal"] == {"Service": "lambda.amazonaws.com"}
    assert sorted(statement["Action"]) == ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"]
    source = statement["Condition"]["StringLike"]["aws:sourceArn"]["Fn::Sub"]
    assert source == "arn:${AWS::Partition}:lambda:${AWS::Region}:${AWS::AccountId}:function:${FunctionName}"


def test_failure_destination_is_the_bucket_itself():
    destination = load_template()["Resources"]["Trigger"]["Properties"]["DestinationConfig"]["OnFailure"]["Destination"]
    condition, made_here, given = destination["Fn::If"]
    assert (condition, made_here) == ("MakeBuckets", {"Fn::GetAtt": ["PredictionsBucket", "Arn"]})


def test_the_function_and_its_trigger_wait_for_an_image_and_a_model():
    template = load_template()
    resources = template["Resources"]
    assert {n for n, r in resources.items() if r.get("Condition") == "HasImage"} == {
        "Function",
        "Trigger",
        "ModelReadPolicy",
    }
    assert resources["Function"]["Properties"]["PackageType"] == "Image"  # moto reports Zip for any function
    (rule,) = template["Rules"].values()
    assert "ModelId" in json.dumps(rule) and "ExperimentId" in json.dumps(rule)
