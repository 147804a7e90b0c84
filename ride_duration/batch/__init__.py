"""Batch deployment (part 5): score a month of rides, orchestrated by Prefect.

- `paths`: which month a run scores, where it reads and writes (hive partitions).
- `scoring`: reading, validating, predicting, atomic writes (no orchestrator; fast to import).
- `flows`: the Prefect 3 task and flows (`ride_duration_prediction`, the backfill).
- `pool`: months on the work pool from the client's side: submit runs, wait for them.
- `deploy`: the work pool, the `monthly` deployment (cron `0 3 2 * *`) and what recovers a month whose worker died.
- `report`: the papermill run of notebooks/05-batch-scoring.ipynb into reports/.
- `cli`: `python -m ride_duration.batch deploy | schedule | score | backfill | report`.
"""

# The orchestrator's names, here rather than in `pool` so that the CLI and the workbench
# can name the work pool without importing Prefect (2-3 s).
FLOW_NAME = "ride-duration-prediction"
DEPLOYMENT_NAME = "monthly"
FULL_NAME = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
WORK_POOL = "ride-duration"
