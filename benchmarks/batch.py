"""Batch scoring benchmark: every comparison measured side by side in this one run.

1. February 2021 (real data + the production model): read + predict + write, model
   load excluded. The project (`score_month`) vs the 2022 course's code (full read,
   `to_dict(orient="records")`, a Python list of uuid4 strings, single-threaded forest,
   `df.to_parquet`). Interleaved, median of --repeats.
2. A synthetic month of --big-rows rows (yellow-taxi scale) scored in a child process:
   wall time and peak RSS (getrusage RUSAGE_CHILDREN).
3. A backfill of --months months made from the real ones (January and February 2021 in
   turn, their dates moved to the month they stand for), scored
   (a) directly in one plain process (import, model load and every month, one after the other),
   (b) through the work pool by 1 worker, (c) by 2 workers each pinned to one core,
   (d) by 1 worker pinned to one core; (b)-(d) for each kind of worker (--kinds): `warm`
   (`ride_duration.batch.worker`: months in the worker's own process) and `process` (Prefect's:
   a new process per month). The orchestration overhead is (b) - (a), per month and as a share
   of (b); where it goes is read from Prefect's own state times of each month's run, and the
   Prefect server's CPU time during (b) is read from /proc (it shares the machine's cores).
   (d)/(c) is compared with the machine's own 2-process ceiling, and with what the same months
   gain from a second core with no orchestrator at all (plain processes, one per core, taking
   months from one queue).

Needs the local stack (make services-up), a production model (make train) and the real
months (TLC_MIRROR). Outputs go to a scratch bucket that is removed at the end; the
benchmark starts and stops its own workers.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import mlflow
import pandas as pd
from prefect import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from ride_duration.aws import s3_client, storage_options
from ride_duration.batch import paths as batch_paths
from ride_duration.batch import scoring
from ride_duration.batch.deploy import create_deployment
from ride_duration.batch.flows import run_backfill
from ride_duration.batch.pool import month_runs
from ride_duration.config import get_settings
from ride_duration.registry import resolve_model
from ride_duration.tlc import fetch_month, write_synthetic_month
from workbench import workers
from workbench.stack import LocalStack

BENCH_BUCKET = "nyc-duration-prediction-bench"
WORKER_KINDS = {
    "warm": "python -m ride_duration.batch worker: each month in the worker's own process",
    "process": "Prefect's prefect worker start: each month in a new process",
}


# ----------------------------------------------------------------------------- the 2022 course's code
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
    dicts = df[["PU_DO", "trip_distance"]].to_dict(orient="records")
    y_pred = model.predict(dicts)
    df_result = pd.DataFrame()
    df_result["ride_id"] = df["ride_id"]
    df_result["lpep_pickup_datetime"] = df["lpep_pickup_datetime"]
    df_result["PULocationID"] = df["PULocationID"]
    df_result["DOLocationID"] = df["DOLocationID"]
    df_result["actual_duration"] = df["duration"]
    df_result["predicted_duration"] = y_pred
    df_result["diff"] = df_result["actual_duration"] - df_result["predicted_duration"]
    df_result["model_version"] = run_id
    df_result.to_parquet(output_file, index=False, storage_options=storage_options)
    return len(df_result)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(r) -> str:
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"

    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# ----------------------------------------------------------------------------- 1. one month
def bench_month(model, version, repeats: int, settings) -> list[tuple]:
    paths = batch_paths.get_paths("2021-03-02", "green", version, settings)
    local = scoring.open_input(paths, settings)
    out_new = f"s3://{BENCH_BUCKET}/month/project.parquet"
    out_old = f"s3://{BENCH_BUCKET}/month/course-2022.parquet"
    paths = batch_paths.BatchPaths(paths.taxi_type, paths.year, paths.month, local, out_new)
    new, old = [], []
    for _ in range(repeats):  # interleaved: both see the same machine load
        seconds, result = timed(scoring.score_month, paths, model, version, settings=settings)
        new.append(seconds)
        seconds, rows = timed(score_2022, model, version, local, out_old, storage_options(out_old, settings))
        old.append(seconds)
    # The 2022 code scores every ride of 1-60 minutes; the project rejects the few the contract refuses.
    assert rows == result.rows + result.rejected
    new_s, old_s = statistics.median(new), statistics.median(old)
    print(
        f"\n1. green 2021-02, {result.rows:,} rides scored ({result.rejected} rejected), RMSE {result.rmse:.3f} "
        f"(median of {repeats})"
    )
    rows_ = [
        ("project (score_month)", f"{new_s:.2f} s", "1.00x"),
        ("2022 course (score.py)", f"{old_s:.2f} s", f"{old_s / new_s:.2f}x slower"),
    ]
    print(table(rows_, ("implementation", "read+predict+write", "ratio")))
    return [
        ("Feb 2021 one month, project", f"{new_s:.2f} s"),
        ("Feb 2021 one month, 2022 code", f"{old_s:.2f} s"),
        ("speed-up vs 2022", f"{old_s / new_s:.2f}x"),
        ("RMSE Feb 2021 (rides scored)", f"{result.rmse:.3f}"),
        ("rides rejected Feb 2021", f"{result.rejected}"),
    ]


# ----------------------------------------------------------------------------- 2. a big month
BIG_CHILD = """
import json, sys, time
from pathlib import Path
from ride_duration.batch import paths as batch_paths, scoring
from ride_duration.config import get_settings
from ride_duration.registry import load_model_folder
model, meta = load_model_folder(Path(sys.argv[1]))
paths = batch_paths.BatchPaths("green", 2021, 2, sys.argv[2], sys.argv[3])
start = time.perf_counter()
if sys.argv[4] == "project":
    rows = scoring.score_month(paths, model, meta["run_id"], settings=get_settings()).rows
else:
    from benchmarks.batch import score_2022
    rows = score_2022(model, meta["run_id"], sys.argv[2], sys.argv[3])
print(json.dumps({"seconds": time.perf_counter() - start, "rows": rows}))
"""


def run_child(code: str, args: list[str]) -> tuple[dict, float]:
    """Run `code` in a fresh process; returns its last line of JSON and its peak RSS in GB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kb <= before:  # ru_maxrss is the max over all children so far
        print("   (peak RSS not above an earlier child's; reported as <= that)")
    return json.loads(out.stdout.strip().splitlines()[-1]), peak_kb / 1024 / 1024


def bench_big(model_dir: Path, tmp: Path, n_rows: int, with_2022: bool) -> list[tuple]:
    source = tmp / f"green_tripdata_big_{n_rows}.parquet"
    seconds, _ = timed(write_synthetic_month, source, 2021, 2, n_rows=n_rows)
    print(f"\n2. synthetic month of {n_rows:,} rows (generated in {seconds:.0f} s, not counted)")
    rows_ = []
    out, rss = run_child(BIG_CHILD, [str(model_dir), str(source), str(tmp / "big-project.parquet"), "project"])
    rows_.append(("project, batches of 250k", f"{out['rows']:,}", f"{out['seconds']:.1f} s", f"{rss:.2f} GB"))
    result = [(f"{n_rows:,}-row month, project", f"{out['seconds']:.1f} s, peak RSS {rss:.2f} GB")]
    if with_2022:
        old, old_rss = run_child(BIG_CHILD, [str(model_dir), str(source), str(tmp / "big-2022.parquet"), "2022"])
        rows_.append(
            ("2022 course (all in memory)", f"{old['rows']:,}", f"{old['seconds']:.1f} s", f"{old_rss:.2f} GB")
        )
        result.append((f"{n_rows:,}-row month, 2022 code", f"{old['seconds']:.1f} s, peak RSS {old_rss:.2f} GB"))
    print(table(rows_, ("implementation", "rides scored", "wall", "peak RSS (process)")))
    return result


# ----------------------------------------------------------------------------- 3. backfill
DIRECT_CHILD = """
import json, sys, time
start = time.perf_counter()
from ride_duration.batch import paths as batch_paths, scoring
from ride_duration.config import get_settings
from ride_duration.registry import resolve_model
settings = get_settings()
ref = resolve_model(sys.argv[1], settings)
model, version = scoring.load_model_ref(ref, settings)
ready = time.perf_counter()
months = json.loads(sys.argv[2])
for y, m in months:
    scoring.score_month(batch_paths.month_paths("green", y, m, version, settings=settings), model, version, settings=settings)
print(json.dumps({"seconds": time.perf_counter() - start, "setup": ready - start}))
"""


def make_months(folder: Path, n_months: int, settings) -> list[tuple[int, int]]:
    """`n_months` months of 2020 (and on), each a real month (January, February 2021 in turn)
    with its pickup and dropoff times moved into the month it stands for."""
    real = [
        pd.read_parquet(fetch_month("green", 2021, m, settings=settings, allow_synthetic=False, progress=False))
        for m in (1, 2)
    ]
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its reaped children (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def pool_backfill(stack, model_uri: str, months, count: int, pin: bool, kind: str) -> dict:
    """Start `count` workers of `kind`, run the backfill through the pool, stop them; the wall
    time, where each month's time went (from the state times Prefect recorded for its run) and
    the Prefect server's CPU time meanwhile."""
    workers.start(count, stack=stack, pin=pin, kind=kind)
    server = stack.pid("prefect")
    server_log = stack.local_dir / "logs" / "prefect.log"
    log_start = server_log.stat().st_size
    try:
        server_cpu = cpu_seconds(server)
        (y0, m0), (y1, m1) = months[0], months[-1]
        start = time.perf_counter()
        state = run_backfill(  # as the CLI runs it
            taxi_type="green",
            run_id=model_uri,
            start_date=f"{y0:04d}-{m0:02d}",
            end_date=f"{y1:04d}-{m1:02d}",
            return_state=True,
        )
        wall = time.perf_counter() - start
        server_cpu = cpu_seconds(server) - server_cpu
        if not state.is_completed():
            raise RuntimeError(state.message)
        parent = state.state_details.flow_run_id
    finally:
        workers.stop(stack)
    scoring_seconds = sum(r["seconds"] for r in state.result())
    with get_client(sync_client=True) as client:
        phases = [_phases(client.read_flow_run_states(run.id)) for run in month_runs(parent)]
    return {
        "wall": wall,
        "scoring": scoring_seconds,
        "startup": sum(p["startup"] for p in phases),
        "in_run": sum(p["in_run"] for p in phases),
        "server_cpu": server_cpu,
        "locked": sqlite_lock_errors(server_log, log_start),
    }


def sqlite_lock_errors(server_log: Path, start: int) -> int:
    """Requests and state writes the Prefect server's SQLite refused ("database is locked")
    since byte `start` of its log (the stack has the server log them). A refused request is
    answered 503 and the client tries again 2 s later (then 4, 8 s)."""
    with open(server_log, "rb") as log:
        log.seek(start)
        text = log.read()
    return text.count(b"Encountered retryable exception in request") + text.count(
        b"Encountered error during state validation"
    )


def _phases(states) -> dict:
    """Seconds a month's run spent from taken (Pending) to Running (a new process: Python,
    Prefect, the flow's imports) and from Running to Completed (model, scoring, results)."""
    first = {}
    for s in sorted(states, key=lambda s: s.timestamp):
        first.setdefault(s.type.value, s.timestamp)
    return {
        "startup": (first["RUNNING"] - first["PENDING"]).total_seconds(),
        "in_run": (first["COMPLETED"] - first["RUNNING"]).total_seconds(),
    }


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i % 7
    return total


def machine_ceiling(units: int = 4, n: int = 5_000_000, repeats: int = 3) -> float:
    """Median speed-up of embarrassingly parallel pure-Python work in 2 processes
    (pool started beforehand): the most any 2-way parallel backfill can reach here."""
    ratios = []
    with multiprocessing.get_context("spawn").Pool(2) as procs:
        procs.map(_spin, [1, 1])  # processes up before timing
        for _ in range(repeats):
            seq, _ = timed(lambda: [_spin(n) for _ in range(units)])
            par, _ = timed(procs.map, _spin, [n] * units)
            ratios.append(seq / par)
    return statistics.median(ratios)


def _plain_worker(core: int, months, ready, go, done) -> None:
    """One plain process on one core: load the model, wait for `go`, then score months from the
    shared queue until it is empty (as pool workers take the next run when one ends)."""
    os.sched_setaffinity(0, {core})
    logging.disable(logging.WARNING)  # each month's rejects line
    settings = get_settings()
    model, version = scoring.load_model_ref(resolve_model(os.environ["BENCH_MODEL_URI"], settings), settings)
    ready.release()
    go.wait()
    count = 0
    while (month := months.get()) is not None:
        y, m = month
        paths = batch_paths.month_paths("green", y, m, version, settings=settings)
        scoring.score_month(paths, model, version, settings=settings)
        count += 1
    done.put(count)


def plain_processes(months, cores: list[int]) -> float:
    """Seconds for len(cores) plain processes, each pinned to one of `cores`, to score `months`
    from a shared queue, timed from when every one has its model loaded: (c) and (d) with no
    orchestrator, so what the work itself gains from a second core here (memory, the S3
    server and the rest of the machine included)."""
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
    counts = [done.get(timeout=600) for _ in cores]
    seconds = time.perf_counter() - start
    for proc in procs:
        proc.join()
    assert sum(counts) == len(months), counts
    return seconds


# Pairs of (c) and (d) per kind, interleaved (c, d, c, d, ...): a 12-month backfill of ~0.5 s months
# swings with whatever else the 2 cores run, so the scaling is the median of the pairs' ratios.
# Prefect's process worker takes ~4 min a pair: one by default.
PAIRS = {"warm": 3, "process": 1}


def _all(values: list[float], spec: str) -> str:
    """' (v1, v2, ...)' after a median of several values; nothing after a single one."""
    return f" ({', '.join(format(v, spec) for v in values)})" if len(values) > 1 else ""


def bench_backfill(
    stack, settings, model_uri: str, tmp: Path, n_months: int, kinds: list[str], pairs: int | None = None
) -> list[tuple]:
    folder = tmp / "months"
    folder.mkdir()
    months = make_months(folder, n_months, settings)
    # The workers and the direct process read the months from there (they inherit the environment).
    os.environ["BATCH_INPUT_PREFIX"] = str(folder)
    load = os.getloadavg()[0]
    direct, _ = run_child(DIRECT_CHILD, [model_uri, json.dumps(months)])
    a, setup = direct["seconds"], direct["setup"]
    print(f"\n3. backfill of {n_months} months made from the real ones (~70k rides each), one run each")
    print(
        f"(a) direct, one plain process: {a:.1f} s, of which {setup:.1f} s import and model load "
        f"(load average {load:.1f} at start)"
    )
    # The machine is shared: the ceiling is measured around each (c) and (d), and the load is
    # printed with each mode, so a ratio taken while something else ran shows as such.
    ceilings = [machine_ceiling()]
    os.environ["BENCH_MODEL_URI"] = model_uri  # for the plain processes
    plain = []  # (seconds on 1 core, seconds on 2 cores) pairs, measured beside each (c)/(d) pair
    summary = []
    for kind in kinds:
        runs, loads = {"c": [], "d": []}, {"c": [], "d": []}
        loads["b"] = os.getloadavg()[0]
        runs["b"] = pool_backfill(stack, model_uri, months, 1, pin=False, kind=kind)
        n_pairs = pairs or PAIRS[kind]
        for _ in range(n_pairs):
            for key, count in (("c", 2), ("d", 1)):
                loads[key].append(os.getloadavg()[0])
                runs[key].append(pool_backfill(stack, model_uri, months, count, pin=True, kind=kind))
                ceilings.append(machine_ceiling())
            plain.append((plain_processes(months, [1]), plain_processes(months, [0, 1])))
        b = runs["b"]["wall"]
        c_walls, d_walls = ([r["wall"] for r in runs[k]] for k in "cd")
        ratios = [d_ / c_ for c_, d_ in zip(c_walls, d_walls)]
        c, d, scaling = statistics.median(c_walls), statistics.median(d_walls), statistics.median(ratios)

        refused = {k: sum(r["locked"] for r in runs[k]) for k in "cd"} | {"b": runs["b"]["locked"]}

        rows = [
            ("(b) work pool, 1 worker", f"{b:.1f} s", f"{b / a:.2f}x (a)", f"{loads['b']:.1f}", refused["b"]),
            (
                "(c) work pool, 2 workers, one core each",
                f"{c:.1f} s{_all(c_walls, '.1f')}",
                f"{scaling:.2f}x faster than (d){_all(ratios, '.2f')}",
                ", ".join(f"{x:.1f}" for x in loads["c"]),
                refused["c"],
            ),
            (
                "(d) work pool, 1 worker on one core",
                f"{d:.1f} s{_all(d_walls, '.1f')}",
                "",
                ", ".join(f"{x:.1f}" for x in loads["d"]),
                refused["d"],
            ),
        ]
        if n_pairs > 1:
            print(
                f"\n(c) and (d) run {n_pairs} times, interleaved; walls and the scaling are medians (all in brackets)"
            )
        print(f"\n{kind} workers ({WORKER_KINDS[kind]})")
        print(table(rows, ("mode", "wall", "", "load average at start", "writes SQLite refused (503, retried in 2 s)")))
        overhead = b - a
        per_month = overhead / n_months
        rb = runs["b"]
        pickup = rb["wall"] - rb["startup"] - rb["in_run"]
        print(
            f"orchestration overhead (b) - (a): {overhead:.1f} s, {per_month:.2f} s per month, {overhead / b:.0%} of (b) "
            "(targets: <= 0.3 s per month, <= 15%)"
        )
        # A warm worker has imported everything and loaded the model before its first run; (a) pays both.
        bare = b - (a - setup)
        print(
            f"(b) minus (a)'s scoring alone (the worker imported and loaded the model before its first run): "
            f"{bare:.1f} s, {bare / n_months:.2f} s per month, {bare / b:.0%} of (b)"
        )
        print(
            f"where (b)'s time went, per month: {rb['startup'] / n_months:.2f} s from taken to running, "
            f"{(rb['in_run'] - rb['scoring']) / n_months:.2f} s running but not scoring (model lookup and load, "
            f"result to S3, final states), {rb['scoring'] / n_months:.2f} s scoring, {pickup / n_months:.2f} s waiting "
            f"for a worker to take it and the backfill to see it finish; the Prefect server used "
            f"{rb['server_cpu'] / n_months:.2f} s of CPU per month, on the same 2 cores"
        )
        print(f"2 workers vs 1, one core each: {scaling:.2f}x (median of {n_pairs} pair(s))")
        summary += [
            (f"{kind}: {n_months}-month backfill, (b) 1 worker", f"{b:.1f} s"),
            (
                f"{kind}: (c) 2 workers pinned / (d) 1 worker pinned, medians of {n_pairs}",
                f"{c:.1f} s / {d:.1f} s; {scaling:.2f}x{_all(ratios, '.2f')}",
            ),
            (f"{kind}: orchestration overhead per month / share of (b)", f"{per_month:.2f} s / {overhead / b:.0%}"),
            (
                f"{kind}: (b) minus (a)'s scoring alone, per month / share of (b)",
                f"{bare / n_months:.2f} s / {bare / b:.0%}",
            ),
            (
                f"{kind}: per month: taken->running / not scoring / scoring / waiting; server CPU",
                f"{rb['startup'] / n_months:.2f} / {(rb['in_run'] - rb['scoring']) / n_months:.2f} / "
                f"{rb['scoring'] / n_months:.2f} / {pickup / n_months:.2f} s; {rb['server_cpu'] / n_months:.2f} s",
            ),
        ]
    ceiling = statistics.median(ceilings)
    print(
        f"\nthis machine's ceiling (2 processes vs 1, pure Python): {ceiling:.2f}x "
        f"(median of {', '.join(f'{x:.2f}' for x in ceilings)}); target for (d)/(c): >= {0.85 * ceiling:.2f}x"
    )
    one, two = (statistics.median(x) for x in zip(*plain))
    work = [o / t for o, t in plain]
    print(
        f"the same {n_months} months with no orchestrator, plain processes taking months from one queue, "
        f"model loaded: 1 on one core {one:.1f} s, 2 on one core each {two:.1f} s: "
        f"{statistics.median(work):.2f}x{_all(work, '.2f')}, {statistics.median(work) / ceiling:.2f} of the ceiling"
    )
    return [
        (f"{n_months}-month backfill, direct (a); of which import + model load", f"{a:.1f} s; {setup:.1f} s"),
        *summary,
        ("2-process ceiling; target (d)/(c) >= 0.85 of it", f"{ceiling:.2f}x; {0.85 * ceiling:.2f}x"),
        (
            "same months, plain processes, 2 vs 1 on one core each",
            f"{two:.1f} s / {one:.1f} s; {statistics.median(work):.2f}x{_all(work, '.2f')}",
        ),
    ]


def main(argv=None) -> int:
    stack = LocalStack.from_settings(quiet=True)
    stack.up()
    stack.activate()
    # Prefect read its settings when this module imported it, before the stack's URL was set:
    # without this the flows here would talk to a temporary server of their own.
    with temporary_settings(updates={PREFECT_API_URL: os.environ["PREFECT_API_URL"]}):
        return _main(stack, argv)


def _main(stack: LocalStack, argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big-rows", type=int, default=3_000_000)
    parser.add_argument("--big-2022", action="store_true", help="also run the 2022 code on the big month (slow)")
    parser.add_argument("--months", type=int, default=12)
    parser.add_argument("--pairs", type=int, help=f"(c)/(d) pairs per worker kind, interleaved (default: {PAIRS})")
    parser.add_argument(
        "--kinds", default="warm,process", help="comma list of worker kinds to run the backfill on: warm,process"
    )
    parser.add_argument("--skip", default="", help="comma list of sections to skip: month,big,backfill")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    if "backfill" not in skip:
        # Before the bucket changes below: the runs' results stay where the course's runs put theirs.
        create_deployment(get_settings())
    os.environ["PREDICTIONS_BUCKET"] = BENCH_BUCKET  # never mix bench outputs with the course's dataset
    logging.getLogger("prefect").setLevel(logging.WARNING)  # the backfills' INFO lines would bury the tables
    logging.getLogger("ride_duration").setLevel(logging.ERROR)  # February's 26 rejects, once per repeat
    settings = get_settings()
    s3 = s3_client(settings)
    try:
        s3.create_bucket(Bucket=BENCH_BUCKET, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    except s3.exceptions.BucketAlreadyOwnedByYou:  # left by an interrupted run; emptied at the end
        pass
    summary = []
    print(
        f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start "
        "(other work on the machine skews wall times)"
    )
    try:
        ref = resolve_model(None, settings)
        model, version = scoring.load_model_ref(ref, settings)
        with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
            tmp = Path(tmp)
            if "month" not in skip:
                summary += bench_month(model, version, args.repeats, settings)
            if "big" not in skip:
                model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(tmp / "model")))
                summary += bench_big(model_dir, tmp, args.big_rows, args.big_2022)
            if "backfill" not in skip:
                kinds = [k for k in args.kinds.split(",") if k]
                if unknown := set(kinds) - set(WORKER_KINDS):
                    parser.error(f"unknown worker kinds {sorted(unknown)}: choose from {sorted(WORKER_KINDS)}")
                summary += bench_backfill(stack, settings, ref.uri, tmp, args.months, kinds, args.pairs)
    finally:
        workers.stop(stack)
        keys = [
            o["Key"]
            for p in s3.get_paginator("list_objects_v2").paginate(Bucket=BENCH_BUCKET)
            for o in p.get("Contents", [])
        ]
        for key in keys:
            s3.delete_object(Bucket=BENCH_BUCKET, Key=key)
        s3.delete_bucket(Bucket=BENCH_BUCKET)
    print("\nsummary")
    print(table(summary, ("figure", "value")))
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
