"""The SQLite state (WAL mode), the embedded default of a single daemon.

What is kept per task: the last status emitted, the event counter `seq`, when watching
began, the poll count and how watching ended. Every task event is journaled in the same
transaction as the state change it reports, before it is written out; an event whose
writing was not confirmed is replayed on the next start (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson

from enkwatch.clock import Clock, SystemClock
from enkwatch.state.base import (
    RESET_FIELDS,
    STATE_FIELDS,
    TASK_FIELDS,
    JournaledEvent,
    OutboxRow,
    StateError,
    TaskRecord,
    record_from_row,
    state_values,
    task_values,
)

SCHEMA_VERSION = 1
# confirmations of written events are committed together, at the latest this much later
CONFIRM_WITHIN_S = 0.05
_INSERT_EVENT = "INSERT INTO events (task_key, seq, body, written) VALUES (?, ?, ?, 0)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    task_key TEXT PRIMARY KEY,
    task_id TEXT,
    dataset TEXT,
    last_status TEXT,
    last_unknown_status TEXT,
    seen_dataset TEXT,
    seen_task_id TEXT,
    seq INTEGER NOT NULL DEFAULT 0,
    watch_started_at REAL NOT NULL,
    polls INTEGER NOT NULL DEFAULT 0,
    outcome TEXT,
    spec TEXT
);
CREATE TABLE IF NOT EXISTS events (
    task_key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    written INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_key, seq)
);
CREATE INDEX IF NOT EXISTS events_unwritten ON events (written) WHERE written = 0;
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    task_key TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (sink, id) WHERE state = 'pending';
"""
_TASK_COLUMNS = ", ".join((*TASK_FIELDS, "spec"))
_INSERT_TASK = (
    f"INSERT OR IGNORE INTO tasks ({_TASK_COLUMNS}) "
    f"VALUES ({', '.join('?' * (len(TASK_FIELDS) + 1))})"
)
_UPDATE_STATE = f"UPDATE tasks SET {', '.join(f'{c} = ?' for c in STATE_FIELDS)} WHERE task_key = ?"


def _spec_text(spec: Mapping[str, Any] | None) -> str | None:
    return orjson.dumps(dict(spec)).decode() if spec is not None else None


class SqliteStore:
    """SQLite in WAL mode; `:memory:` for no persistence.

    Its methods are coroutines for the interface's sake (PostgreSQL's are truly async); they
    run their statements at once: SQLite on a local disk answers in microseconds.
    """

    shared = False

    def __init__(self, path: str, clock: Clock | None = None) -> None:
        self.path = path
        self._clock = clock or SystemClock()
        self._confirmations: list[tuple[str, int]] = []
        self._confirm_timer: asyncio.TimerHandle | None = None
        self._batch: _Batch | None = None
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 5000")
            if path != ":memory:":
                mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StateError(f"{path}: cannot switch the state database to WAL mode")
            # NORMAL in WAL mode: a commit survives the process being killed (not a power cut)
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript(_SCHEMA)
            # a table of the same name from another program fails here, before we stamp it
            self._db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks LIMIT 0")
            self._db.execute("SELECT task_key, seq, body, written FROM events LIMIT 0")
            self._check_version()
        except sqlite3.DatabaseError as err:
            raise StateError(f"{path}: cannot open the state database: {err}") from None

    async def open(self) -> None:
        """Opened in the constructor (errors as early as possible)."""

    def _check_version(self) -> None:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        elif not str(row[0]).isdigit():
            raise StateError(f"{self.path}: not an enkwatch state database (schema {row[0]!r})")
        elif int(row[0]) > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: written by a newer enkwatch (schema {row[0]}, "
                f"this one knows {SCHEMA_VERSION})"
            )

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    async def load_tasks(self) -> dict[str, TaskRecord]:
        rows = self._db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks").fetchall()
        return {
            row[0]: record_from_row(row, orjson.loads(row[-1]) if row[-1] else None) for row in rows
        }

    async def add_task(self, record: TaskRecord) -> None:
        await self.add_tasks([record])

    async def add_tasks(self, records: Sequence[TaskRecord]) -> None:
        """Insert tasks not yet known (one transaction); known ones keep what is stored."""
        if not records:
            return
        with self._tx():
            self._db.executemany(
                _INSERT_TASK, [(*task_values(r), _spec_text(r.spec)) for r in records]
            )

    async def record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str] = ()
    ) -> None:
        """Store the task's new state, its event and its webhook deliveries, committed.

        Group commit: the events of every poll that ends in the same turn of the event loop
        go in ONE transaction (flushed by `call_soon` once the turn is over); each caller
        returns once that transaction committed (journal before write, per-task order: a
        task's next event is built only after this one returned).
        """
        await self._stage(record, event, sinks)

    def _stage(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str]
    ) -> asyncio.Future[None]:
        """Add an event to the batch of this turn; the future resolves once it committed."""
        batch = self._batch
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._batch = _Batch(loop.create_future())
            loop.call_soon(self._flush_batch)
        key = record.task_key
        batch.states.append((*state_values(record), key))
        batch.events.append((key, record.seq, orjson.dumps(dict(event)).decode()))
        if sinks:
            batch.outbox.append((sinks, key, event))
        return batch.done

    def _flush_batch(self) -> None:
        """Commit the batch of this turn (with pending confirmations) and wake its callers."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            with self._tx():
                if self._confirmations:
                    self._confirm_pending()  # earlier events' confirmations ride along
                self._db.executemany(_UPDATE_STATE, batch.states)
                self._db.executemany(_INSERT_EVENT, batch.events)
                for sinks, key, event in batch.outbox:
                    self._enqueue(sinks, key, event)
        except sqlite3.Error as err:
            if not batch.done.done():
                batch.done.set_exception(err)
                batch.done.exception()  # retrieved by every caller; none left: no warning
            return
        if not batch.done.done():
            batch.done.set_result(None)

    async def enqueue(self, sinks: Sequence[str], event: Mapping[str, Any]) -> None:
        """Queue webhook deliveries of an event that is not about a task."""
        if sinks:
            with self._tx():
                self._enqueue(sinks, "", event)

    def _enqueue(self, sinks: Sequence[str], task_key: str, event: Mapping[str, Any]) -> None:
        body = orjson.dumps(dict(event))
        now = self._clock.now().timestamp()
        self._db.executemany(
            "INSERT INTO outbox (sink, task_key, body, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [(sink, task_key, body, now, now) for sink in sinks],
        )

    async def pending_deliveries(self, sink: str, limit: int) -> list[OutboxRow]:
        rows = self._db.execute(
            "SELECT id, sink, task_key, body, created_at, attempts, next_attempt_at FROM outbox "
            "WHERE sink = ? AND state = 'pending' ORDER BY id LIMIT ?",
            (sink, limit),
        ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    async def delivery_done(self, row_id: int) -> None:
        self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))

    async def delivery_retry(self, row_id: int, attempts: int, next_attempt_at: float) -> None:
        self._db.execute(
            "UPDATE outbox SET attempts = ?, next_attempt_at = ? WHERE id = ?",
            (attempts, next_attempt_at, row_id),
        )

    async def delivery_dead(self, row_id: int) -> None:
        self._db.execute("UPDATE outbox SET state = 'dead' WHERE id = ?", (row_id,))

    def outbox_stats(self) -> tuple[int, float | None]:
        """Pending deliveries and the age in seconds of the oldest."""
        count, oldest = self._db.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'"
        ).fetchone()
        now = self._clock.now().timestamp()
        return int(count), (now - oldest) if oldest is not None else None

    async def set_task_spec(self, task_key: str, spec: Mapping[str, Any] | None) -> None:
        """Persist (or, with None, forget) a task added through the admin API."""
        self._db.execute(
            "UPDATE tasks SET spec = ? WHERE task_key = ?", (_spec_text(spec), task_key)
        )

    async def mark_written(self, task_key: str, seq: int) -> None:
        """Confirm that an event was written out.

        Confirmations are committed together: with the next event's transaction, or
        CONFIRM_WITHIN_S later, whichever comes first (a commit each would double the cost
        of an event). A kill in that window writes the event again on the next start, with
        the same event_id; nothing is lost.
        """
        self.confirm_written(task_key, seq)

    def confirm_written(self, task_key: str, seq: int) -> None:
        """`mark_written` for a callback (the writer thread's report, in the loop)."""
        self._confirmations.append((task_key, seq))
        if self._confirm_timer is None:
            loop = asyncio.get_running_loop()
            self._confirm_timer = loop.call_later(CONFIRM_WITHIN_S, self._flush_confirmations)

    def _flush_confirmations(self) -> None:
        self._confirm_timer = None
        if self._confirmations:
            with self._tx():
                self._confirm_pending()

    def _confirm_pending(self) -> None:
        self._db.executemany(
            "UPDATE events SET written = 1 WHERE task_key = ? AND seq = ?", self._confirmations
        )
        self._confirmations = []

    async def unwritten_events(self) -> list[JournaledEvent]:
        self._flush_confirmations()
        rows = self._db.execute(
            "SELECT task_key, seq, body FROM events WHERE written = 0 ORDER BY rowid"
        ).fetchall()
        return [JournaledEvent(r[0], r[1], orjson.loads(r[2])) for r in rows]

    def journal(self) -> list[JournaledEvent]:
        """Every journaled event, by task and seq (what `migrate` copies)."""
        rows = self._db.execute(
            "SELECT task_key, seq, body FROM events ORDER BY task_key, seq"
        ).fetchall()
        return [JournaledEvent(r[0], r[1], orjson.loads(r[2])) for r in rows]

    def pending_outbox(self) -> list[OutboxRow]:
        """Every pending delivery of every sink, oldest first (what `migrate` copies)."""
        rows = self._db.execute(
            "SELECT id, sink, task_key, body, created_at, attempts, next_attempt_at FROM outbox "
            "WHERE state = 'pending' ORDER BY id"
        ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    def events(self, task_key: str) -> list[dict[str, Any]]:
        """Every journaled event of a task, in order (for inspection and tests)."""
        rows = self._db.execute(
            "SELECT body FROM events WHERE task_key = ? ORDER BY seq", (task_key,)
        ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    async def checkpoint_polls(self, polls: Iterable[tuple[str, int]]) -> None:
        with self._tx():
            self._db.executemany(
                "UPDATE tasks SET polls = ? WHERE task_key = ?", ((n, k) for k, n in polls)
            )

    async def status_times(self) -> dict[str, str]:
        """The timestamp of each task's last transition (from the journal): since when it has
        its status. SQLite gives the other columns of the row that holds MAX()."""
        rows = self._db.execute(
            "SELECT task_key, MAX(seq), json_extract(body, '$.timestamp') FROM events "
            "WHERE json_extract(body, '$.event') = 'task.transition' GROUP BY task_key"
        ).fetchall()
        return {r[0]: r[2] for r in rows if isinstance(r[2], str)}

    async def reset_task(self, task_key: str, watch_started_at: float) -> bool:
        """`forget`: a task that ended is watched again as if new; False if not ended."""
        with self._tx():
            cursor = self._db.execute(
                f"UPDATE tasks SET {', '.join(f'{c} = NULL' for c in RESET_FIELDS)}, "
                "polls = 0, watch_started_at = ? WHERE task_key = ? AND outcome IS NOT NULL",
                (watch_started_at, task_key),
            )
        return cursor.rowcount == 1

    async def close(self) -> None:
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
        self._flush_batch()
        self._flush_confirmations()
        self._db.close()


class _Batch:
    """The events of one turn of the event loop, committed together."""

    __slots__ = ("done", "events", "outbox", "states")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.states: list[tuple[Any, ...]] = []
        self.events: list[tuple[str, int, str]] = []
        self.outbox: list[tuple[Sequence[str], str, Mapping[str, Any]]] = []


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
