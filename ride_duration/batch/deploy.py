"""The `monthly` deployment on the process work pool: cron `0 3 2 * *` (03:00 UTC on day 2).

2022: `DeploymentSpec(...)` + `prefect deployment create`; Prefect 2.x: `Deployment.build_from_flow`. Prefect 3:
`flow.to_deployment(..., work_pool_name=...)` + `apply()`. The entrypoint is a module path: a worker (`prefect worker
start --pool ride-duration`, any machine) imports the flow from the package installed where it runs.
`create_deployment` is idempotent: the work pool, the deployment, and an automation that schedules again a run silent
for 45 s (its worker died; Prefect's recipe for "zombie" runs). In Jupyter, `await` these calls (they return
coroutines)."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import DeploymentUpdate, WorkPoolCreate
from prefect.client.schemas.objects import StateType
from prefect.deployments.runner import EntrypointType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.events.schemas.events import ResourceSpecification
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron
from prefect.workers.process import ProcessWorker

from . import DEPLOYMENT_NAME, FULL_NAME, WORK_POOL
from .flows import ride_duration_prediction

CRON = "0 3 2 * *"
TIMEZONE = "UTC"
TAGS = ["ml"]
# Heartbeats every 30 s (Prefect's minimum) in each run; a run silent for 1.5 periods has lost its process.
RUN_ENV, SILENT_AFTER = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}, timedelta(seconds=45)
ZOMBIE_AUTOMATION = f"{FULL_NAME}: run again when its worker dies"
# The code is the installed package; without a pull step each run logs its scratch folder's path.
PULL_STEPS = [{"prefect.deployments.steps.set_working_directory": {"directory": "."}}]


def zombie_automation(deployment_id: UUID) -> AutomationCore:
    """Reschedule a run of the deployment that stopped sending heartbeats (its process died)."""
    final = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    deployment = {"prefect.resource.id": [f"prefect.deployment.{deployment_id}"], "prefect.resource.role": "deployment"}
    message = f"no heartbeat for {SILENT_AFTER.seconds} s: its worker died; scheduled for another worker"
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"A run of {FULL_NAME} silent for {SILENT_AFTER.seconds} s lost its worker: schedule it again.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification(deployment),  # other flows keep Prefect's defaults
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=SILENT_AFTER,
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="AwaitingRetry", message=message)],
    )


def monthly_deployment(taxi_type: str = "green", model: str | None = None):
    """The deployment (not sent yet). Without `model`, each run finds its model as the services do, where
    it runs: promoting a model changes next month's run without redeploying."""
    return ride_duration_prediction.to_deployment(
        name=DEPLOYMENT_NAME,
        work_pool_name=WORK_POOL,
        job_variables={"env": RUN_ENV},
        schedules=[Cron(CRON, timezone=TIMEZONE)],
        parameters={"taxi_type": taxi_type, **({"run_id": model} if model else {})},
        tags=TAGS,
        description="Score last month's rides on day 2 at 03:00 UTC.",
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def create_deployment(taxi_type: str = "green", model: str | None = None) -> UUID:
    """Create or update the work pool (a worker started first creates it too), the deployment and its automation."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(WORK_POOL)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process", base_job_template=template))
        deployment_id = monthly_deployment(taxi_type, model).apply()
        client.update_deployment(deployment_id, DeploymentUpdate(pull_steps=PULL_STEPS))
        for old in client.read_automations_by_name(ZOMBIE_AUTOMATION):
            client.delete_automation(old.id)
        client.create_automation(zombie_automation(deployment_id))
    return deployment_id


def deployment_and_workers():
    """The deployment as the server has it, and the names of the pool's workers online."""
    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(WORK_POOL)
        return client.read_deployment_by_name(FULL_NAME), sorted(w.name for w in workers if w.status.value == "ONLINE")
