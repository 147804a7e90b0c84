"""Batch deployment (part 5): score a month of rides, orchestrated by Prefect.

- `paths`: which month a run scores, where it reads and writes (hive partitions).
- `reading`, `predicting`, `writing`: a month's steps; `scoring`: the month loop (no orchestrator).
- `flows`: the Prefect 3 task and flows: one month, and a backfill that is one flow run.
- `deploy`: the process work pool and the `monthly` deployment (cron `0 3 2 * *`).
- `report`: the papermill run of notebooks/05-batch-scoring.ipynb into reports/.
- `cli`: `python -m ride_duration.batch deploy | schedule | score | backfill | report`.
"""

# Here rather than in `flows` so that the CLI and the workbench name them without importing Prefect (2-3 s).
FLOW_NAME = "ride-duration-prediction"
BACKFILL_FLOW_NAME = "ride-duration-prediction-backfill"
DEPLOYMENT_NAME = "monthly"
FULL_NAME = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
WORK_POOL = "ride-duration"
