#!/usr/bin/env bash
# Build the streaming Lambda image and push it to ECR (not run in this course's CI: needs Docker + AWS).
#   AWS_REGION=eu-west-1 ECR_REPO=duration-model TAG=v2 docker/streaming/push_ecr.sh
set -euo pipefail
REGION="${AWS_REGION:-eu-west-1}"
REPO_NAME="${ECR_REPO:-duration-model}"
TAG="${TAG:-v2}"
ACCOUNT_ID="$(aws sts get-caller-identity --query Account --output text)"
REGISTRY="${ACCOUNT_ID}.dkr.ecr.${REGION}.amazonaws.com"
IMAGE="${REGISTRY}/${REPO_NAME}:${TAG}"

aws ecr describe-repositories --region "$REGION" --repository-names "$REPO_NAME" >/dev/null 2>&1 \
  || aws ecr create-repository --region "$REGION" --repository-name "$REPO_NAME" >/dev/null
# The 2022 `$(aws ecr get-login --no-include-email)` is gone from AWS CLI v2:
aws ecr get-login-password --region "$REGION" | docker login --username AWS --password-stdin "$REGISTRY"

cd "$(dirname "$0")/../.."   # the build context is the repository root
# Lambda rejects multi-platform manifests: one platform, no provenance attestation.
docker build --platform linux/amd64 --provenance=false -f docker/streaming/Dockerfile -t "$IMAGE" .
docker push "$IMAGE"
echo "$IMAGE"
