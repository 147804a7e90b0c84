#!/usr/bin/env python
"""Thin wrapper over `ride_duration.batch.cli.report_main`; see --help."""
from ride_duration.batch.cli import report_main

if __name__ == "__main__":
    raise SystemExit(report_main())
