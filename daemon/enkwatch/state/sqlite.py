"""The SQLite state (WAL mode), the embedded default of a single daemon.

What is kept per task: the last status emitted, the event counter `seq`, when watching
began, the poll count and how watching ended. Every task event is journaled in the same
transaction as the state change it reports, before it is written out; an event whose
writing was not confirmed is replayed on the next start (at least once, never lost).

A write the file system refuses (disk full, an I/O error, a read-only file system, the
file locked by another program for longer than the busy timeout) is rolled back and raised
as `StateNotWritten`: nothing of it was committed, the caller tries again later. The store
reports when it became unwritable and when a write worked again (`on_availability`).

The journal is bounded: a `task.poll_failed` row is deleted once its writing is confirmed
(replay after a crash needs only unconfirmed rows; webhook deliveries carry their own
body). Transitions, unknown statuses and give-ups stay: they are the task's history.

The journal's rows are numbered in the order they were journaled (`events.id`), appended
at the end of the table, with no index by task: what was written out is a watermark on that
number (`written.WrittenMark`), not a flag on each row. Schema 1 (a `written` flag, a key
on (task_key, seq)) is converted once, at the first start of this version.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import orjson

from enkwatch.clock import Clock, SystemClock
from enkwatch.errors import StateNotWritten
from enkwatch.models import TASK_POLL_FAILED
from enkwatch.state.base import (
    DISABLED_SINK_PREFIX,
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
from enkwatch.state.written import MarkChanges, WrittenMark

SCHEMA_VERSION = 3
# confirmations of written events are committed together, at the latest this much later
CONFIRM_WITHIN_S = 0.05
# group commit with a commit window (PostgreSQL's commit_delay): while events come often
# (a batch was committed less than a window ago), a batch is committed this much after its
# first event, so that one commit serves the events of many polls; at once when it holds
# COMMIT_BATCH_MAX events or half the polls that may run at once (each waits in the batch,
# holding its slot: few others could still join), or when events are rare (fewer than one
# a window: then at the end of the loop's turn, as before). It delays an event by at most
# the window; the daemon's latency budget is seconds.
COMMIT_DELAY_S = 0.05
COMMIT_BATCH_MAX: Final = 256
# WAL checkpoints (copying committed pages back into the database file) every this many
# pages of WAL (SQLite's default is 1,000: 4 MB), and the WAL file truncated to this size
WAL_CHECKPOINT_PAGES: Final = 10_000
JOURNAL_LIMIT_BYTES: Final = 64 * 1024 * 1024
# confirmations that could not be committed (the disk is full) are tried again this much later
CONFIRM_RETRY_S: Final = 1.0
# SQLite's primary result codes of a write the file system or another program refused
# (BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN): conditions, not bugs
_REFUSED_WRITE: Final = frozenset({5, 6, 8, 10, 13, 14})
_INSERT_EVENT = "INSERT INTO events (id, task_key, seq, body) VALUES (?, ?, ?, ?)"
# the meta key of the journal's watermark: every row up to this id was written out, but the
# stragglers (table events_stragglers)
_THROUGH_KEY: Final = "events_written_through"
# an outbox row's columns as an OutboxRow takes them: a task event's rows refer to its journal
# row (`event_row`) instead of holding a copy of its bytes (three sinks: three copies, most of
# the cost of journaling them); a daemon event's rows, and a poll failure's (its journal row
# is deleted once written), hold their own
_OUTBOX_COLUMNS: Final = (
    "id, sink, task_key, CASE WHEN event_row IS NULL THEN body ELSE COALESCE("
    "(SELECT CAST(e.body AS BLOB) FROM events e WHERE e.id = outbox.event_row), body) END, "
    "created_at, attempts, next_attempt_at"
)
# the oldest pending row of each task of a sink (its queue's head), soonest due first: heads
# waiting for a retry never hide a due one behind the limit. The tasks are stepped through on
# the index `outbox_heads` (one seek per task), so the cost does not grow with the backlog of
# a sink whose receiver was down (a GROUP BY read every pending row, on the event loop)
_OUTBOX_HEADS: Final = (
    "WITH RECURSIVE keys(k) AS ("
    "SELECT (SELECT MIN(task_key) FROM outbox WHERE sink = ?1 AND state = 'pending') "
    "UNION ALL SELECT (SELECT MIN(task_key) FROM outbox "
    "WHERE sink = ?1 AND state = 'pending' AND task_key > k) FROM keys WHERE k IS NOT NULL) "
    f"SELECT {_OUTBOX_COLUMNS} FROM outbox "
    "WHERE id IN (SELECT (SELECT MIN(id) FROM outbox "
    "WHERE sink = ?1 AND state = 'pending' AND task_key = k) FROM keys WHERE k IS NOT NULL) "
    "ORDER BY next_attempt_at, id LIMIT ?2"
)
# delivered rows deleted by one statement each (under SQLite's oldest bound on parameters)
_DELETE_CHUNK: Final = 500

# the journal: rows numbered in the order they were journaled, appended at the table's end
# (no index by task: each would cost a page of its own per event)
_EVENTS_COLUMNS = (
    "(id INTEGER PRIMARY KEY, task_key TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL)"
)
_SCHEMA = f"""
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
    spec TEXT,
    status_since REAL,
    stalled_status TEXT
);
CREATE TABLE IF NOT EXISTS events {_EVENTS_COLUMNS};
CREATE TABLE IF NOT EXISTS events_stragglers (id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sink TEXT NOT NULL,
    task_key TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    event_row INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_heads ON outbox (sink, task_key, id) WHERE state = 'pending';
"""
# columns added after schema 1 was released: a file of an older enkwatch gets them (NULL)
_ADDED_COLUMNS = (("status_since", "REAL"), ("stalled_status", "TEXT"))
_TASK_COLUMNS = ", ".join((*TASK_FIELDS, "spec"))
_INSERT_TASK = (
    f"INSERT OR IGNORE INTO tasks ({_TASK_COLUMNS}) "
    f"VALUES ({', '.join('?' * (len(TASK_FIELDS) + 1))})"
)
_INSERT_OUTBOX: Final = (
    "INSERT INTO outbox (sink, task_key, body, created_at, next_attempt_at, event_row) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
# a task's new state, if its seq grows (compare-and-set: an event's (task_key, seq) is
# journaled once; the journal has no key on them)
_UPDATE_STATE = (
    f"UPDATE tasks SET {', '.join(f'{c} = ?{i}' for i, c in enumerate(STATE_FIELDS, 1))} "
    f"WHERE task_key = ?{len(STATE_FIELDS) + 1} AND seq < ?{STATE_FIELDS.index('seq') + 1}"
)


def _spec_text(spec: Mapping[str, Any] | None) -> str | None:
    return orjson.dumps(dict(spec)).decode() if spec is not None else None


def _connect(path: str) -> sqlite3.Connection:
    """A connection in WAL mode, set up as every connection of enkwatch's is."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # a write waits for another connection's (the delivery process's) at most this long
    db.execute("PRAGMA busy_timeout = 5000")
    if path != ":memory:":
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StateError(f"{path}: cannot switch the state database to WAL mode")
    # NORMAL in WAL mode: a commit survives the process being killed (not a power cut)
    db.execute("PRAGMA synchronous = NORMAL")
    # a checkpoint every WAL_CHECKPOINT_PAGES pages instead of SQLite's 1,000: each event
    # dirties a page of its own (its task's row), and copying them back ten times less often
    # cost a third of a commit; the WAL file stays under JOURNAL_LIMIT_BYTES
    db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    db.execute(f"PRAGMA journal_size_limit = {JOURNAL_LIMIT_BYTES}")
    return db


class SqliteStore:
    """SQLite in WAL mode; `:memory:` for no persistence.

    Its methods are coroutines for the interface's sake (PostgreSQL's are truly async); they
    run their statements at once: SQLite on a local disk answers in microseconds.
    """

    shared = False

    def __init__(
        self,
        path: str,
        clock: Clock | None = None,
        commit_delay_s: float = COMMIT_DELAY_S,
        *,
        outbox_only: bool = False,
    ) -> None:
        """Open (and create or convert) the state; `outbox_only`: a second connection to a
        state a daemon opened, for its webhook outbox alone (the delivery process): the
        schema is checked, never created or converted, and the journal is not loaded."""
        self.path = path
        self._clock = clock or SystemClock()
        self._confirmations: list[tuple[str, int]] = []
        self._confirm_timer: asyncio.TimerHandle | None = None
        self._batch: _Batch | None = None
        # the commit window (0: every batch at the end of its turn) and when, on the loop's
        # clock, the last batch was committed
        self.commit_delay_s = commit_delay_s
        self._last_commit = float("-inf")
        # a batch this large is committed without waiting for its window
        self.batch_max = COMMIT_BATCH_MAX
        # why writes fail now (None: they work); told to on_availability on each change
        self.trouble: str | None = None
        self.on_availability: Callable[[str | None], None] | None = None
        try:
            self._db = _connect(path)
            if outbox_only:
                if (version := self._stored_version()) != SCHEMA_VERSION:
                    raise StateError(f"{path}: schema {version}, not {SCHEMA_VERSION}")
                return
            self._db.executescript(_SCHEMA)
            self._add_columns()
            # a table of the same name from another program fails here, before we stamp it
            self._db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks LIMIT 0")
            version = self._stored_version()
            if version == 1:
                self._upgrade_journal()
                version = 2
            if version == 2:
                self._upgrade_outbox()
            self._db.execute("SELECT id, task_key, seq, body FROM events LIMIT 0")
            if version is None:
                self._db.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
            # what of the journal was written out, and the next row's id (above every row
            # and the watermark: a written poll failure's row is gone, its id not reused)
            self._mark = self._load_mark()
            top = self._db.execute("SELECT MAX(id) FROM events").fetchone()[0]
            self._next_id = max(top or 0, self._mark.through) + 1
        except sqlite3.DatabaseError as err:
            raise StateError(f"{path}: cannot open the state database: {err}") from None

    async def open(self) -> None:
        """Opened in the constructor (errors as early as possible)."""

    def _add_columns(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        if "task_key" not in have:
            return  # not our table: the check that follows says so
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {kind}")

    def _stored_version(self) -> int | None:
        """The file's schema version (None: a new file); refuses a newer or a foreign one."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            return None
        if not str(row[0]).isdigit():
            raise StateError(f"{self.path}: not an enkwatch state database (schema {row[0]!r})")
        if int(row[0]) > SCHEMA_VERSION:
            raise StateError(
                f"{self.path}: written by a newer enkwatch (schema {row[0]}, "
                f"this one knows {SCHEMA_VERSION})"
            )
        return int(row[0])

    def _upgrade_journal(self) -> None:
        """Schema 1 -> 2, in one transaction: the journal's rows keep their order (rowid)
        as their id; the unwritten ones become stragglers of a watermark on the last row;
        written poll failures (kept by versions before they were deleted) go."""
        db = self._db
        with self._tx():
            if "written" not in {row[1] for row in db.execute("PRAGMA table_info(events)")}:
                # it had no journal: ours was just made
                db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
                return
            db.execute(
                "DELETE FROM events WHERE written = 1 AND json_extract(body, '$.event') = ?",
                (TASK_POLL_FAILED,),
            )
            db.execute(f"CREATE TABLE events_v2 {_EVENTS_COLUMNS}")
            db.execute(
                "INSERT INTO events_v2 (id, task_key, seq, body) "
                "SELECT rowid, task_key, seq, body FROM events ORDER BY rowid"
            )
            db.execute(
                "INSERT INTO events_stragglers (id) SELECT rowid FROM events WHERE written = 0"
            )
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) "
                "VALUES (?, (SELECT COALESCE(MAX(id), 0) FROM events_v2))",
                (_THROUGH_KEY,),
            )
            db.execute("DROP TABLE events")  # with its indexes
            db.execute("ALTER TABLE events_v2 RENAME TO events")
            db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")

    def _upgrade_outbox(self) -> None:
        """Schema 2 -> 3, in one transaction: an outbox row may refer to its event's journal
        row (`event_row`); the index of pending rows by (sink, id) goes (no delivery reads
        by it: its upkeep was a third of journaling a row). A version before 3 refuses the
        file: it would send such a row's empty body."""
        db = self._db
        with self._tx():
            if "event_row" not in {row[1] for row in db.execute("PRAGMA table_info(outbox)")}:
                db.execute("ALTER TABLE outbox ADD COLUMN event_row INTEGER")
            db.execute("DROP INDEX IF EXISTS outbox_pending")
            db.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")

    def _load_mark(self) -> WrittenMark:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (_THROUGH_KEY,)).fetchone()
        through = int(row[0]) if row is not None else 0
        above = self._db.execute(
            "SELECT id, task_key, seq FROM events WHERE id > ? ORDER BY id", (through,)
        ).fetchall()
        stragglers = self._db.execute(
            "SELECT e.id, e.task_key, e.seq FROM events_stragglers s JOIN events e ON e.id = s.id"
        ).fetchall()
        return WrittenMark(through, above, stragglers)

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        """A refused read or write becomes StateNotWritten (nothing was committed)."""
        try:
            yield
        except sqlite3.OperationalError as err:
            code = getattr(err, "sqlite_errorcode", None)
            if code is None or code & 0xFF not in _REFUSED_WRITE:
                raise
            reason = f"{err} ({getattr(err, 'sqlite_errorname', code)})"
            if self.trouble is None:
                self.trouble = reason
                if self.on_availability is not None:
                    self.on_availability(reason)
            raise StateNotWritten(None, reason) from None

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """As `_reading`; a write that worked after refused ones tells on_availability."""
        with self._reading():
            yield
        if self.trouble is not None:
            self.trouble = None
            if self.on_availability is not None:
                self.on_availability(None)

    async def load_tasks(self) -> dict[str, TaskRecord]:
        with self._reading():
            rows = self._db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks").fetchall()
        return {
            row[0]: record_from_row(row, orjson.loads(row[-1]) if row[-1] else None) for row in rows
        }

    async def load_task(self, task_key: str) -> TaskRecord | None:
        """One stored task by its key (a primary-key lookup), or None."""
        with self._reading():
            row = self._db.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks WHERE task_key = ?", (task_key,)
            ).fetchone()
        if row is None:
            return None
        return record_from_row(row, orjson.loads(row[-1]) if row[-1] else None)

    async def add_task(self, record: TaskRecord) -> None:
        await self.add_tasks([record])

    async def add_tasks(self, records: Sequence[TaskRecord]) -> None:
        """Insert tasks not yet known (one transaction); known ones keep what is stored."""
        if not records:
            return
        with self._writing(), self._tx():
            self._db.executemany(
                _INSERT_TASK, [(*task_values(r), _spec_text(r.spec)) for r in records]
            )

    async def record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str] = ()
    ) -> None:
        """Store the task's new state, its event and its webhook deliveries, committed.

        Group commit: the events of every poll that ends within the commit window (or in
        the same turn of the event loop, when events are rare) go in ONE transaction; each
        caller returns once that transaction committed (journal before write, per-task
        order: a task's next event is built only after this one returned). StateNotWritten
        when the file system refused it: nothing of the batch was committed.
        """
        await self._stage(record, event, sinks)

    def _stage(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str]
    ) -> asyncio.Future[None]:
        """Add an event to the open batch; the future resolves once it committed."""
        batch = self._batch
        if batch is None:
            batch = self._batch = self._open_batch()
        if len(batch.events) >= self.batch_max - 1 and batch.timer is not None:
            batch.timer.cancel()  # full with this event: committed at the end of this turn
            batch.timer = None
            asyncio.get_running_loop().call_soon(self._flush_batch)
        key = record.task_key
        batch.states.append((*state_values(record), key))
        body = event if type(event) is dict else dict(event)
        row_id = self._next_id
        self._next_id = row_id + 1
        raw = orjson.dumps(body)
        batch.events.append((row_id, key, record.seq, raw.decode()))
        transient = _is_transient(event)
        if transient:
            batch.transient.append(row_id)
        if sinks:
            # its deliveries refer to its journal row, which stays (a poll failure's does not:
            # its rows hold its bytes)
            ref: tuple[bytes, int | None] = (raw, None) if transient else (b"", row_id)
            batch.outbox.extend((sink, key, *ref) for sink in sinks)
        return batch.done

    def _open_batch(self) -> _Batch:
        """A new batch, committed after the window while events come often, else this turn."""
        loop = asyncio.get_running_loop()
        batch = _Batch(loop.create_future())
        delay = self.commit_delay_s
        if delay > 0 and loop.time() - self._last_commit < delay:
            batch.timer = loop.call_later(delay, self._flush_batch)
        else:
            loop.call_soon(self._flush_batch)
        return batch

    def commit_now(self) -> None:
        """Shutdown: the open batch is committed at the end of this turn, and every later
        one too (no commit window)."""
        self.commit_delay_s = 0.0
        batch = self._batch
        if batch is not None and batch.timer is not None:
            batch.timer.cancel()
            batch.timer = None
            asyncio.get_running_loop().call_soon(self._flush_batch)

    def concurrent_writers(self, count: int) -> None:
        """Batches are committed at once when they hold half the polls that may run."""
        self.batch_max = max(1, min(COMMIT_BATCH_MAX, count // 2))

    def _flush_batch(self) -> None:
        """Commit the open batch (with pending confirmations) and wake its callers."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()  # committed earlier than its window (close)
        with contextlib.suppress(RuntimeError):  # no running loop: close() after the loop
            self._last_commit = asyncio.get_running_loop().time()
        confirming = self._confirmations
        changes = None
        try:
            # refused (disk full...): StateNotWritten for every caller, nothing committed
            with self._writing(), self._tx():
                if confirming:
                    changes = self._confirm_pending(confirming)  # earlier ones ride along
                updated = self._db.executemany(_UPDATE_STATE, batch.states).rowcount
                if updated != len(batch.states):
                    self._refuse_clash(batch.states, updated)
                self._db.executemany(_INSERT_EVENT, batch.events)
                if batch.outbox:
                    now = self._clock.now().timestamp()
                    rows = [(s, key, raw, now, now, ref) for s, key, raw, ref in batch.outbox]
                    self._db.executemany(_INSERT_OUTBOX, rows)
        except (StateNotWritten, sqlite3.Error) as err:
            if not batch.done.done():
                batch.done.set_exception(err)
                batch.done.exception()  # retrieved by every caller; none left: no warning
            if confirming and self._confirm_timer is None:
                # they waited for this batch: tried again on their own (close: at once)
                with contextlib.suppress(RuntimeError):
                    loop = asyncio.get_running_loop()
                    self._confirm_timer = loop.call_later(
                        CONFIRM_RETRY_S, self._flush_confirmations
                    )
            return
        if changes is not None:
            self._confirmed(changes)
        self._mark.committed(((e[0], e[1], e[2]) for e in batch.events), batch.transient)
        if not batch.done.done():
            batch.done.set_result(None)

    def _refuse_clash(self, states: list[tuple[Any, ...]], updated: int) -> None:
        """Fewer task rows changed than events staged: unless the missing ones are tasks
        without a row, an event's seq did not grow (journaled already): the batch fails."""
        known = sum(
            1
            for state in states
            if self._db.execute("SELECT 1 FROM tasks WHERE task_key = ?", (state[-1],)).fetchone()
        )
        if updated < known:
            raise sqlite3.IntegrityError("an event's seq was journaled already for its task")

    async def enqueue(self, sinks: Sequence[str], event: Mapping[str, Any]) -> None:
        """Queue webhook deliveries of an event that is not about a task."""
        if sinks:
            with self._writing(), self._tx():
                self._enqueue(sinks, "", event)

    def _enqueue(self, sinks: Sequence[str], task_key: str, event: Mapping[str, Any]) -> None:
        body = orjson.dumps(dict(event))
        now = self._clock.now().timestamp()
        rows = [(sink, task_key, body, now, now, None) for sink in sinks]
        self._db.executemany(_INSERT_OUTBOX, rows)

    async def pending_deliveries(self, sink: str, limit: int) -> list[OutboxRow]:
        with self._reading():
            rows = self._db.execute(
                f"SELECT {_OUTBOX_COLUMNS} "
                "FROM outbox WHERE sink = ? AND state = 'pending' ORDER BY id LIMIT ?",
                (sink, limit),
            ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    async def outbox_heads(self, sink: str, limit: int) -> list[OutboxRow]:
        """The oldest pending delivery of each task (the only one that may go now), soonest
        due first: the rows behind a head are not read."""
        with self._reading():
            rows = self._db.execute(_OUTBOX_HEADS, (sink, limit)).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    async def delivery_done(self, row_id: int) -> None:
        await self.deliveries_done([row_id])

    async def deliveries_done(self, row_ids: Sequence[int]) -> None:
        """Delete delivered rows: one statement (and commit) for many."""
        if not row_ids:
            return
        with self._writing(), self._tx():
            for i in range(0, len(row_ids), _DELETE_CHUNK):
                chunk = row_ids[i : i + _DELETE_CHUNK]
                self._db.execute(
                    f"DELETE FROM outbox WHERE id IN ({', '.join('?' * len(chunk))})", chunk
                )

    async def delivery_retry(self, row_id: int, attempts: int, next_attempt_at: float) -> None:
        with self._writing():
            self._db.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ? WHERE id = ?",
                (attempts, next_attempt_at, row_id),
            )

    async def delivery_dead(self, row_id: int) -> None:
        with self._writing():
            self._db.execute("UPDATE outbox SET state = 'dead' WHERE id = ?", (row_id,))

    async def disabled_sinks(self) -> dict[str, str]:
        """The sinks disabled by a 410 Gone, each with the fingerprint of its config then."""
        with self._reading():
            rows = self._db.execute(
                "SELECT key, value FROM meta WHERE key LIKE ?", (DISABLED_SINK_PREFIX + "%",)
            ).fetchall()
        return {str(k).removeprefix(DISABLED_SINK_PREFIX): str(v) for k, v in rows}

    async def disable_sink(self, sink: str, fingerprint: str) -> int:
        """Remember a disabled sink; its pending deliveries are dropped (returns how many)."""
        with self._writing(), self._tx():
            self._db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (DISABLED_SINK_PREFIX + sink, fingerprint),
            )
            cur = self._db.execute(
                "UPDATE outbox SET state = 'dead' WHERE sink = ? AND state = 'pending'", (sink,)
            )
        return cur.rowcount

    async def enable_sink(self, sink: str) -> None:
        """Forget that a sink was disabled (its config changed)."""
        with self._writing():
            self._db.execute("DELETE FROM meta WHERE key = ?", (DISABLED_SINK_PREFIX + sink,))

    def outbox_stats(self) -> tuple[int, float | None]:
        """Pending deliveries and the age in seconds of the oldest."""
        try:
            with self._reading():
                count, oldest = self._db.execute(
                    "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state = 'pending'"
                ).fetchone()
        except StateNotWritten:
            return 0, None  # a metric: unknown while the file cannot be read
        now = self._clock.now().timestamp()
        return int(count), (now - oldest) if oldest is not None else None

    async def set_task_spec(self, task_key: str, spec: Mapping[str, Any] | None) -> None:
        """Persist (or, with None, forget) a task added through the admin API."""
        with self._writing():
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

    def _flush_confirmations(self, retry: bool = True) -> None:
        self._confirm_timer = None
        batch = self._confirmations
        if not batch:
            return
        if retry and self._batch is not None:
            return  # a group commit is staged: they ride with it (or are retried after it)
        try:
            with self._writing(), self._tx():
                changes = self._confirm_pending(batch)
        except StateNotWritten:
            # kept: tried again later or with the next event (a kill meanwhile replays them)
            if retry:
                loop = asyncio.get_running_loop()
                self._confirm_timer = loop.call_later(CONFIRM_RETRY_S, self._flush_confirmations)
            return
        self._confirmed(changes)

    def _confirm_pending(self, batch: list[tuple[str, int]]) -> MarkChanges:
        """Inside a transaction: the watermark moves over the written events (and their
        stragglers are stored or dropped), written poll failures are deleted."""
        mark = self._mark
        for task_key, seq in batch:
            mark.confirm(task_key, seq)
        changes = mark.changes()
        db = self._db
        if changes.delete_rows:
            db.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in changes.delete_rows])
        if changes.add:
            db.executemany(
                "INSERT OR IGNORE INTO events_stragglers (id) VALUES (?)",
                [(i,) for i in changes.add],
            )
        if changes.drop:
            db.executemany(
                "DELETE FROM events_stragglers WHERE id = ?", [(i,) for i in changes.drop]
            )
        if changes.through is not None:
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (_THROUGH_KEY, str(changes.through)),
            )
        return changes

    def _confirmed(self, changes: MarkChanges) -> None:
        """After the commit: these confirmations are done."""
        self._mark.saved(changes)
        self._confirmations = []  # the whole list was confirmed (no await in between)

    async def unwritten_events(self) -> list[JournaledEvent]:
        self._flush_confirmations(retry=False)
        mark = self._mark
        with self._reading():
            rows = self._db.execute(
                "SELECT id, task_key, seq, body FROM events WHERE id > ? ORDER BY id",
                (mark.through,),
            ).fetchall()
            for straggler in sorted(mark.stragglers):
                rows.extend(
                    self._db.execute(
                        "SELECT id, task_key, seq, body FROM events WHERE id = ?", (straggler,)
                    )
                )
        rows.sort(key=lambda r: int(r[0]))
        keep = set(mark.unconfirmed(r[0] for r in rows))
        out = [(r[0], JournaledEvent(r[1], r[2], orjson.loads(r[3]))) for r in rows if r[0] in keep]
        mark.transient(row_id for row_id, e in out if _is_transient(e.body))
        return [e for _, e in out]

    def journal(self) -> list[JournaledEvent]:
        """Every journaled event, by task and seq (what `migrate` copies)."""
        rows = self._db.execute(
            "SELECT task_key, seq, body FROM events ORDER BY task_key, seq"
        ).fetchall()
        return [JournaledEvent(r[0], r[1], orjson.loads(r[2])) for r in rows]

    def pending_outbox(self) -> list[OutboxRow]:
        """Every pending delivery of every sink, oldest first (what `migrate` copies)."""
        rows = self._db.execute(
            f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE state = 'pending' ORDER BY id"
        ).fetchall()
        return [OutboxRow(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6]) for r in rows]

    def events(self, task_key: str) -> list[dict[str, Any]]:
        """Every journaled event of a task, in order (for inspection and tests)."""
        rows = self._db.execute(
            "SELECT body FROM events WHERE task_key = ? ORDER BY seq", (task_key,)
        ).fetchall()
        return [orjson.loads(r[0]) for r in rows]

    async def checkpoint_polls(self, polls: Iterable[tuple[str, int]]) -> None:
        with self._writing(), self._tx():
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
        with self._writing(), self._tx():
            cursor = self._db.execute(
                f"UPDATE tasks SET {', '.join(f'{c} = NULL' for c in RESET_FIELDS)}, "
                "polls = 0, watch_started_at = ? WHERE task_key = ? AND outcome IS NOT NULL",
                (watch_started_at, task_key),
            )
        return cursor.rowcount == 1

    async def close(self) -> None:
        self._flush_batch()
        if self._confirm_timer is not None:
            self._confirm_timer.cancel()
            self._confirm_timer = None
        # unconfirmed on a full disk: written again on the next start (same event_id)
        self._flush_confirmations(retry=False)
        self._db.close()


def _is_transient(body: Mapping[str, Any]) -> bool:
    """A journal row deleted once its writing is confirmed (not part of the history)."""
    return body.get("event") == TASK_POLL_FAILED


class _Batch:
    """The events of one commit window (or turn of the event loop), committed together."""

    __slots__ = ("done", "events", "outbox", "states", "timer", "transient")

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        # the commit window's timer (None: committed at the end of a turn)
        self.timer: asyncio.TimerHandle | None = None
        self.states: list[tuple[Any, ...]] = []
        # (id, task_key, seq, body)
        self.events: list[tuple[int, str, int, str]] = []
        # (sink, task_key, the event's bytes or b"", its journal row or None)
        self.outbox: list[tuple[str, str, bytes, int | None]] = []
        # the ids of task.poll_failed rows (deleted once written)
        self.transient: list[int] = []


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT; anything that fails (the COMMIT too) is rolled back."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # SQLite may have rolled back already (a full disk, an I/O error)
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.OperationalError):
                self._db.execute("ROLLBACK")
