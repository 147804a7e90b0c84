"""The `monthly` deployment on the process work pool: cron `0 3 2 * *` (03:00 UTC on day 2).

2022 (Prefect 2 beta/Orion): `DeploymentSpec(...)` in a file + `prefect deployment create`;
Prefect 2.x: `Deployment.build_from_flow(...)`. Neither exists in Prefect 3. Here:
`flow.to_deployment(..., work_pool_name=...)` + `apply()`. The entrypoint is a module path
(`ride_duration.batch.flows:ride_duration_prediction`): a worker imports the flow from the
package installed where it runs, so there is no code to upload or pull.

`create_deployment` sets up, each step idempotent:
- the process work pool: workers on any machine take its runs (`make workers N=2` here);
- where the runs' results go: each month's summary as JSON in S3 (`_prefect-results/` in
  the predictions bucket), so the backfill reads them back from any machine;
- what happens when a worker dies mid-month: the run sends a heartbeat every 30 s, and an
  automation on the server reschedules a run that has sent none for 45 s (Prefect's recipe
  for "zombie" runs, rescheduling instead of marking them crashed); a live worker takes it
  again. Outputs are written atomically under the same key, so the month ends with one object;
- the deployment.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import EntrypointType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.filesystems import RemoteFileSystem
from prefect.schedules import Cron
from prefect.server.schemas.schedules import CronSchedule
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.process import ProcessWorker

from ..config import Settings
from . import DEPLOYMENT_NAME, FULL_NAME, WORK_POOL
from .flows import ride_duration_prediction

CRON = "0 3 2 * *"
TIMEZONE = "UTC"
TAGS = ["ml"]
RESULTS_BLOCK = "ride-duration-results"
# Prefect's minimum heartbeat period; a run silent for 1.5 periods has lost its process.
HEARTBEAT_SECONDS = 30
SILENT_AFTER = timedelta(seconds=45)
# In every run's environment (the work pool's job variables): heartbeats, and results in S3.
RUN_ENV = {
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),
    "PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK": f"remote-file-system/{RESULTS_BLOCK}",
}
ZOMBIE_AUTOMATION = f"{FULL_NAME}: run again when its worker dies"


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool unless it exists (a worker started first creates it too)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


def ensure_result_storage(settings: Settings) -> str:
    """The S3 folder the runs' results go to, saved as a block the workers and the backfill load.
    The endpoint and credentials come from each machine's environment, as for every S3 call here."""
    basepath = f"s3://{settings.predictions_bucket}/_prefect-results"
    # _sync: in Jupyter's event loop Prefect would return the coroutine of the async variant, unsaved.
    RemoteFileSystem(basepath=basepath).save(RESULTS_BLOCK, overwrite=True, _sync=True)
    return basepath


def zombie_automation(deployment_id: UUID) -> AutomationCore:
    """Reschedule a run of the deployment that stopped sending heartbeats (its process died)."""
    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"A run of {FULL_NAME} silent for {SILENT_AFTER.seconds} s lost its worker: schedule it again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            # Only this deployment's runs: other flows keep Prefect's default heartbeat (180 s).
            match_related=ResourceSpecification(
                {"prefect.resource.id": [f"prefect.deployment.{deployment_id}"], "prefect.resource.role": "deployment"}
            ),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=SILENT_AFTER,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name="AwaitingRetry",
                message=f"no heartbeat for {SILENT_AFTER.seconds} s: its worker died; scheduled for another worker",
            )
        ],
    )


def ensure_zombie_automation(deployment_id: UUID) -> UUID:
    automation = zombie_automation(deployment_id)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        for extra in existing[1:]:
            client.delete_automation(extra.id)
        if existing:
            client.update_automation(existing[0].id, automation)
            return existing[0].id
        return client.create_automation(automation)


def monthly_deployment(taxi_type: str = "green", model: str | None = None):
    """The deployment object (nothing sent to the server yet).

    Without `model`, each run finds its model as the services do, in its worker's environment
    (MODEL_URI; MODEL_ID + EXPERIMENT_ID from S3; else the registry alias, resolved at each
    run, so promoting a new model changes next month's run without redeploying). A `model`
    given here overrides that for every run.
    """
    return ride_duration_prediction.to_deployment(
        name=DEPLOYMENT_NAME,
        work_pool_name=WORK_POOL,
        job_variables={"env": RUN_ENV},
        schedules=[Cron(CRON, timezone=TIMEZONE)],
        parameters={"taxi_type": taxi_type, **({"run_id": model} if model else {})},
        tags=TAGS,
        description="Score last month's rides on day 2 at 03:00 UTC.",
        entrypoint_type=EntrypointType.MODULE_PATH,
        _sync=True,  # Prefect dispatches to the async variant inside Jupyter's event loop
    )


def create_deployment(settings: Settings, taxi_type: str = "green", model: str | None = None) -> UUID:
    """Create or update the work pool, the result storage, the deployment and its automation."""
    ensure_work_pool()
    ensure_result_storage(settings)
    deployment_id = monthly_deployment(taxi_type, model).apply(_sync=True)
    ensure_zombie_automation(deployment_id)
    return deployment_id


def deployment_exists(name: str = FULL_NAME) -> bool:
    try:
        read_deployment(name)
    except ObjectNotFound:
        return False
    return True


def read_deployment(name: str = FULL_NAME):
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def preview_schedule(n: int = 3, after: datetime | None = None, name: str = FULL_NAME) -> list[datetime]:
    """The next `n` run times of the deployment, from the cron stored on the server,
    computed by Prefect's own schedule object (the one its scheduler uses)."""
    deployment = read_deployment(name)
    if not deployment.schedules:
        raise ValueError(f"deployment {name} has no schedule")
    stored = deployment.schedules[0].schedule
    schedule = CronSchedule(cron=stored.cron, timezone=stored.timezone, day_or=stored.day_or)
    start = after or datetime.now(UTC)
    # get_dates is async (the server's scheduler awaits it); run_coro_as_sync also works in Jupyter.
    dates = run_coro_as_sync(schedule.get_dates(n, start=start))
    return [datetime.fromtimestamp(d.timestamp(), UTC) for d in dates]
