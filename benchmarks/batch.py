"""Batch scoring benchmark: every comparison measured side by side in this one run.

1. February 2021 (real data + the production model): read + predict + write. The project
   (`score_month`) vs the 2022 course's code; and what the two kept helpers save over the
   library calls they imitate (`design_matrix` vs `DictVectorizer.transform`, `generate_uuids`
   vs `uuid.uuid4`), as a share of the month.
2. A backfill of --months months made from the real two (their dates moved), model loaded:
   (a) a plain loop in this process; (b) the backfill as one flow run (a task per month,
   results persisted, cache keys computed; `force`), interleaved, medians.
   (c) the backfill on a Dask cluster, 2 workers pinned one per core, vs (d) 1 worker pinned,
   next to the same months scored by plain pinned processes taking months from one queue (2 vs 1).
   (e) the work pool with Prefect's stock worker (a new process per run): what a month costs
   beyond its scoring, a measured fact with no target.

Needs the local stack (make services-up), a production model (make train) and the real
months (TLC_MIRROR). Outputs go to a scratch bucket that is removed at the end.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings

from ride_duration.aws import s3_client, storage_options
from ride_duration.batch import FULL_NAME, predicting, reading, scoring
from ride_duration.batch import paths as batch_paths
from ride_duration.batch.deploy import create_deployment
from ride_duration.batch.flows import HEARTBEATS_OFF, run_backfill
from ride_duration.config import get_settings
from ride_duration.features import prepare_features
from ride_duration.registry import resolve_model
from ride_duration.tlc import fetch_month
from workbench import workers
from workbench.stack import LocalStack

from .figures import record

BENCH_BUCKET = "nyc-duration-prediction-bench"


def score_2022(model, run_id: str, input_file: str, output_file: str, storage_options=None) -> int:
    """mlops-zoomcamp 2022, week 4 `score.py`, as it was (minus the S3 paths)."""
    df = pd.read_parquet(input_file)
    df["duration"] = df.lpep_dropoff_datetime - df.lpep_pickup_datetime
    df.duration = df.duration.dt.total_seconds() / 60
    df = df[(df.duration >= 1) & (df.duration <= 60)].copy()
    df["ride_id"] = [str(uuid.uuid4()) for _ in range(len(df))]
    categorical = ["PULocationID", "DOLocationID"]
    df[categorical] = df[categorical].astype(str)
    df["PU_DO"] = df["PULocationID"] + "_" + df["DOLocationID"]
    y_pred = model.predict(df[["PU_DO", "trip_distance"]].to_dict(orient="records"))
    df_result = pd.DataFrame({"ride_id": df["ride_id"], "lpep_pickup_datetime": df["lpep_pickup_datetime"]})
    df_result["PULocationID"], df_result["DOLocationID"] = df["PULocationID"], df["DOLocationID"]
    df_result["actual_duration"], df_result["predicted_duration"] = df["duration"], y_pred
    df_result["diff"] = df_result["actual_duration"] - df_result["predicted_duration"]
    df_result["model_version"] = run_id
    df_result.to_parquet(output_file, index=False, storage_options=storage_options)
    return len(df_result)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def best(fn, repeats: int = 5) -> float:
    return min(timed(fn)[0] for _ in range(repeats))


# ----------------------------------------------------------------------------- 1. one month
def bench_month(model, version, repeats: int, settings) -> list[tuple]:
    paths = batch_paths.get_paths("2021-03-02", "green", version, settings)
    local = reading.open_input(paths, settings)
    out_new, out_old = (f"s3://{BENCH_BUCKET}/month/{name}.parquet" for name in ("project", "course-2022"))
    paths = batch_paths.BatchPaths(paths.taxi_type, paths.year, paths.month, local, out_new)
    new, old = [], []
    for _ in range(repeats):  # interleaved: both see the same machine load
        seconds, result = timed(scoring.score_month, paths, model, version, settings=settings)
        new.append(seconds)
        old.append(timed(score_2022, model, version, local, out_old, storage_options(out_old, settings))[0])
    new_s, old_s = statistics.median(new), statistics.median(old)
    print(
        f"1. green 2021-02, {result.rows:,} rides: project {new_s:.2f} s, 2022 code {old_s:.2f} s ({old_s / new_s:.1f}x)"
    )
    return [("month_seconds", round(new_s, 3)), ("month_2022_seconds", round(old_s, 3))]


def bench_helpers(model, settings, month_seconds: float) -> list[tuple]:
    """Each kept helper vs the library call it imitates, the difference as a share of a month."""
    df, _ = reading.read_month_and_rejects(
        reading.open_input(batch_paths.get_paths("2021-03-02", "green", "x", settings), settings), settings
    )
    vectorizer = model.steps[0][1]
    rows = {
        "design_matrix": (
            best(lambda: predicting.design_matrix(model, df)),
            best(lambda: vectorizer.transform(prepare_features(df))),
        ),
        "generate_uuids": (
            best(lambda: predicting.generate_uuids(len(df))),
            best(lambda: pd.array([str(uuid.uuid4()) for _ in range(len(df))], dtype="string[pyarrow]")),
        ),
    }
    figures = []
    for name, (kept, library) in rows.items():
        loss = (library - kept) / month_seconds
        print(f"   {name}: {kept * 1000:.0f} ms, the library call {library * 1000:.0f} ms: +{loss:.0%} of a month")
        figures.append((f"{name}_library_loss_share", round(loss, 3)))
    return figures


# ----------------------------------------------------------------------------- 2. backfill
def make_months(folder: Path, n_months: int, settings) -> list[tuple[int, int]]:
    """`n_months` months of 2020 (and on), each a real month (January, February 2021 in turn)
    with its pickup and dropoff times moved into the month it stands for."""
    real = [pd.read_parquet(fetch_month("green", 2021, m, settings=settings, allow_synthetic=False)) for m in (1, 2)]
    months = []
    for i in range(n_months):
        y, m = 2020 + i // 12, i % 12 + 1
        df = real[i % 2].copy()
        shift = pd.DateOffset(months=(y - 2021) * 12 + m - (i % 2 + 1))
        for column in ("lpep_pickup_datetime", "lpep_dropoff_datetime"):
            df[column] = df[column] + shift
        df.to_parquet(folder / f"green_tripdata_{y}-{m:02d}.parquet", index=False)
        months.append((y, m))
    return months


def plain_loop(months, model, version, settings) -> float:
    start = time.perf_counter()
    for y, m in months:
        scoring.score_month(
            batch_paths.month_paths("green", y, m, version, settings=settings), model, version, settings=settings
        )
    return time.perf_counter() - start


def flow_run(months, model_uri: str, dask: str | None = None) -> float:
    (y0, m0), (y1, m1) = months[0], months[-1]
    seconds, state = timed(
        run_backfill, dask=dask, run_id=model_uri, start_date=f"{y0}-{m0:02d}", end_date=f"{y1}-{m1:02d}",
        force=True, return_state=True,
    )  # fmt: skip
    if not state.is_completed():
        raise RuntimeError(state.message)
    return seconds


def _plain_worker(core: int, months, ready, go, done) -> None:
    """One plain process on one core: load the model, wait for `go`, score months from the queue."""
    os.sched_setaffinity(0, {core})
    logging.disable(logging.WARNING)
    settings = get_settings()
    model, version = scoring.load_model_ref(resolve_model(os.environ["BENCH_MODEL_URI"], settings), settings)
    ready.release()
    go.wait()
    while (month := months.get()) is not None:
        paths = batch_paths.month_paths("green", *month, version, settings=settings)
        scoring.score_month(paths, model, version, settings=settings)
    done.put(1)


def plain_processes(months, cores: list[int]) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue, ready, go, done = ctx.Queue(), ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    for month in [*months, *[None] * len(cores)]:
        queue.put(month)
    procs = [ctx.Process(target=_plain_worker, args=(core, queue, ready, go, done)) for core in cores]
    for proc in procs:
        proc.start()
    for _ in cores:
        ready.acquire()
    start = time.perf_counter()
    go.set()
    for _ in cores:
        done.get(timeout=600)
    seconds = time.perf_counter() - start
    for proc in procs:
        proc.join()
    return seconds


def work_pool_cost(stack, months) -> float:
    """Mean seconds from submitting a run of the `monthly` deployment to its end, with one stock
    `prefect worker start` (a new process per run), one month after the other."""
    create_deployment("green")  # each run finds the production model, as the course's do
    workers.start(1, stack=stack)
    walls = []
    try:
        for y, m in months:
            parameters = {"run_date": batch_paths.run_date_for(y, m), "force": True}
            seconds, run = timed(run_deployment, FULL_NAME, parameters=parameters, timeout=600)
            if not run.state.is_completed():
                raise RuntimeError(f"{FULL_NAME} {y}-{m:02d}: {run.state.message}")
            walls.append(seconds)
    finally:
        workers.stop(stack)
    return statistics.mean(walls)


def bench_backfill(
    stack, settings, model, version, model_uri: str, tmp: Path, n_months: int, pairs: int
) -> list[tuple]:
    months = make_months(tmp, n_months, settings)
    os.environ["BATCH_INPUT_PREFIX"] = str(tmp)  # the flows, the Dask workers and the plain processes read them there
    os.environ["BENCH_MODEL_URI"] = model_uri
    settings = get_settings()
    a, b = [], []
    flow_run(months[:1], model_uri)  # Prefect's first flow run in this process pays for its imports
    for i in range(2 * pairs):  # a b b a a b ...: each pair's two runs side by side, in both orders
        for run in ("a", "b") if i % 2 == 0 else ("b", "a"):
            walls = a if run == "a" else b
            walls.append(plain_loop(months, model, version, settings) if run == "a" else flow_run(months, model_uri))
    a_s, b_s = statistics.median(a), statistics.median(b)
    share = statistics.median(y / x - 1 for x, y in zip(a, b))  # per pair: the load swings between pairs
    over = share * a_s / n_months
    print(f"2. {n_months} months: (a) plain loop {a_s:.1f} s, (b) one flow run {b_s:.1f} s (medians of {len(a)}): "
          f"{over:+.3f} s per month, {share:+.1%} (median per pair; targets <= 0.3 s, <= 10%)")  # fmt: skip
    c, d, one, two = [], [], [], []
    for count, walls in ((2, c), (1, d)):
        with workers.dask_cluster(count, stack.local_dir / "logs", cores=[0, 1][:count]) as cluster:
            flow_run(months[: 2 * count], model_uri, cluster.address)  # each worker: imports and model loaded
            for _ in range(pairs):
                walls.append(flow_run(months, model_uri, cluster.address))
    for _ in range(pairs):
        one.append(plain_processes(months, [1]))
        two.append(plain_processes(months, [0, 1]))
    dask_ratio = statistics.median(d) / statistics.median(c)
    plain_ratio = statistics.median(one) / statistics.median(two)
    print(f"   (c) Dask, 2 workers pinned {statistics.median(c):.1f} s, (d) 1 pinned {statistics.median(d):.1f} s: "
          f"{dask_ratio:.2f}x; plain processes 2 vs 1: {plain_ratio:.2f}x; "
          f"{dask_ratio / plain_ratio:.2f} of it (target >= 0.85)")  # fmt: skip
    pool = work_pool_cost(stack, months[:2]) - a_s / n_months
    print(f"   (e) work pool, stock worker: {pool:.1f} s per month beyond (a)'s scoring (a new process per run)")
    return [
        ("months", n_months),
        ("plain_loop_seconds", round(a_s, 2)),
        ("flow_run_seconds", round(b_s, 2)),
        ("flow_overhead_per_month_seconds", round(over, 3)),
        ("flow_overhead_share", round(share, 3)),
        ("dask_2_workers_seconds", round(statistics.median(c), 2)),
        ("dask_1_worker_seconds", round(statistics.median(d), 2)),
        ("dask_2_vs_1", round(dask_ratio, 2)),
        ("plain_2_vs_1", round(plain_ratio, 2)),
        ("dask_scaling_share_of_plain", round(dask_ratio / plain_ratio, 2)),
        ("work_pool_per_month_beyond_scoring_seconds", round(pool, 1)),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--pairs", type=int, default=2, help="interleaved repeats of (a)/(b), (c), (d)")
    args = parser.parse_args(argv)
    stack = LocalStack.from_settings(quiet=True)
    stack.up()
    stack.activate()
    os.environ["PREDICTIONS_BUCKET"] = BENCH_BUCKET  # never mix bench outputs with the course's dataset
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"  # the Dask workers' and the stock worker's
    logging.getLogger("prefect").setLevel(logging.WARNING)
    logging.getLogger("ride_duration").setLevel(logging.ERROR)  # February's rejects, once per repeat
    settings = get_settings()
    s3 = s3_client(settings)
    try:
        s3.create_bucket(Bucket=BENCH_BUCKET, CreateBucketConfiguration={"LocationConstraint": settings.aws_region})
    except s3.exceptions.BucketAlreadyOwnedByYou:  # left by an interrupted run; emptied at the end
        pass
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start (other work skews wall times)")
    # Prefect read its settings when this module imported it, before the stack's URL was set; heartbeats
    # off once here, as the CLI has them for its one backfill (`run_backfill`), not again in each run.
    with temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"], **HEARTBEATS_OFF}):
        try:
            ref = resolve_model(None, settings)
            model, version = scoring.load_model_ref(ref, settings)
            figures = bench_month(model, version, args.repeats, settings)
            figures += bench_helpers(model, settings, dict(figures)["month_seconds"])
            with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
                figures += bench_backfill(stack, settings, model, version, ref.uri, Path(tmp), args.months, args.pairs)
        finally:
            workers.stop(stack)
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BENCH_BUCKET):
                for item in page.get("Contents", []):
                    s3.delete_object(Bucket=BENCH_BUCKET, Key=item["Key"])
            s3.delete_bucket(Bucket=BENCH_BUCKET)
    figures.append(("load_average_at_end", round(os.getloadavg()[0], 1)))
    print(f"recorded in {record('batch', dict(figures))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
