"""The `monthly` deployment: cron `0 3 2 * *` (03:00 UTC on day 2), served by a runner.

2022 (Prefect 2 beta/Orion): `DeploymentSpec(...)` in a file + `prefect deployment
create`; Prefect 2.x: `Deployment.build_from_flow(...)`. Neither exists in Prefect 3.
The simplest current way without Docker or a work pool is `flow.to_deployment(...)`
(registers name, schedule, parameters, tags) and `serve(...)`, a long-running
process that polls the server and executes each due run in a subprocess.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect.deployments.runner import EntrypointType
from prefect.schedules import Cron

from .flows import FLOW_NAME, ride_duration_prediction

DEPLOYMENT_NAME = "monthly"
CRON = "0 3 2 * *"
TIMEZONE = "UTC"
TAGS = ["ml"]
FULL_NAME = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"


def monthly_deployment(taxi_type: str = "green", model: str | None = None):
    """The deployment object (nothing sent to the server yet).

    Without `model`, each run finds its model as the services do, in the runner's
    environment (MODEL_URI; MODEL_ID + EXPERIMENT_ID from S3; else the registry alias,
    resolved to a version at each run, so promoting a new model changes next month's
    run without redeploying). A `model` given here overrides that for every run.
    """
    return ride_duration_prediction.to_deployment(
        name=DEPLOYMENT_NAME,
        schedules=[Cron(CRON, timezone=TIMEZONE)],
        parameters={"taxi_type": taxi_type, **({"run_id": model} if model else {})},
        tags=TAGS,
        description="Score last month's rides on day 2 at 03:00 UTC.",
        # Module path, not file path: the runner finds the flow from any cwd.
        entrypoint_type=EntrypointType.MODULE_PATH,
        _sync=True,  # Prefect dispatches to the async variant inside Jupyter's event loop
    )


def create_deployment(taxi_type: str = "green", model: str | None = None):
    """Create or update the deployment on the Prefect server; returns its id."""
    return monthly_deployment(taxi_type, model).apply(_sync=True)


def read_deployment(name: str = FULL_NAME):
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def preview_schedule(n: int = 3, after: datetime | None = None, name: str = FULL_NAME) -> list[datetime]:
    """The next `n` run times of the deployment, from the cron stored on the server,
    computed by Prefect's own schedule object (the one its scheduler uses)."""
    from prefect.server.schemas.schedules import CronSchedule
    from prefect.utilities.asyncutils import run_coro_as_sync

    deployment = read_deployment(name)
    if not deployment.schedules:
        raise ValueError(f"deployment {name} has no schedule")
    stored = deployment.schedules[0].schedule
    schedule = CronSchedule(cron=stored.cron, timezone=stored.timezone, day_or=stored.day_or)
    start = after or datetime.now(UTC)
    # get_dates is async (the server's scheduler awaits it); run_coro_as_sync also works in Jupyter.
    dates = run_coro_as_sync(schedule.get_dates(n, start=start))
    return [datetime.fromtimestamp(d.timestamp(), UTC) for d in dates]


def serve_monthly(taxi_type: str = "green", model: str | None = None) -> None:
    """Register the deployment and execute its runs until interrupted (blocking)."""
    from prefect import serve

    serve(monthly_deployment(taxi_type, model), print_starting_message=True)


# ----------------------------------------------------------------------------- runs without waiting for the cron
def start_runner(model: str | None = None, log_path=None, poll_seconds: int = 1):
    """`python -m ride_duration.batch deploy` in the background (notebooks, tests).

    Returns the process; stop it with `stop_runner`. `make deploy` runs the same in
    the foreground.
    """
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "ride_duration.batch", "deploy"] + (["--model", model] if model else [])
    # Closed below: the child keeps its own copy of the descriptor.
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": str(poll_seconds)},
        )
    finally:
        if log_path:
            out.close()


def stop_runner(process, timeout: float = 20) -> int:
    """Stop a runner from `start_runner` and the flow-run processes it started."""
    import os
    import signal
    import subprocess

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)  # the runner's own session (start_new_session)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def trigger_run(
    scheduled_time: datetime, parameters: dict | None = None, name: str = FULL_NAME, wait_for_deployment: float = 60
):
    """Create a run of the deployment scheduled at `scheduled_time` (past = due now).

    Retries while the deployment does not exist yet (a runner just starting creates it).
    """
    import time

    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + wait_for_deployment
    while True:
        try:
            return run_deployment(
                name, parameters=parameters, scheduled_time=scheduled_time, timeout=0, as_subflow=False, _sync=True
            )
        except ObjectNotFound:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def wait_for_run(flow_run_id, timeout: float = 120):
    """Poll the server until the flow run reaches a final state; returns the FlowRun."""
    import time

    from prefect import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state.is_final():
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run {run.name} still {run.state.name} after {timeout:.0f} s: is a runner up?")
            time.sleep(1)
