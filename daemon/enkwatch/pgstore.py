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
* Polls run in memory. Only an event touches the database: one transaction that takes a
  `FOR SHARE` lock on the partition's lease row checked against our epoch (a claimer's
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
import functools
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, TypeVar

import asyncpg
import orjson

from enkwatch.errors import LeaseLost, StateUnavailable
from enkwatch.store import JournaledEvent, OutboxRow, StateError, TaskRecord

PARTITIONS: Final = 64
LEASE_S: Final = 15.0
# renew every third of a lease; stop polling two thirds of a lease after the last renewal
RENEW_FRACTION: Final = 1 / 3
SAFE_FRACTION: Final = 2 / 3
NOTIFY_CHANNEL: Final = "enkwatch_tasks"
# confirmations of written events are committed together, at the latest this much later
CONFIRM_WITHIN_S: Final = 0.05
SCHEMA_VERSION: Final = 1
# a constant key for the migration's transaction-scoped advisory lock
_MIGRATION_LOCK: Final = 0x656E6B77

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
"""

# what a lost connection, a killed backend or a stopped server raise
# InternalClientError: asyncpg's protocol state after the server cut a connection in the
# middle of an operation ("cannot switch to state 11; another operation is in progress")
DB_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

_TASK_COLUMNS: Final = (
    "task_key, task_id, dataset, watch_started_at, last_status, last_unknown_status, "
    "seen_dataset, seen_task_id, seq, polls, outcome, spec"
)


@dataclass(slots=True)
class Lease:
    """A partition this replica holds."""

    epoch: int
    renewed_at: float  # our monotonic clock at the START of the renewing transaction


_R = TypeVar("_R")
_P = ParamSpec("_P")


def _guarded(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Turn every database failure into StateUnavailable (never a DSN in the message)."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except DB_ERRORS as err:
            raise StateUnavailable(None, _describe(err)) from None

    return wrapper


def partition_of(task_key: str, partitions: int = PARTITIONS) -> int:
    """The partition a task belongs to (stable across replicas and versions)."""
    return zlib.crc32(task_key.encode()) % partitions


def _record(row: Mapping[str, Any]) -> TaskRecord:
    spec = row["spec"]
    return TaskRecord(
        task_key=row["task_key"],
        task_id=row["task_id"],
        dataset=row["dataset"],
        watch_started_at=row["watch_started_at"],
        last_status=row["last_status"],
        last_unknown_status=row["last_unknown_status"],
        seen_dataset=row["seen_dataset"],
        seen_task_id=row["seen_task_id"],
        seq=row["seq"],
        polls=row["polls"],
        outcome=row["outcome"],
        spec=orjson.loads(spec) if isinstance(spec, str) else spec,
    )


class PgStore:
    """State in PostgreSQL, shared by replicas; every write by a task's owner is fenced."""

    shared = True

    def __init__(
        self,
        url: str,
        replica_id: str,
        partitions: int = PARTITIONS,
        lease_s: float = LEASE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.replica_id = replica_id
        self.partitions = partitions
        self.lease_s = lease_s
        self.renew_every_s = lease_s * RENEW_FRACTION
        self.safe_s = lease_s * SAFE_FRACTION
        self._monotonic = monotonic
        self.leases: dict[int, Lease] = {}
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._outbox_stats: tuple[int, float | None] = (0, None)
        self._confirmations: list[tuple[str, int]] = []
        self._confirm_job: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        # counters for metrics
        self.on_takeover: Callable[[float], None] = lambda seconds: None
        self.leases_lost = 0
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
                await conn.execute(
                    "INSERT INTO enkwatch_partition_lease (partition) "
                    "SELECT generate_series(0, $1 - 1) ON CONFLICT DO NOTHING",
                    self.partitions,
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            await self.close()
            raise StateError(f"cannot open the PostgreSQL state: {_describe(err)}") from None

    async def close(self) -> None:
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

    # -- leases ----------------------------------------------------------------------------

    def usable(self, task_key: str) -> bool:
        """May we poll (and emit for) this task now: do we hold its partition, fresh?"""
        lease = self.leases.get(partition_of(task_key, self.partitions))
        return lease is not None and self._monotonic() - lease.renewed_at < self.safe_s

    def replication_stats(self) -> dict[str, float]:
        """For metrics."""
        return {
            "partitions_owned": len(self.leases),
            "leases_lost": self.leases_lost,
            "fenced": self.fenced,
            "conflicts": self.conflicts,
            "commits": self.commits,
        }

    def owned_partitions(self) -> list[int]:
        return sorted(self.leases)

    @_guarded
    async def balance(self) -> tuple[set[int], set[int]]:
        """Heartbeat, renew, claim up to our share, shed above it: (gained, lost)."""
        started = self._monotonic()
        lost: set[int] = set()
        gained: set[int] = set()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO enkwatch_replicas (replica_id, last_seen) VALUES ($1, now()) "
                "ON CONFLICT (replica_id) DO UPDATE SET last_seen = now()",
                self.replica_id,
            )
            live = await conn.fetchval(
                "SELECT count(*) FROM enkwatch_replicas "
                "WHERE last_seen > now() - make_interval(secs => $1)",
                self.lease_s,
            )
            target = math.ceil(self.partitions / max(1, int(live)))
            mine = list(self.leases)
            renewed = await conn.fetch(
                "UPDATE enkwatch_partition_lease "
                "SET expires_at = now() + make_interval(secs => $2) "
                "WHERE owner = $1 AND partition = ANY($3::int[]) AND expires_at > now() "
                "RETURNING partition, epoch",
                self.replica_id,
                self.lease_s,
                mine,
            )
            held = {r["partition"]: r["epoch"] for r in renewed}
            for p in mine:
                if held.get(p) != self.leases[p].epoch:
                    lost.add(p)
            for p in lost:
                del self.leases[p]
                held.pop(p, None)
            for p in held:
                self.leases[p].renewed_at = started
            if len(self.leases) > target:
                shed = sorted(self.leases)[target:]
                await conn.execute(
                    "UPDATE enkwatch_partition_lease SET owner = NULL, expires_at = 'epoch' "
                    "WHERE owner = $1 AND partition = ANY($2::int[])",
                    self.replica_id,
                    shed,
                )
                for p in shed:
                    del self.leases[p]
                lost.update(shed)
            elif len(self.leases) < target:
                claimed = await conn.fetch(
                    "WITH free AS ("
                    "  SELECT partition, owner AS old_owner, expires_at AS old_expiry"
                    "  FROM enkwatch_partition_lease"
                    "  WHERE expires_at <= now() OR owner IS NULL"
                    "  ORDER BY partition FOR UPDATE SKIP LOCKED LIMIT $3)"
                    " UPDATE enkwatch_partition_lease l SET owner = $1, epoch = l.epoch + 1,"
                    "   expires_at = now() + make_interval(secs => $2)"
                    " FROM free WHERE l.partition = free.partition"
                    " RETURNING l.partition, l.epoch, free.old_owner,"
                    "   extract(epoch FROM now() - free.old_expiry)::float8 AS orphaned_s",
                    self.replica_id,
                    self.lease_s,
                    target - len(self.leases),
                )
                for row in claimed:
                    self.leases[row["partition"]] = Lease(row["epoch"], started)
                    gained.add(row["partition"])
                    if row["old_owner"] not in (None, self.replica_id):
                        # taken over from a replica that stopped renewing: how long it lay
                        # orphaned after its lease ran out (the lease itself comes on top)
                        self.on_takeover(max(0.0, row["orphaned_s"]) + self.lease_s)
        self.leases_lost += len(lost - gained)
        self.commits += 1
        return gained, lost

    @_guarded
    async def release_all(self) -> None:
        """Give every partition back at once (SIGTERM): a rolling restart hands over fast."""
        mine = list(self.leases)
        self.leases.clear()
        if not mine:
            return
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE enkwatch_partition_lease SET owner = NULL, expires_at = 'epoch' "
                "WHERE owner = $1 AND partition = ANY($2::int[])",
                self.replica_id,
                mine,
            )
            await conn.execute(
                "DELETE FROM enkwatch_replicas WHERE replica_id = $1", self.replica_id
            )

    # -- the watch list --------------------------------------------------------------------

    @_guarded
    async def load_tasks(self, partitions: Iterable[int] | None = None) -> dict[str, TaskRecord]:
        """Every watched (not removed) task, or those of some partitions."""
        query = f"SELECT {_TASK_COLUMNS} FROM enkwatch_tasks WHERE NOT removed"
        async with self.pool.acquire() as conn:
            if partitions is None:
                rows = await conn.fetch(query)
            else:
                rows = await conn.fetch(query + " AND partition = ANY($1::int[])", list(partitions))
        return {r["task_key"]: _record(r) for r in rows}

    @_guarded
    async def removed_keys(self) -> set[str]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch("SELECT task_key FROM enkwatch_tasks WHERE removed")
        return {r["task_key"] for r in rows}

    async def add_task(self, record: TaskRecord) -> None:
        await self.add_tasks([record])

    @_guarded
    async def add_tasks(self, records: Sequence[TaskRecord]) -> None:
        """Insert tasks not yet known; known ones (and removed ones) keep what is stored."""
        if not records:
            return
        async with self.pool.acquire() as conn:
            await conn.executemany(
                "INSERT INTO enkwatch_tasks (task_key, partition, task_id, dataset, "
                "watch_started_at, spec) VALUES ($1, $2, $3, $4, $5, $6::jsonb) "
                "ON CONFLICT (task_key) DO NOTHING",
                [
                    (
                        r.task_key,
                        partition_of(r.task_key, self.partitions),
                        r.task_id,
                        r.dataset,
                        r.watch_started_at,
                        orjson.dumps(r.spec).decode() if r.spec is not None else None,
                    )
                    for r in records
                ],
            )

    @_guarded
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
                    orjson.dumps(dict(spec)).decode(),
                )
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, task_key)

    @_guarded
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
            raise StateUnavailable(record.task_key, _describe(err)) from None

    async def _record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str]
    ) -> None:
        p = partition_of(record.task_key, self.partitions)
        lease = self.leases.get(p)
        if lease is None or self._monotonic() - lease.renewed_at >= self.safe_s:
            self.fenced += 1
            raise LeaseLost(record.task_key, "this replica does not hold the partition")
        body = orjson.dumps(dict(event))
        async with self.pool.acquire() as conn, conn.transaction():
            held = await conn.fetchval(
                "SELECT epoch FROM enkwatch_partition_lease WHERE partition = $1 AND owner = $2 "
                "AND epoch = $3 AND expires_at > now() FOR SHARE",
                p,
                self.replica_id,
                lease.epoch,
            )
            if held is None:
                self.fenced += 1
                raise LeaseLost(record.task_key, "the partition's lease was lost (fenced)")
            updated = await conn.fetchval(
                "UPDATE enkwatch_tasks SET last_status = $2, last_unknown_status = $3, "
                "seen_dataset = $4, seen_task_id = $5, seq = $6, polls = $7, outcome = $8 "
                "WHERE task_key = $1 AND seq = $9 RETURNING seq",
                record.task_key,
                record.last_status,
                record.last_unknown_status,
                record.seen_dataset,
                record.seen_task_id,
                record.seq,
                record.polls,
                record.outcome,
                record.seq - 1,
            )
            if updated is None:
                self.conflicts += 1
                raise LeaseLost(record.task_key, "another writer moved the task's seq (lost race)")
            await conn.execute(
                "INSERT INTO enkwatch_events (task_key, seq, partition, status, body, replica, "
                "epoch) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                record.task_key,
                record.seq,
                p,
                event.get("status") if event.get("event") == "task.transition" else None,
                body.decode(),
                self.replica_id,
                lease.epoch,
            )
            if sinks:
                await self._enqueue(conn, sinks, record.task_key, p, body)
        self.commits += 1

    async def mark_written(self, task_key: str, seq: int) -> None:
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
        try:
            async with self.pool.acquire() as conn:
                await conn.executemany(
                    "UPDATE enkwatch_events SET written = true WHERE task_key = $1 AND seq = $2",
                    batch,
                )
            self.commits += 1
        except DB_ERRORS:
            pass  # unconfirmed: written again by the next claim of the partition (same id)

    @_guarded
    async def unwritten_events(
        self, partitions: Iterable[int] | None = None
    ) -> list[JournaledEvent]:
        parts = list(self.leases) if partitions is None else list(partitions)
        await self.flush_confirmations()  # our own written events are not to be replayed
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT task_key, seq, body FROM enkwatch_events "
                "WHERE NOT written AND partition = ANY($1::int[]) ORDER BY task_key, seq",
                parts,
            )
        return [JournaledEvent(r["task_key"], r["seq"], orjson.loads(r["body"])) for r in rows]

    @_guarded
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
        now = time.time()
        await conn.executemany(
            "INSERT INTO enkwatch_outbox (sink, task_key, partition, body, created_at, "
            "next_attempt_at) VALUES ($1, $2, $3, $4, $5, $5)",
            [(sink, task_key, partition, body, now) for sink in sinks],
        )

    @_guarded
    async def enqueue(self, sinks: Sequence[str], event: Mapping[str, Any]) -> None:
        """Deliveries of an event that is not about a task (partition 0's owner sends them)."""
        if not sinks:
            return
        async with self.pool.acquire() as conn:
            await self._enqueue(conn, sinks, "", 0, orjson.dumps(dict(event)))

    @_guarded
    async def pending_deliveries(self, sink: str, limit: int) -> list[OutboxRow]:
        """Deliveries of the partitions we hold: one sender per task at a time, in order."""
        parts = [p for p, lease in self.leases.items() if self._fresh(lease)]
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
        return [
            OutboxRow(
                r["id"],
                r["sink"],
                r["task_key"],
                bytes(r["body"]),
                r["created_at"],
                r["attempts"],
                r["next_attempt_at"],
            )
            for r in rows
        ]

    def _fresh(self, lease: Lease) -> bool:
        return self._monotonic() - lease.renewed_at < self.safe_s

    @_guarded
    async def delivery_done(self, row_id: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("DELETE FROM enkwatch_outbox WHERE id = $1", row_id)

    @_guarded
    async def delivery_retry(self, row_id: int, attempts: int, next_attempt_at: float) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "UPDATE enkwatch_outbox SET attempts = $2, next_attempt_at = $3 WHERE id = $1",
                row_id,
                attempts,
                next_attempt_at,
            )

    @_guarded
    async def delivery_dead(self, row_id: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute("UPDATE enkwatch_outbox SET state = 'dead' WHERE id = $1", row_id)

    def outbox_stats(self) -> tuple[int, float | None]:
        return self._outbox_stats

    @_guarded
    async def refresh_outbox_stats(self) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT count(*) AS n, min(created_at) AS oldest FROM enkwatch_outbox "
                "WHERE state = 'pending'"
            )
        oldest = row["oldest"]
        self._outbox_stats = (int(row["n"]), time.time() - oldest if oldest else None)


def _describe(err: BaseException) -> str:
    # never the DSN: it may carry a password
    if isinstance(err, asyncpg.PostgresError):
        return f"{type(err).__name__}: {err.args[0] if err.args else ''}"
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or ''}".rstrip(": ")


def is_postgres_url(path: str) -> bool:
    return path.startswith(("postgresql://", "postgres://"))


Opener = Callable[[], Awaitable[None]]
