#!/usr/bin/env python
"""The monthly report: papermill runs notebooks/05-batch-scoring.ipynb for --month
into reports/<taxi>-<YYYY>-<MM>.ipynb.

It uses the servers your environment names (.env, AWS settings); the local stack
only when nothing is configured or the environment points at it. It never starts
servers and never trains: with the tracking server down it stops with one sentence
(`make services-up`), without a production model with another (`make train`).
The report shows what the model was trained on and warns loudly if that was
synthetic data. Thin wrapper over `ride_duration.batch.cli.report_main`; see --help.
"""

from ride_duration.batch.cli import report_main
from workbench.stack import activate_if_running

if __name__ == "__main__":
    activate_if_running(announce=False)  # the local stack, when nothing else is configured
    raise SystemExit(report_main())
