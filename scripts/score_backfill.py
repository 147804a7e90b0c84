#!/usr/bin/env python
"""Thin wrapper over `ride_duration.batch.cli.backfill_main`; see --help."""

from ride_duration.batch.cli import backfill_main

if __name__ == "__main__":
    raise SystemExit(backfill_main())
