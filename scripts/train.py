#!/usr/bin/env python
"""Train, log to MLflow, register (and with --promote, alias `production`).

Thin wrapper over `python -m ride_duration.train`; see --help.
"""
from ride_duration.train import main

if __name__ == "__main__":
    raise SystemExit(main())
