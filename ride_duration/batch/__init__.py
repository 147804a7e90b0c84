"""Batch deployment (part 5): score a month of rides, orchestrated by Prefect.

- `paths`: which month a run scores and where; `reading`, `predicting`, `writing`: a month's steps;
  `scoring`: the month loop (no orchestrator); `report`: notebook 05 run by papermill.
- `flows`: the Prefect task and flows (a month; a backfill, one flow run); `deploy`: the work pool
  and the `monthly` deployment; `cli`: `python -m ride_duration.batch deploy | score | backfill | report`."""

# Here rather than in `flows` so that the CLI and the workbench name them without importing Prefect (2-3 s).
FLOW_NAME = "ride-duration-prediction"
BACKFILL_FLOW_NAME = "ride-duration-prediction-backfill"
DEPLOYMENT_NAME = "monthly"
FULL_NAME = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
WORK_POOL = "ride-duration"
