"""`enkwatch migrate-state`: copy a SQLite state into PostgreSQL, for moving to replicas."""

from __future__ import annotations

from dataclasses import dataclass

from enkwatch.clock import SystemClock
from enkwatch.config import postgres_url_problem
from enkwatch.errors import ConfigError
from enkwatch.state.base import StateError
from enkwatch.state.leases import DB_ERRORS
from enkwatch.state.postgres import PgStore
from enkwatch.state.sqlite import SqliteStore

MIGRATION_REPLICA = "migrate-state"


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What was copied (rows already in PostgreSQL are kept, not overwritten)."""

    tasks: int
    tasks_skipped: int
    events: int
    outbox: int
    # webhook sinks disabled by a 410 Gone (they stay disabled until their config changes)
    disabled_sinks: int = 0


async def migrate_state(sqlite_path: str, postgres_url: str) -> MigrationReport:
    """Copy tasks, their event journal, pending webhook deliveries and the marks of disabled
    sinks; idempotent per task (and per sink).

    `sqlite_path` must name an existing file (checked by the caller: SQLite would create it).
    """
    if problem := postgres_url_problem(postgres_url):
        raise ConfigError([f"--to: {problem}"])
    clock = SystemClock()
    try:
        source = SqliteStore(sqlite_path, clock)
    except StateError as err:
        raise ConfigError([f"--from: {err}"]) from None
    target = PgStore(postgres_url, MIGRATION_REPLICA, clock)
    try:
        await target.open()
    except StateError as err:
        await source.close()
        raise ConfigError([f"--to: {err}"]) from None
    try:
        records = await source.load_tasks()
        # committed there but never confirmed written (a daemon killed): written after the move
        unwritten = frozenset((e.task_key, e.seq) for e in await source.unwritten_events())
        tasks, events, outbox = await target.import_state(
            records.values(),
            source.journal(),
            source.pending_outbox(),
            MIGRATION_REPLICA,
            unwritten,
        )
        disabled = await target.import_disabled_sinks(await source.disabled_sinks())
    except DB_ERRORS as err:
        raise ConfigError([f"--to: the copy failed: {type(err).__name__}"]) from None
    finally:
        await source.close()
        await target.close()
    return MigrationReport(tasks, len(records) - tasks, events, outbox, disabled)
