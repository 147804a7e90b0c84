#!/usr/bin/env bash
# The streaming side on AWS, from infra/stream.yaml, with the AWS CLI (v2; v1 works too) and Docker.
#
#   scripts/aws.sh plan      # what deploy would create or change (a CloudFormation change set, not executed)
#   scripts/aws.sh deploy    # streams, buckets, ECR repository, role, log group; with MODEL_ID and
#                            # EXPERIMENT_ID also: build + push the image, then the function and its trigger
#   scripts/aws.sh push      # build the image and push it to the stack's repository as IMAGE_TAG
#   scripts/aws.sh outputs   # the stack's outputs (stream names, repository URI, ...)
#   scripts/aws.sh destroy   # delete the stack (the two buckets are kept: they hold models and predictions)
#
# Settings (environment; the package's own names where it has one):
#   STACK_NAME (ride-duration-stream), AWS_REGION or AWS_DEFAULT_REGION (else your profile's region, else eu-west-1),
#   MLFLOW_BUCKET, PREDICTIONS_BUCKET (default: ride-duration-{models,predictions}-<account>-<region>),
#   CREATE_BUCKETS (true), INPUT_STREAM_NAME, PREDICTIONS_STREAM_NAME, MODEL_ID + EXPERIMENT_ID (the model the
#   function serves: it must have its serving form), IMAGE_TAG (the git commit; tags are immutable),
#   NO_BUILD=1 (deploy the image already pushed as IMAGE_TAG), PARAMS="Key=Value ..." (any other template
#   parameter, e.g. "InputShardCount=2 MemorySize=2048"), DRY_RUN=1 (print the commands, run none).
# With AWS_ENDPOINT_URL set (python -m workbench.stack env), every command goes to that endpoint, not to AWS.
# Runs on macOS's bash 3.2: no mapfile, no ${x^^}, no associative arrays.
set -euo pipefail
cd "$(dirname "$0")/.."

TEMPLATE=infra/stream.yaml
STACK="${STACK_NAME:-ride-duration-stream}"
region="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
if [[ -z "$region" ]]; then region=$(aws configure get region 2>/dev/null || true); fi
export AWS_DEFAULT_REGION="${region:-eu-west-1}"
# Unique per push (the repository's tags are immutable): the commit, and the time when the tree has edits.
TAG="${IMAGE_TAG:-}"
if [[ -z "$TAG" ]]; then
    TAG=$(git rev-parse --short=12 HEAD 2>/dev/null || date -u +%Y%m%d%H%M%S)
    if [[ -n "$(git status --porcelain 2>/dev/null)" ]]; then TAG="$TAG-dirty-$(date -u +%Y%m%d%H%M%S)"; fi
fi
DRY="${DRY_RUN:-}"
exists=""  # whether the stack exists: yes, no, or not asked yet

say() { echo "$*" >&2; }
# Every command that changes something goes through here: shown, then run unless DRY_RUN.
run() {
    say "+ $*"
    if [[ -z "$DRY" ]]; then "$@"; fi
}
# A command whose output the script needs: under DRY_RUN it is shown and $1 stands in for its output.
query() {
    local placeholder=$1
    shift
    if [[ -n "$DRY" ]]; then
        say "+ $*"
        echo "$placeholder"
    else
        "$@"
    fi
}

# Lines of output into the array named $1 (bash 3.2 has no mapfile).
lines_into() {
    local __name=$1 __line
    shift
    eval "$__name=()"
    while IFS= read -r __line; do eval "$__name+=(\"\$__line\")"; done < <("$@")
}

account() { query '<account>' aws sts get-caller-identity --query Account --output text; }

# Template parameters from the environment: only those set, so an update keeps the stack's other values.
# A new stack's buckets default to names of this account and region (bucket names are global).
overrides() {
    local -a out=()
    local mode=$1 suffix=""
    shift
    if [[ $mode == create && ( -z "${MLFLOW_BUCKET:-}" || -z "${PREDICTIONS_BUCKET:-}" ) ]]; then
        suffix="$(account)-$AWS_DEFAULT_REGION"
    fi
    if [[ -n "${MLFLOW_BUCKET:-}" ]]; then out+=("ModelBucketName=$MLFLOW_BUCKET"); fi
    if [[ -n "${PREDICTIONS_BUCKET:-}" ]]; then out+=("PredictionsBucketName=$PREDICTIONS_BUCKET"); fi
    if [[ -n "$suffix" && -z "${MLFLOW_BUCKET:-}" ]]; then out+=("ModelBucketName=ride-duration-models-$suffix"); fi
    if [[ -n "$suffix" && -z "${PREDICTIONS_BUCKET:-}" ]]; then
        out+=("PredictionsBucketName=ride-duration-predictions-$suffix")
    fi
    if [[ -n "${CREATE_BUCKETS:-}" ]]; then out+=("CreateBuckets=$CREATE_BUCKETS"); fi
    if [[ -n "${INPUT_STREAM_NAME:-}" ]]; then out+=("InputStreamName=$INPUT_STREAM_NAME"); fi
    if [[ -n "${PREDICTIONS_STREAM_NAME:-}" ]]; then out+=("PredictionsStreamName=$PREDICTIONS_STREAM_NAME"); fi
    if [[ -n "${MODEL_ID:-}" ]]; then out+=("ModelId=$MODEL_ID"); fi
    if [[ -n "${EXPERIMENT_ID:-}" ]]; then out+=("ExperimentId=$EXPERIMENT_ID"); fi
    if [[ -n "${PARAMS:-}" ]]; then
        local -a extra
        read -r -a extra <<<"$PARAMS"
        out+=("${extra[@]}")
    fi
    out+=("$@")
    if ((${#out[@]})); then printf '%s\n' "${out[@]}"; fi
}

target() {
    if [[ -n "${AWS_ENDPOINT_URL:-}" ]]; then
        say "target: $AWS_ENDPOINT_URL (AWS_ENDPOINT_URL is set: not AWS), stack $STACK, region $AWS_DEFAULT_REGION"
    else
        say "target: AWS account $(account)," \
            "stack $STACK, region $AWS_DEFAULT_REGION"
    fi
}

# Asked of CloudFormation once per run, then known (a run that creates the stack records it). A stack AWS
# will not update (a failed first deployment, a change set never executed) is deleted first, with a sentence.
stack_exists() {
    local status=""
    if [[ -z "$exists" ]]; then
        exists=no
        if [[ -z "$DRY" ]]; then
            status=$(aws cloudformation describe-stacks --stack-name "$STACK" --query 'Stacks[0].StackStatus' \
                --output text 2>/dev/null || true)
        fi
        case "$status" in
            "") ;;
            ROLLBACK_COMPLETE | REVIEW_IN_PROGRESS)
                if [[ $status == ROLLBACK_COMPLETE ]]; then
                    say "stack $STACK is in ROLLBACK_COMPLETE: its first deployment failed (its events say why) and AWS" \
                        "accepts no update of it, so it is deleted and created again"
                else
                    say "stack $STACK is in REVIEW_IN_PROGRESS: a change set created it and was never executed" \
                        "(e.g. an interrupted plan), so the empty stack is deleted and created again"
                fi
                run aws cloudformation delete-stack --stack-name "$STACK"
                run aws cloudformation wait stack-delete-complete --stack-name "$STACK"
                ;;
            *) exists=yes ;;
        esac
    fi
    [[ $exists == yes ]]
}

output() {
    local value placeholder="<$1>"
    if [[ $1 == RepositoryUri ]]; then placeholder="<account>.dkr.ecr.$AWS_DEFAULT_REGION.amazonaws.com/<repository>"; fi
    value=$(query "$placeholder" aws cloudformation describe-stacks --stack-name "$STACK" \
        --query "Stacks[0].Outputs[?OutputKey=='$1'].OutputValue" --output text)
    if [[ "$value" == None ]]; then value=""; fi
    echo "$value"
}

# --parameters for create-stack, update-stack and create-change-set: the ones set here and, for an existing
# stack ($1 = update), its current values of the rest (what UsePreviousValue does; moto honours that only for
# values that were given, not for defaults).
cfn_params() {
    local existing=$1 key value
    shift
    local -a given=()
    while IFS='=' read -r key value; do
        [[ -n "$key" ]] || continue
        given+=("$key")
        echo "ParameterKey=$key,ParameterValue=$value"
    done < <(overrides "$existing" "$@")
    if [[ $existing == update && -z "$DRY" ]]; then
        while IFS=$'\t' read -r key value; do
            [[ " ${given[*]-} " == *" $key "* ]] || echo "ParameterKey=$key,ParameterValue=$value"
        done < <(aws cloudformation describe-stacks --stack-name "$STACK" \
            --query 'Stacks[0].Parameters[].[ParameterKey,ParameterValue]' --output text)
    fi
}

cfn_deploy() {
    local mode=create
    if stack_exists; then mode=update; fi
    local -a params
    lines_into params cfn_params "$mode" "$@"
    # CAPABILITY_IAM: the stack creates a role (CloudFormation names it).
    local -a args=(--stack-name "$STACK" --template-body "file://$TEMPLATE" --capabilities CAPABILITY_IAM
        ${params[@]+--parameters "${params[@]}"})
    if [[ $mode == update ]]; then
        local out
        say "+ aws cloudformation update-stack ${args[*]}"
        if [[ -z "$DRY" ]] && ! out=$(aws cloudformation update-stack "${args[@]}" 2>&1); then
            [[ "$out" == *"No updates are to be performed"* ]] || { say "$out"; return 1; }
            say "(no changes)"
            return 0
        fi
        run aws cloudformation wait stack-update-complete --stack-name "$STACK"
    else
        run aws cloudformation create-stack "${args[@]}" >/dev/null
        run aws cloudformation wait stack-create-complete --stack-name "$STACK"
        exists=yes
    fi
}

# The pushed image by digest: a new push under the same tag is then a change CloudFormation sees.
image_uri() {
    local repo digest
    repo=$(output RepositoryUri)
    digest=$(query "sha256:<digest>" aws ecr describe-images --repository-name "${repo#*/}" \
        --image-ids "imageTag=$TAG" --query 'imageDetails[0].imageDigest' --output text)
    echo "$repo@$digest"
}

push() {
    local repo registry
    repo=$(output RepositoryUri)
    registry=${repo%%/*}
    # The 2022 `$(aws ecr get-login --no-include-email)` is gone from AWS CLI v2.
    say "+ aws ecr get-login-password | docker login --username AWS --password-stdin $registry"
    if [[ -z "$DRY" ]]; then
        aws ecr get-login-password | docker login --username AWS --password-stdin "$registry"
    fi
    # Lambda rejects multi-platform manifests: one platform, no provenance attestation.
    run docker build --platform linux/amd64 --provenance=false -f docker/streaming/Dockerfile -t "$repo:$TAG" .
    run docker push "$repo:$TAG"
}

plan() {
    local mode=create name image=()
    name="plan-$(date +%Y%m%d%H%M%S)"
    if stack_exists; then mode=update; fi
    if [[ -n "${MODEL_ID:-}" ]]; then  # then the function and trigger too, on the image push would make
        if [[ $mode == update ]]; then
            image=("ImageUri=$(output RepositoryUri):$TAG")
        else
            image=("ImageUri=<account>.dkr.ecr.$AWS_DEFAULT_REGION.amazonaws.com/<repository>:$TAG")
        fi
    fi
    local -a params
    lines_into params cfn_params "$mode" ${image[@]+"${image[@]}"}
    run aws cloudformation create-change-set --stack-name "$STACK" --change-set-name "$name" \
        --change-set-type "$(echo "$mode" | tr '[:lower:]' '[:upper:]')" --template-body "file://$TEMPLATE" --capabilities CAPABILITY_IAM \
        ${params[@]+--parameters "${params[@]}"} >/dev/null
    run aws cloudformation wait change-set-create-complete --stack-name "$STACK" --change-set-name "$name" \
        || say "(no change set: nothing would change, or the template was refused)"
    say "$mode $STACK would (action, resource, type, replacement):"
    run aws cloudformation describe-change-set --stack-name "$STACK" --change-set-name "$name" \
        --query 'Changes[].ResourceChange.[Action,LogicalResourceId,ResourceType,Replacement]' --output text
    # Leave nothing behind: the change set, and for a new stack the empty stack that holds it.
    if [[ $mode == create ]]; then
        run aws cloudformation delete-stack --stack-name "$STACK"
    else
        run aws cloudformation delete-change-set --stack-name "$STACK" --change-set-name "$name"
    fi
}

deploy() {
    if [[ -z "${MODEL_ID:-}" || -z "${EXPERIMENT_ID:-}" ]]; then
        cfn_deploy
        say "no function yet: upload the model to s3://<ModelBucket>/<EXPERIMENT_ID>/models/<MODEL_ID>/artifacts/"
        say "(ModelBucket below), then run again with MODEL_ID and EXPERIMENT_ID set: the image is built and pushed,"
        say "the function and its trigger created"
        return
    fi
    # A new stack first gets the repository the image is pushed to; then one update adds the function.
    stack_exists || cfn_deploy
    check_serving_form
    if [[ -z "${NO_BUILD:-}" ]]; then push; fi
    cfn_deploy "ImageUri=$(image_uri)"
}

# The function serves only a model's serving form: refuse a model without one before deploying it.
check_serving_form() {
    local bucket key
    bucket=$(output ModelBucket)
    key="$EXPERIMENT_ID/models/$MODEL_ID/artifacts/serving/forest.json"
    say "+ aws s3api head-object --bucket $bucket --key $key"
    if [[ -z "$DRY" ]] && ! aws s3api head-object --bucket "$bucket" --key "$key" >/dev/null 2>&1; then
        say "model $MODEL_ID has no serving form at s3://$bucket/$key, the only form the function serves:" \
            "train and log it with \`make train\` (which stores one), upload it, and deploy that model"
        exit 1
    fi
}

destroy() {
    local -a buckets
    read -r -a buckets < <(query "<ModelBucket> <PredictionsBucket>" aws cloudformation describe-stacks \
        --stack-name "$STACK" --output text \
        --query "Stacks[0].Outputs[?OutputKey=='ModelBucket' || OutputKey=='PredictionsBucket'].OutputValue")
    run aws cloudformation delete-stack --stack-name "$STACK"
    run aws cloudformation wait stack-delete-complete --stack-name "$STACK"
    say "kept (DeletionPolicy Retain): $(printf 's3://%s ' "${buckets[@]}")- deploy again with CREATE_BUCKETS=false to reuse them"
}

outputs() {
    query "" aws cloudformation describe-stacks --stack-name "$STACK" \
        --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output text
}

case "${1:-}" in
    plan | deploy | push | outputs | destroy)
        target
        "$1"
        if [[ "$1" == deploy ]]; then outputs; fi
        ;;
    *)
        sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
