"""The stack's Prefect server: `prefect server start`, with its SQLite writers queueing at BEGIN.

Prefect's server opens its write transactions on SQLite as DEFERRED: a transaction reads,
then asks for the write lock. If another connection committed in between, SQLite refuses at
once ("database is locked", SQLITE_BUSY_SNAPSHOT; its busy timeout cannot help), the API
answers 503 and the client tries again 2 s later. With two workers and a backfill writing,
that happened in most 12-month backfills (`make bench-batch` counts them), each a 2-4 s stall
of a worker or of the backfill's submissions. Here those transactions begin IMMEDIATE, which
takes the write lock first and waits for it (Prefect's busy timeout, 60 s) instead: what
SQLite advises for transactions that will write, and what Prefect itself does for the writes
it marks `with_for_update`. Reads outside a transaction are unchanged. On PostgreSQL (Prefect's
production database) nothing here applies.

    python -m workbench.prefect_server --host 127.0.0.1 --port 4200
"""

from __future__ import annotations

import sys

from prefect.server.database import configurations


def begin_immediate(self, conn) -> None:
    """`AioSqliteConfiguration.begin_sqlite_stmt`, every BEGIN Prefect emits made IMMEDIATE."""
    if configurations.SQLITE_BEGIN_MODE.get() is not None:  # None: no transaction (autocommit reads)
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def main() -> None:
    configurations.AioSqliteConfiguration.begin_sqlite_stmt = begin_immediate
    from prefect.cli import app  # after the patch: the server is created in this process

    sys.argv = ["prefect", "server", "start", *sys.argv[1:]]  # Prefect's CLI reads its arguments there
    app()


if __name__ == "__main__":
    main()
