"""Faults with real processes: a backfill SIGKILLed between months, a Dask worker SIGKILLed
mid-month, S3 SIGKILLed mid-month, a month whose file lost a column."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ride_duration.config import get_settings
from ride_duration.tlc import write_synthetic_month

from .helpers import list_keys, month_with_bad_rows, wait_for
from .test_flows import task_states

REPO = Path(__file__).resolve().parents[2]


def _months(folder: Path, source: Path, months: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    for month in months:
        shutil.copy(source, folder / f"green_tripdata_{month}.parquet")
    return folder


def _backfill(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "score_backfill.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_backfill_killed_between_months_resumes_without_rescoring(batch_stack, batch_model, tmp_path):
    months = ["2019-01", "2019-02", "2019-03"]
    # Months of a real green month's size (60,000 rides, most of a second each, scored one after another):
    # with tiny ones every month could be done before the first look.
    source = write_synthetic_month(tmp_path / "month.parquet", 2021, 2, n_rows=60_000)
    env = {**os.environ, "BATCH_INPUT_PREFIX": str(_months(tmp_path / "in", source, months))}
    bucket = get_settings().predictions_bucket

    def results() -> list[str]:  # the persisted summaries: one per month scored to the end
        return [k for k in list_keys(bucket, "_prefect-results/") if "-2019-" in k]

    args = ("--start", months[0], "--end", months[-1], "--run-id", batch_model.run_id)
    killed = _backfill(env, *args)
    wait_for(lambda: results() or killed.poll() is not None, 120, "a month scored")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, killed.stderr.read()
    done = [re.search(r"green-(\d{4}-\d{2})-", key)[1] for key in results()]  # green-2019-01-<run>-<md5>
    assert 1 <= len(done) < len(months)

    rerun = _backfill(env, *args)
    out, err = rerun.communicate(timeout=180)
    assert rerun.returncode == 0, err
    assert [line[:7] for line in out.splitlines()] == months
    flow_run_id = next(line for line in err.splitlines() if line.startswith("flow run ")).split()[2].rstrip(":")
    states = dict(zip(months, task_states(flow_run_id, len(months))))
    assert states == {m: "Cached" if m in done else "Completed" for m in months}
    for month in months:
        y, m = month.split("-")
        assert list_keys(bucket, f"taxi_type=green/year={y}/month={m}/") == [
            f"taxi_type=green/year={y}/month={m}/{batch_model.run_id}.parquet"
        ]


def test_a_dask_worker_killed_mid_month_has_it_scored_once_elsewhere(batch_stack, batch_model, tmp_path):
    from distributed import Client
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from ride_duration.batch.flows import run_backfill
    from workbench.workers import dask_cluster, kill

    folder = tmp_path / "in"
    folder.mkdir()
    write_synthetic_month(folder / "green_tripdata_2019-08.parquet", 2019, 8, n_rows=400_000)
    env = {"BATCH_INPUT_PREFIX": str(folder), "PREFECT_LOGGING_LEVEL": "INFO"}  # INFO: the month's lines
    os.environ["BATCH_INPUT_PREFIX"] = str(folder)  # the fixture restores the environment
    outcome = {}
    with dask_cluster(2, tmp_path / "logs", env=env) as cluster, Client(cluster.address) as client:
        run = threading.Thread(
            target=lambda: outcome.update(
                state=run_backfill(
                    dask=cluster.address,
                    run_id=batch_model.run_id,
                    start_date="2019-08",
                    end_date="2019-08",
                    return_state=True,
                )
            )
        )
        run.start()
        busy = wait_for(lambda: [a for a, keys in client.processing().items() if keys], 60, "a worker taking the month")
        name = client.scheduler_info()["workers"][busy[0]]["name"]
        time.sleep(1.0)  # into the month: its model loaded, its rides being read and scored
        victim = cluster.workers[int(name.rsplit("-", 1)[1]) - 1]
        kill(victim.pid)
        run.join(180)
    state = outcome["state"]
    assert state.is_completed(), state.message
    (summary,) = state.result()
    bucket = get_settings().predictions_bucket
    assert list_keys(bucket, "taxi_type=green/year=2019/month=08/") == [
        f"taxi_type=green/year=2019/month=08/{batch_model.run_id}.parquet"
    ]
    logs = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))

    def written() -> list[str]:
        with get_client(sync_client=True) as prefect:
            return [log.message for log in prefect.read_logs(log_filter=logs) if ": wrote " in log.message]

    assert len(wait_for(written, 20, "the month's log")) == 1 and f"wrote {summary['rows']} predictions" in written()[0]


@pytest.fixture
def own_s3(tmp_path):
    """A SeaweedFS of this test's own, to kill."""
    from workbench.stack import LocalStack, free_port

    stack = LocalStack(local_dir=tmp_path / "own", ports={"s3": free_port()}, quiet=True)
    stack.up(("s3",))
    yield stack
    stack.down()


def test_s3_killed_mid_month_publishes_nothing_and_says_so_in_one_sentence(
    batch_stack, batch_model, synthetic_months, own_s3, tmp_path
):
    import boto3
    import mlflow

    model_dir = mlflow.artifacts.download_artifacts(
        artifact_uri=batch_model.model_uri, dst_path=str(tmp_path / "model")
    )
    folder = tmp_path / "in"
    folder.mkdir()
    # A month with a rejected ride: its rejects file must not appear either.
    month_with_bad_rows(
        synthetic_months[(2021, 2)], folder / "green_tripdata_2019-09.parquet", {5: {"trip_distance": -1.0}}
    )
    staging = tmp_path / "staging"
    staging.mkdir()
    url = own_s3.url("s3")
    env = {**os.environ, "BATCH_INPUT_PREFIX": str(folder), "TMPDIR": str(staging), "AWS_ENDPOINT_URL_S3": url}
    env.update(MLFLOW_S3_ENDPOINT_URL=url, AWS_MAX_ATTEMPTS="1")  # a dead endpoint fails at once, not after backoffs
    settings = get_settings()
    s3 = boto3.client("s3", endpoint_url=url, region_name=settings.aws_region)
    assert s3.list_objects_v2(Bucket=settings.predictions_bucket).get("KeyCount") == 0  # `up` made it
    score = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "score.py"), "--year", "2019", "--month", "9", "--run-id", model_dir],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: list(staging.glob(".batch-*")) or score.poll() is not None, 120, "the month being scored")
    assert score.poll() is None, score.communicate()
    os.kill(own_s3.pid("s3"), signal.SIGKILL)
    out, err = score.communicate(timeout=180)
    assert score.returncode == 1 and "Traceback" not in err, err
    sentence = err.strip().splitlines()[-1]
    assert (
        sentence.startswith("error: 1 of 1 month(s) failed: green 2019-09: writing s3://") and f" at {url} " in sentence
    )
    assert "EndpointConnectionError" in sentence and "not published" in sentence

    own_s3.up(("s3",))  # back on its disk: what did the month leave there?
    listing = s3.list_objects_v2(Bucket=settings.predictions_bucket).get("Contents", [])
    assert [o["Key"] for o in listing] == []
    assert s3.list_multipart_uploads(Bucket=settings.predictions_bucket).get("Uploads", []) == []


def test_schema_drift_month_is_one_sentence_without_a_traceback(
    batch_stack, batch_model, synthetic_months, tmp_path, capfd
):
    import pandas as pd

    from ride_duration.batch import cli

    folder = tmp_path / "in"
    folder.mkdir()
    pd.read_parquet(synthetic_months[(2021, 2)]).drop(columns=["trip_distance"]).to_parquet(
        folder / "green_tripdata_2019-10.parquet"
    )
    os.environ["BATCH_INPUT_PREFIX"] = str(folder)
    assert cli.backfill_main(["--start", "2019-10", "--end", "2019-10", "--run-id", batch_model.run_id]) == 1
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err
    assert err.strip().splitlines()[-1] == (
        f"error: 1 of 1 month(s) failed: green 2019-10: {folder}/green_tripdata_2019-10.parquet "
        "is missing required column(s): trip_distance"
    )
