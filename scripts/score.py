#!/usr/bin/env python
"""Thin wrapper over `ride_duration.batch.cli.score_main`; see --help."""

from ride_duration.batch.cli import score_main

if __name__ == "__main__":
    raise SystemExit(score_main())
