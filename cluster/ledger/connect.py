"""`open_ledger`: a ledger URL to the store behind it (kept apart from the contract, which the stores import)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from cluster.ledger.store import Ledger


def open_ledger(url: str, password_env: str = "MOE_CLUSTER_DB_PASSWORD",
                clock: Callable[[], float] = time.time) -> Ledger:
    """The store at `url`: `postgresql://user@host:port/db` (or `postgres://`) -> PostgreSQL, the password from the
    URL or else from the environment variable `password_env` (a k8s Secret); `sqlite:///abs/path.db`,
    `sqlite:relative.db` or a plain path -> SQLite. The schema is created if missing. `clock`: the store's unix
    time (tests step it)."""
    if url.startswith(("postgresql://", "postgres://")):
        from cluster.ledger.postgres_store import PostgresLedger

        return PostgresLedger(url, os.environ.get(password_env), clock=clock)
    from cluster.ledger.sqlite_store import SqliteLedger, sqlite_path

    return SqliteLedger(sqlite_path(url), clock=clock)
