"""Durable state: records and small protocols (`base`), SQLite, PostgreSQL and its leases."""

from __future__ import annotations

from collections.abc import Callable

from enkwatch.clock import Clock, SystemClock
from enkwatch.models import is_postgres_url
from enkwatch.state.base import Store
from enkwatch.state.sqlite import SqliteStore


def open_store(
    path: str,
    clock: Clock | None = None,
    replica_id: str = "",
    lease_s: float = 15.0,
    on_takeover: Callable[[float], None] | None = None,
) -> Store:
    """The store for `state.path`: PostgreSQL for a postgresql:// URL, else SQLite."""
    if is_postgres_url(path):
        # asyncpg is imported only by a daemon that uses it
        from enkwatch.state.postgres import PgStore

        clock = clock or SystemClock()
        return PgStore(path, replica_id, clock, lease_s=lease_s, on_takeover=on_takeover)
    return SqliteStore(path, clock)
