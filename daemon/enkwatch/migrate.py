"""`enkwatch migrate-state`: copy a SQLite state into PostgreSQL, for moving to replicas."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import orjson

from enkwatch.config import postgres_url_problem
from enkwatch.errors import ConfigError
from enkwatch.pgstore import DB_ERRORS, PgStore, partition_of
from enkwatch.store import SqliteStore, StateError


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What was copied (rows already in PostgreSQL are kept, not overwritten)."""

    tasks: int
    tasks_skipped: int
    events: int
    outbox: int


async def migrate_state(sqlite_path: str, postgres_url: str) -> MigrationReport:
    """Copy tasks, their event journal and pending webhook deliveries; idempotent per task.

    `sqlite_path` must name an existing file (checked by the caller: SQLite would create it).
    """
    if problem := postgres_url_problem(postgres_url):
        raise ConfigError([f"--to: {problem}"])
    try:
        source = SqliteStore(sqlite_path)
    except StateError as err:
        raise ConfigError([f"--from: {err}"]) from None
    target = PgStore(postgres_url, "migrate-state")
    try:
        await target.open()
    except StateError as err:
        await source.close()
        raise ConfigError([f"--to: {err}"]) from None
    try:
        return await _copy(source, target)
    except DB_ERRORS as err:
        raise ConfigError([f"--to: the copy failed: {type(err).__name__}"]) from None
    finally:
        await source.close()
        await target.close()


async def _copy(source: SqliteStore, target: PgStore) -> MigrationReport:
    records = await source.load_tasks()
    db = sqlite3.connect(source.path)
    try:
        events = db.execute(
            "SELECT task_key, seq, body FROM events ORDER BY task_key, seq"
        ).fetchall()
        outbox = db.execute(
            "SELECT sink, task_key, body, created_at, attempts, next_attempt_at FROM outbox "
            "WHERE state = 'pending' ORDER BY id"
        ).fetchall()
    finally:
        db.close()
    copied: set[str] = set()
    async with target.pool.acquire() as conn, conn.transaction():
        for key, rec in records.items():
            done = await conn.fetchval(
                "INSERT INTO enkwatch_tasks (task_key, partition, task_id, dataset, last_status, "
                "last_unknown_status, seen_dataset, seen_task_id, seq, watch_started_at, polls, "
                "outcome, spec) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
                "$13::jsonb) ON CONFLICT (task_key) DO NOTHING RETURNING task_key",
                key,
                partition_of(key, target.partitions),
                rec.task_id,
                rec.dataset,
                rec.last_status,
                rec.last_unknown_status,
                rec.seen_dataset,
                rec.seen_task_id,
                rec.seq,
                rec.watch_started_at,
                rec.polls,
                rec.outcome,
                orjson.dumps(rec.spec).decode() if rec.spec is not None else None,
            )
            if done is not None:
                copied.add(key)
        n_events = 0
        for key, seq, body in events:
            if key not in copied:
                continue
            data = orjson.loads(body)
            status = data.get("status") if data.get("event") == "task.transition" else None
            await conn.execute(
                "INSERT INTO enkwatch_events (task_key, seq, partition, status, body, written, "
                "replica, epoch) VALUES ($1, $2, $3, $4, $5, true, 'migrate-state', 0)",
                key,
                seq,
                partition_of(key, target.partitions),
                status,
                body,
            )
            n_events += 1
        n_outbox = 0
        for sink, key, body, created_at, attempts, next_at in outbox:
            if key and key not in copied:
                continue
            await conn.execute(
                "INSERT INTO enkwatch_outbox (sink, task_key, partition, body, created_at, "
                "attempts, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                sink,
                key,
                partition_of(key, target.partitions) if key else 0,
                bytes(body),
                created_at,
                attempts,
                next_at,
            )
            n_outbox += 1
    return MigrationReport(len(copied), len(records) - len(copied), n_events, n_outbox)
