#!/usr/bin/env python
"""Train, log to MLflow, register (and with --promote, alias `production`).

Trains on the real green January 2021 and validates on February 2021 (data cache,
TLC_MIRROR, official URL). If a month is missing, or a given --train-path /
--valid-path is synthetic, it refuses (exit 1, one sentence saying what to set)
unless --allow-synthetic is passed. Every run records its data provenance (file,
sha256, size, rows, source, real or synthetic) as MLflow params/tags and in the
logged model's metadata. Thin wrapper over `python -m ride_duration.train`; see --help.
"""

from ride_duration.train import main
from workbench.stack import activate_if_running

if __name__ == "__main__":
    activate_if_running(announce=False)  # the local stack, when nothing else is configured
    raise SystemExit(main())
