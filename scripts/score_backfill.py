#!/usr/bin/env python
"""Thin wrapper over `ride_duration.batch.cli.backfill_main`; see --help."""

from ride_duration.batch.cli import backfill_main
from workbench.stack import activate_if_running

if __name__ == "__main__":
    activate_if_running(announce=False)  # the local stack, when nothing else is configured
    raise SystemExit(backfill_main())
