"""The PostgreSQL store: several replicas share the watch list, leases fence who polls what.

Design (measured in a prototype: 3 replicas, 500 tasks, one frozen past its lease and one
killed: 0 events duplicated, missing or out of order; ~0.01 database commits per poll):

* Tasks are hashed into P partitions (`partition_lease`, P = 64). A replica claims expired
  or free partitions with `FOR UPDATE SKIP LOCKED`, on the database clock; every claim bumps
  the partition's `epoch`, the fencing token. Each replica targets ceil(P / live replicas)
  and sheds what it holds above that, so load spreads as replicas come and go.
* A lease lasts 15 s and is renewed every 5 s. A replica stops polling a partition 10 s
  after its last successful renewal, by its own monotonic clock, whatever the database
  says: a replica frozen (SIGSTOP, a long GC, a paused VM) past its lease finds on waking
  that its window has passed, before it sends anything.
* Polls run in memory. Only an event touches the database: a transaction (shared by the
  events of polls that end close together: `pgcommit.py`) that takes a `FOR SHARE` lock
  on the partition's lease row checked against our epoch (a claimer's
  `FOR UPDATE SKIP LOCKED` cannot take it meanwhile), compare-and-sets the task's `seq`,
  inserts the event and its webhook deliveries. Zero rows = fenced or a lost race: nothing
  is emitted and the task is dropped here.
* Events committed but not confirmed written are written again by whoever next claims
  the partition (at least once, same `event_id`).
* Run-time changes of the watch list reach every replica by LISTEN/NOTIFY, with a
  periodic reconcile, since a notification is only a hint.

Session advisory locks were rejected: a SIGSTOPped holder keeps its lock (no failover),
a partitioned one keeps polling (split brain), and they break behind PgBouncer in
transaction mode.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import asyncpg
import orjson

from enkwatch.clock import Clock
from enkwatch.errors import LeaseLost, StateUnavailable
from enkwatch.models import TASK_POLL_FAILED
from enkwatch.state.base import (
    DISABLED_SINK_PREFIX,
    RESET_FIELDS,
    TASK_FIELDS,
    JournaledEvent,
    OutboxRow,
    StateError,
    TaskRecord,
    record_from_row,
    task_values,
)
from enkwatch.state.leases import (
    DB_ERRORS,
    LEASE_S,
    PARTITIONS,
    PartitionLeases,
    describe_db_error,
    guarded,
)
from enkwatch.state.pgcommit import COMMIT_DELAY_S, GroupCommit, Staged, status_of

NOTIFY_CHANNEL: Final = "enkwatch_tasks"
# confirmations of written events are committed together, at the latest this much later
CONFIRM_WITHIN_S: Final = 0.05
# a batch of confirmations that failed is tried again this much later
CONFIRM_RETRY_S: Final = 1.0
SCHEMA_VERSION: Final = 1
# a constant key for the migration's transaction-scoped advisory lock
_MIGRATION_LOCK: Final = 0x656E6B77
# the meta key stamped once the poll failures earlier versions kept were pruned
_PRUNED_KEY: Final = "journal_pruned"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS enkwatch_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS enkwatch_partition_lease (
    partition integer PRIMARY KEY,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT 'epoch'
);
CREATE TABLE IF NOT EXISTS enkwatch_replicas (
    replica_id text PRIMARY KEY,
    last_seen timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS enkwatch_tasks (
    task_key text PRIMARY KEY,
    partition integer NOT NULL,
    task_id text,
    dataset text,
    last_status text,
    last_unknown_status text,
    seen_dataset text,
    seen_task_id text,
    seq bigint NOT NULL DEFAULT 0,
    watch_started_at double precision NOT NULL,
    polls bigint NOT NULL DEFAULT 0,
    outcome text,
    spec jsonb,
    removed boolean NOT NULL DEFAULT false
);
-- added after schema 1 was released: a database of an older enkwatch gets them (NULL)
ALTER TABLE enkwatch_tasks ADD COLUMN IF NOT EXISTS status_since double precision;
ALTER TABLE enkwatch_tasks ADD COLUMN IF NOT EXISTS stalled_status text;
CREATE INDEX IF NOT EXISTS enkwatch_tasks_partition ON enkwatch_tasks (partition);
CREATE TABLE IF NOT EXISTS enkwatch_events (
    task_key text NOT NULL,
    seq bigint NOT NULL,
    partition integer NOT NULL,
    status text,
    body text NOT NULL,
    written boolean NOT NULL DEFAULT false,
    replica text NOT NULL,
    epoch bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_key, seq)
);
CREATE INDEX IF NOT EXISTS enkwatch_events_unwritten
    ON enkwatch_events (partition) WHERE NOT written;
CREATE TABLE IF NOT EXISTS enkwatch_outbox (
    id bigserial PRIMARY KEY,
    sink text NOT NULL,
    task_key text NOT NULL,
    partition integer NOT NULL,
    body bytea NOT NULL,
    created_at double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL,
    state text NOT NULL DEFAULT 'pending'
);
CREATE INDEX IF NOT EXISTS enkwatch_outbox_pending
    ON enkwatch_outbox (sink, partition, id) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS enkwatch_outbox_heads
    ON enkwatch_outbox (sink, task_key, id) WHERE state = 'pending';
"""

_TASK_COLUMNS: Final = ", ".join((*TASK_FIELDS, "spec"))
_N_TASK: Final = len(TASK_FIELDS)
# a new task's row: every field, its partition, its spec
# the oldest pending row of each task of a sink in the partitions given, soonest due first.
# The tasks are stepped through on the index enkwatch_outbox_heads (one seek per task), so the
# cost does not grow with the backlog of a sink whose receiver was down (a GROUP BY read every
# pending row, again on every event while the sink retries)
OUTBOX_HEADS: Final = (
    "WITH RECURSIVE keys(k) AS ((SELECT task_key FROM enkwatch_outbox "
    "WHERE sink = $1 AND state = 'pending' ORDER BY task_key LIMIT 1) "
    "UNION ALL SELECT (SELECT task_key FROM enkwatch_outbox "
    "WHERE sink = $1 AND state = 'pending' AND task_key > keys.k ORDER BY task_key LIMIT 1) "
    "FROM keys WHERE keys.k IS NOT NULL) "
    "SELECT id, sink, task_key, body, created_at, attempts, next_attempt_at "
    "FROM enkwatch_outbox WHERE id IN (SELECT (SELECT min(id) FROM enkwatch_outbox "
    "WHERE sink = $1 AND state = 'pending' AND task_key = keys.k "
    "AND partition = ANY($2::int[])) FROM keys WHERE keys.k IS NOT NULL) "
    "ORDER BY next_attempt_at, id LIMIT $3"
)
_INSERT_TASK: Final = (
    f"INSERT INTO enkwatch_tasks ({_TASK_COLUMNS}, partition) VALUES "
    f"({', '.join(f'${i}' for i in range(1, _N_TASK + 1))}, ${_N_TASK + 1}::jsonb, "
    f"${_N_TASK + 2}) ON CONFLICT (task_key) DO NOTHING RETURNING task_key"
)


def _record(row: Mapping[str, Any]) -> TaskRecord:
    spec = row["spec"]
    return record_from_row(
        [row[f] for f in TASK_FIELDS], orjson.loads(spec) if isinstance(spec, str) else spec
    )


def _spec_json(spec: Mapping[str, Any] | None) -> str | None:
    return orjson.dumps(dict(spec)).decode() if spec is not None else None


class PgStore:
    """State in PostgreSQL, shared by replicas; every write by a task's owner is fenced."""

    shared = True

    def __init__(
        self,
        url: str,
        replica_id: str,
        clock: Clock,
        partitions: int = PARTITIONS,
        lease_s: float = LEASE_S,
        on_takeover: Callable[[float], None] | None = None,
        commit_delay_s: float = COMMIT_DELAY_S,
    ) -> None:
        self.url = url
        self.replica_id = replica_id
        self.lease_s = lease_s
        self._clock = clock
        self.leases = PartitionLeases(self, replica_id, clock, partitions, lease_s, on_takeover)
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._outbox_stats: tuple[int, float | None] = (0, None)
        self._confirmations: list[tuple[str, int]] = []
        self._confirm_job: asyncio.TimerHandle | None = None
        self._closing = False
        # journaled task.poll_failed events not yet confirmed: deleted on confirmation (the
        # journal keeps only what replay needs of them; transitions stay as the history)
        self._transient: set[tuple[str, int]] = set()
        self._flushes: set[asyncio.Task[None]] = set()
        self._group = GroupCommit(self, clock, commit_delay_s)
        # counters for metrics
        self.fenced = 0
        self.conflicts = 0
        self.commits = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=8,
                command_timeout=max(2.0, self.lease_s / 3),
                server_settings={"application_name": self.application_name},
            )
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(_SCHEMA)
                version = await conn.fetchval(
                    "SELECT value FROM enkwatch_meta WHERE key = 'schema_version'"
                )
                if version is None:
                    await conn.execute(
                        "INSERT INTO enkwatch_meta (key, value) VALUES ('schema_version', $1)",
                        str(SCHEMA_VERSION),
                    )
                elif not version.isdigit() or int(version) > SCHEMA_VERSION:
                    raise StateError(f"the database was written by a newer enkwatch ({version})")
                await _prune_once(conn)
                await conn.execute(
                    "INSERT INTO enkwatch_partition_lease (partition) "
                    "SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING",
                    self.leases.partitions,
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            await self.close()
            why = describe_db_error(err)
            raise StateError(f"cannot open the PostgreSQL state: {why}") from None

    async def close(self) -> None:
        self._closing = True
        if self._pool is not None:
            await self._group.close()  # events of polls cut short at shutdown still commit
        if self._confirm_job is not None:
            self._confirm_job.cancel()
            self._confirm_job = None
        await self.flush_confirmations()
        if self._listener is not None:
            try:
                await self._listener.close(timeout=2)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
                self._listener.terminate()
            self._listener = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except TimeoutError:
                self._pool.terminate()
            self._pool = None

    @property
    def application_name(self) -> str:
        return f"enkwatch {self.replica_id}"[:63]

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PgStore used before open()")
        return self._pool

    # -- the watch list --------------------------------------------------------------------

    @guarded
    async def load_tasks(self, partitions: Iterable[int] | None = None) -> dict[str, TaskRecord]:
        """Every watched (not removed) task, or those of some partitions."""
        query = f"SELECT {_TASK_COLUMNS} FROM enkwatch_tasks WHERE NOT removed"
        async with self.pool.acquire() as conn:
            if partitions is None:
                rows = await conn.fetch(query)
            else:
                rows = await conn.fetch(query + " AND partition = ANY($1::int[])", list(partitions))
        return {r["task_key"]: _record(r) for r in rows}

    @guarded
    async def load_task(self, task_key: str) -> TaskRecord | None:
        """One watched task by its key (a primary-key lookup), or None."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_TASK_COLUMNS} FROM enkwatch_tasks WHERE task_key = $1 AND NOT removed",
                task_key,
            )
        return _record(row) if row is not None else None

    async def add_task(self, record: TaskRecord) -> None:
        await self.add_tasks([record])

    @guarded
    async def add_tasks(self, records: Sequence[TaskRecord]) -> None:
        """Insert tasks not yet known; known ones (and removed ones) keep what is stored."""
        if not records:
            return
        async with self.pool.acquire() as conn:
            await conn.executemany(_INSERT_TASK, [self._task_row(r) for r in records])

    def _task_row(self, r: TaskRecord) -> tuple[Any, ...]:
        return (*task_values(r), _spec_json(r.spec), self.leases.partition(r.task_key))

    async def import_state(
        self,
        records: Iterable[TaskRecord],
        events: Iterable[JournaledEvent],
        outbox: Iterable[OutboxRow],
        replica: str,
        unwritten: frozenset[tuple[str, int]] = frozenset(),
    ) -> tuple[int, int, int]:
        """Copy another store's tasks (kept when already here), their journal and their
        pending deliveries, in one transaction: (tasks, events, deliveries) copied. The
        events named in `unwritten` (task_key, seq) were never confirmed written there: the
        replica that claims their partition writes them (else they would be lost)."""
        part = self.leases.partition
        async with self.pool.acquire() as conn, conn.transaction():
            copied: set[str] = set()
            for rec in records:
                if await conn.fetchval(_INSERT_TASK, *self._task_row(rec)) is not None:
                    copied.add(rec.task_key)
            n_events = 0
            for e in (e for e in events if e.task_key in copied):
                await conn.execute(
                    "INSERT INTO enkwatch_events (task_key, seq, partition, status, body, "
                    "written, replica, epoch) VALUES ($1, $2, $3, $4, $5, $6, $7, 0)",
                    e.task_key,
                    e.seq,
                    part(e.task_key),
                    status_of(e.body),
                    orjson.dumps(e.body).decode(),
                    (e.task_key, e.seq) not in unwritten,
                    replica,
                )
                n_events += 1
            n_outbox = 0
            for row in (r for r in outbox if not r.task_key or r.task_key in copied):
                await conn.execute(
                    "INSERT INTO enkwatch_outbox (sink, task_key, partition, body, created_at, "
                    "attempts, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    row.sink,
                    row.task_key,
                    part(row.task_key) if row.task_key else 0,
                    row.body,
                    row.created_at,
                    row.attempts,
                    row.next_attempt_at,
                )
                n_outbox += 1
        return len(copied), n_events, n_outbox

    async def import_disabled_sinks(self, marks: Mapping[str, str]) -> int:
        """Copy the marks of sinks disabled by a 410 (a mark already here is kept): how many."""
        copied = 0
        async with self.pool.acquire() as conn, conn.transaction():
            for sink, fingerprint in marks.items():
                status = await conn.execute(
                    "INSERT INTO enkwatch_meta (key, value) VALUES ($1, $2) "
                    "ON CONFLICT (key) DO NOTHING",
                    DISABLED_SINK_PREFIX + sink,
                    fingerprint,
                )
                copied += int(status.rsplit(" ", 1)[-1])
        return copied

    @guarded
    async def set_task_spec(self, task_key: str, spec: Mapping[str, Any] | None) -> None:
        """Add (spec) or remove (None) a task of the shared watch list; durable, then notify."""
        async with self.pool.acquire() as conn, conn.transaction():
            if spec is None:
                await conn.execute(
                    "UPDATE enkwatch_tasks SET spec = NULL, removed = true WHERE task_key = $1",
                    task_key,
                )
            else:
                await conn.execute(
                    "UPDATE enkwatch_tasks SET spec = $2::jsonb, removed = false "
                    "WHERE task_key = $1",
                    task_key,
                    _spec_json(spec),
                )
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, task_key)

    @guarded
    async def status_times(self) -> dict[str, str]:
        """The timestamp of each task's last transition (from the journal)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT ON (task_key) task_key, body::jsonb ->> 'timestamp' AS at "
                "FROM enkwatch_events WHERE body::jsonb ->> 'event' = 'task.transition' "
                "ORDER BY task_key, seq DESC"
            )
        return {r["task_key"]: r["at"] for r in rows if r["at"] is not None}

    @guarded
    async def reset_task(self, task_key: str, watch_started_at: float) -> bool:
        """`forget`: a task that ended is watched again as if new (durable, then notify);
        False if it has not ended. An ended task is polled by nobody, so nothing races."""
        cleared = ", ".join(f"{c} = NULL" for c in RESET_FIELDS)
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                f"UPDATE enkwatch_tasks SET {cleared}, polls = 0, watch_started_at = $2 "
                "WHERE task_key = $1 AND outcome IS NOT NULL",
                task_key,
                watch_started_at,
            )
            if status != "UPDATE 1":
                return False
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, task_key)
        return True

    @guarded
    async def listen(self, callback: Callable[[str], None]) -> None:
        """Call `callback(task_key)` when another replica changes the watch list."""
        self._listener = await asyncpg.connect(
            self.url, server_settings={"application_name": self.application_name}
        )
        await self._listener.add_listener(
            NOTIFY_CHANNEL, lambda _c, _pid, _channel, payload: callback(payload)
        )

    # -- events (fenced) -------------------------------------------------------------------

    async def record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str] = ()
    ) -> None:
        """Store the task's new state, its event and deliveries, or raise LeaseLost.

        StateUnavailable when the database did not answer: the commit may or may not have
        happened; the caller drops the task and a later claim reloads it (and replays it).
        """
        try:
            await self._record_event(record, event, sinks)
        except DB_ERRORS as err:
            raise StateUnavailable(record.task_key, describe_db_error(err)) from None

    async def _record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str]
    ) -> None:
        p = self.leases.partition(record.task_key)
        lease = self.leases.fresh(p)
        if lease is None:
            self.fenced += 1
            raise LeaseLost(record.task_key, "this replica does not hold the partition")
        body = orjson.dumps(event if type(event) is dict else dict(event)).decode()
        await self._group.record(Staged(record, event, body, p, lease.epoch, sinks))

    def committed(self, task_key: str, seq: int, event: Mapping[str, Any]) -> None:
        """An event of ours was committed (the group commit's report)."""
        if _is_transient(event):
            self._transient.add((task_key, seq))

    async def mark_written(self, task_key: str, seq: int) -> None:
        self.confirm_written(task_key, seq)

    def confirm_written(self, task_key: str, seq: int) -> None:
        """Confirm that an event was written out; confirmations go in batches.

        They are committed together CONFIRM_WITHIN_S later (one round trip for all the events
        of that moment). A replica killed in that window has the events written again by
        the next owner of the partition, with the same event_id; nothing is lost.
        """
        self._confirmations.append((task_key, seq))
        if self._confirm_job is None:
            self._confirm_job = asyncio.get_running_loop().call_later(
                CONFIRM_WITHIN_S, self._spawn_flush
            )

    def commit_now(self) -> None:
        """Shutdown: no more commit window (the open batch commits at the end of this turn)."""
        self._group.commit_now()

    def concurrent_writers(self, count: int) -> None:
        """Batches commit at once when they hold half the polls that may run."""
        self._group.concurrent_writers(count)

    def _spawn_flush(self) -> None:
        self._confirm_job = None
        job = asyncio.ensure_future(self.flush_confirmations())
        self._flushes.add(job)
        job.add_done_callback(self._flushes.discard)

    async def flush_confirmations(self) -> None:
        """Commit the pending confirmations (also called before close)."""
        batch, self._confirmations = self._confirmations, []
        if not batch or self._pool is None:
            return
        transient = self._transient
        drop = [c for c in batch if c in transient] if transient else []
        keep = [c for c in batch if c not in transient] if drop else batch
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if drop:
                    await conn.executemany(
                        "DELETE FROM enkwatch_events WHERE task_key = $1 AND seq = $2", drop
                    )
                if keep:
                    await conn.executemany(
                        "UPDATE enkwatch_events SET written = true "
                        "WHERE task_key = $1 AND seq = $2",
                        keep,
                    )
            self.commits += 1
        except DB_ERRORS:
            # kept for the next flush: a replica that keeps its partitions would otherwise
            # leave these events unconfirmed for good (replayed only by another owner)
            self._confirmations[:0] = batch
            if self._confirm_job is None and not self._closing:
                self._confirm_job = asyncio.get_running_loop().call_later(
                    CONFIRM_RETRY_S, self._spawn_flush
                )
            return
        transient.difference_update(drop)

    @guarded
    async def unwritten_events(
        self, partitions: Iterable[int] | None = None
    ) -> list[JournaledEvent]:
        parts = list(self.leases.held) if partitions is None else list(partitions)
        await self.flush_confirmations()  # our own written events are not to be replayed
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT task_key, seq, body FROM enkwatch_events "
                "WHERE NOT written AND partition = ANY($1::int[]) ORDER BY task_key, seq",
                parts,
            )
        out = [JournaledEvent(r["task_key"], r["seq"], orjson.loads(r["body"])) for r in rows]
        self._transient.update((e.task_key, e.seq) for e in out if _is_transient(e.body))
        return out

    @guarded
    async def checkpoint_polls(self, polls: Iterable[tuple[str, int]]) -> None:
        items = list(polls)
        if not items:
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE enkwatch_tasks t SET polls = GREATEST(t.polls, v.polls) "
                "FROM unnest($1::text[], $2::bigint[]) AS v(task_key, polls) "
                "WHERE t.task_key = v.task_key",
                [k for k, _ in items],
                [n for _, n in items],
            )
        self.commits += 1

    # -- the webhook outbox ----------------------------------------------------------------

    async def _enqueue(
        self,
        conn: asyncpg.Connection,
        sinks: Sequence[str],
        task_key: str,
        partition: int,
        body: bytes,
    ) -> None:
        now = self._clock.now().timestamp()
        await conn.executemany(
            "INSERT INTO enkwatch_outbox (sink, task_key, partition, body, created_at, "
            "next_attempt_at) VALUES ($1, $2, $3, $4, $5, $5)",
            [(sink, task_key, partition, body, now) for sink in sinks],
        )

    @guarded
    async def enqueue(self, sinks: Sequence[str], event: Mapping[str, Any]) -> None:
        """Deliveries of an event that is not about a task (partition 0's owner sends them)."""
        if not sinks:
            return
        async with self.pool.acquire() as conn:
            await self._enqueue(conn, sinks, "", 0, orjson.dumps(dict(event)))

    @guarded
    async def pending_deliveries(self, sink: str, limit: int) -> list[OutboxRow]:
        """Deliveries of the partitions we hold: one sender per task at a time, in order."""
        parts = self.leases.fresh_partitions()
        if not parts:
            return []
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT id, sink, task_key, body, created_at, attempts, next_attempt_at "
                "FROM enkwatch_outbox WHERE sink = $1 AND state = 'pending' "
                "AND partition = ANY($2::int[]) ORDER BY id LIMIT $3",
                sink,
                parts,
                limit,
            )
        return [_outbox_row(r) for r in rows]

    @guarded
    async def outbox_heads(self, sink: str, limit: int) -> list[OutboxRow]:
        """The oldest pending delivery of each task of the partitions we hold, soonest due
        first (one sender per task at a time, in order; the rows behind a head are not read;
        heads waiting for a retry never hide a due one behind the limit)."""
        parts = self.leases.fresh_partitions()
        if not parts:
            return []
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(OUTBOX_HEADS, sink, parts, limit)
        return [_outbox_row(r) for r in rows]

    async def delivery_done(self, row_id: int) -> None:
        await self.deliveries_done([row_id])

    @guarded
    async def deliveries_done(self, row_ids: Sequence[int]) -> None:
        """Delete delivered rows: one statement for many."""
        if not row_ids:
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM enkwatch_outbox WHERE id = ANY($1::bigint[])", list(row_ids)
            )

    @guarded
    async def delivery_retry(self, row_id: int, attempts: int, next_attempt_at: float) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE enkwatch_outbox SET attempts = $2, next_attempt_at = $3 WHERE id = $1",
                row_id,
                attempts,
                next_attempt_at,
            )

    @guarded
    async def delivery_dead(self, row_id: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE enkwatch_outbox SET state = 'dead' WHERE id = $1", row_id)

    @guarded
    async def disabled_sinks(self) -> dict[str, str]:
        """The sinks disabled by a 410 Gone, each with the fingerprint of its config then."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT key, value FROM enkwatch_meta WHERE key LIKE $1",
                DISABLED_SINK_PREFIX + "%",
            )
        return {str(r["key"]).removeprefix(DISABLED_SINK_PREFIX): str(r["value"]) for r in rows}

    @guarded
    async def disable_sink(self, sink: str, fingerprint: str) -> int:
        """Remember a disabled sink; its pending deliveries are dropped (returns how many)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO enkwatch_meta (key, value) VALUES ($1, $2) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                DISABLED_SINK_PREFIX + sink,
                fingerprint,
            )
            status = await conn.execute(
                "UPDATE enkwatch_outbox SET state = 'dead' WHERE sink = $1 AND state = 'pending'",
                sink,
            )
        return int(status.rsplit(" ", 1)[-1])

    @guarded
    async def enable_sink(self, sink: str) -> None:
        """Forget that a sink was disabled (its config changed)."""
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM enkwatch_meta WHERE key = $1", DISABLED_SINK_PREFIX + sink
            )

    def outbox_stats(self) -> tuple[int, float | None]:
        return self._outbox_stats

    @guarded
    async def refresh_outbox_stats(self) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, min(created_at) AS oldest FROM enkwatch_outbox "
                "WHERE state = 'pending'"
            )
        oldest = row["oldest"]
        now = self._clock.now().timestamp()
        self._outbox_stats = (int(row["n"]), now - oldest if oldest else None)


def _outbox_row(r: asyncpg.Record) -> OutboxRow:
    return OutboxRow(
        r["id"],
        r["sink"],
        r["task_key"],
        bytes(r["body"]),
        r["created_at"],
        r["attempts"],
        r["next_attempt_at"],
    )


def _is_transient(event: Mapping[str, Any]) -> bool:
    """A journal row deleted once its writing is confirmed (not part of the history)."""
    return event.get("event") == TASK_POLL_FAILED


async def _prune_once(conn: asyncpg.Connection) -> None:
    """Delete the confirmed poll failures an earlier version kept (one scan, once)."""
    if await conn.fetchval("SELECT 1 FROM enkwatch_meta WHERE key = $1", _PRUNED_KEY):
        return
    await conn.execute(
        "DELETE FROM enkwatch_events WHERE written AND status IS NULL "
        "AND body::jsonb ->> 'event' = $1",
        TASK_POLL_FAILED,
    )
    await conn.execute("INSERT INTO enkwatch_meta (key, value) VALUES ($1, '1')", _PRUNED_KEY)
