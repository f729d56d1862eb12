"""The lease protocol of replicas: partitions of the watch list, claimed, renewed, fenced.

A replica claims expired or free partitions with `FOR UPDATE SKIP LOCKED`, on the database
clock; every claim bumps the partition's `epoch`, the fencing token. Each replica targets
ceil(P / live replicas) and sheds what it holds above that. A replica stops using a
partition `safe_s` after its last successful renewal by its own monotonic clock, whatever
the database says: a replica frozen past its lease learns it before it sends anything.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, ParamSpec, Protocol, TypeVar

import asyncpg

from enkwatch.clock import Clock
from enkwatch.errors import StateUnavailable

PARTITIONS: Final = 64
LEASE_S: Final = 15.0
# renew every third of a lease; stop polling two thirds of a lease after the last renewal
RENEW_FRACTION: Final = 1 / 3
SAFE_FRACTION: Final = 2 / 3


# a statement that changes several lease rows locks them in partition order, as an event
# batch's FOR SHARE does (pgcommit.py): in the order of a scan of the table (a row's place
# in it moves with updates) a renewal and a batch could each hold a row the other waits
# for, and PostgreSQL would abort one of them (the batch: its events were lost)
def _in_order(where: str) -> str:
    return (
        f"SELECT partition FROM enkwatch_partition_lease WHERE {where} "
        "ORDER BY partition FOR NO KEY UPDATE"
    )


_RENEW: Final = (
    "UPDATE enkwatch_partition_lease l SET expires_at = now() + make_interval(secs => $2) "
    f"FROM ({_in_order('owner = $1 AND partition = ANY($3::int[]) AND expires_at > now()')}) o "
    "WHERE l.partition = o.partition RETURNING l.partition, l.epoch"
)
_GIVE_BACK: Final = (
    "UPDATE enkwatch_partition_lease l SET owner = NULL, expires_at = 'epoch' "
    f"FROM ({_in_order('owner = $1 AND partition = ANY($2::int[])')}) o "
    "WHERE l.partition = o.partition"
)

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

_R = TypeVar("_R")
_P = ParamSpec("_P")


def describe_db_error(err: BaseException) -> str:
    """A database error without the DSN (it may carry a password)."""
    if isinstance(err, asyncpg.PostgresError):
        return f"{type(err).__name__}: {err.args[0] if err.args else ''}"
    return f"{type(err).__name__}: {getattr(err, 'strerror', None) or ''}".rstrip(": ")


def guarded(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """Turn every database failure into StateUnavailable (never a DSN in the message)."""

    @functools.wraps(method)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except DB_ERRORS as err:
            raise StateUnavailable(None, describe_db_error(err)) from None

    return wrapper


def partition_of(task_key: str, partitions: int = PARTITIONS) -> int:
    """The partition a task belongs to (stable across replicas and versions)."""
    return zlib.crc32(task_key.encode()) % partitions


@dataclass(slots=True)
class Lease:
    """A partition this replica holds."""

    epoch: int
    renewed_at: float  # our monotonic clock at the START of the renewing transaction


class PoolSource(Protocol):
    """Where the leases get their database connections (the PostgreSQL store)."""

    @property
    def pool(self) -> Any: ...


class PartitionLeases:
    """The partitions this replica holds, and the transactions that claim and renew them."""

    def __init__(
        self,
        db: PoolSource,
        replica_id: str,
        clock: Clock,
        partitions: int = PARTITIONS,
        lease_s: float = LEASE_S,
        on_takeover: Callable[[float], None] | None = None,
    ) -> None:
        self._db = db
        self.replica_id = replica_id
        self._clock = clock
        self.partitions = partitions
        self.lease_s = lease_s
        self.renew_every_s = lease_s * RENEW_FRACTION
        self.safe_s = lease_s * SAFE_FRACTION
        self.held: dict[int, Lease] = {}
        self._on_takeover = on_takeover
        self.lost_count = 0
        self.commits = 0

    def partition(self, task_key: str) -> int:
        return partition_of(task_key, self.partitions)

    def fresh(self, partition: int) -> Lease | None:
        """The lease of a partition we hold and may still use, else None."""
        lease = self.held.get(partition)
        if lease is None or self._clock.monotonic() - lease.renewed_at >= self.safe_s:
            return None
        return lease

    def usable(self, task_key: str) -> bool:
        """May we poll (and emit for) this task now: do we hold its partition, fresh?"""
        return self.fresh(self.partition(task_key)) is not None

    def fresh_partitions(self) -> list[int]:
        return [p for p in self.held if self.fresh(p) is not None]

    def owned(self) -> list[int]:
        return sorted(self.held)

    def stats(self) -> dict[str, float]:
        return {"partitions_owned": len(self.held), "leases_lost": self.lost_count}

    @guarded
    async def balance(self) -> tuple[set[int], set[int]]:
        """Heartbeat, renew, claim up to our share, shed above it: (gained, lost)."""
        started = self._clock.monotonic()
        gained: set[int] = set()
        async with self._db.pool.acquire() as conn, conn.transaction():
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
            lost = await self._renew(conn, started)
            if len(self.held) > target:
                lost.update(await self._shed(conn, target))
            elif len(self.held) < target:
                gained = await self._claim(conn, target - len(self.held), started)
        self.lost_count += len(lost - gained)
        self.commits += 1
        return gained, lost

    async def _renew(self, conn: Any, started: float) -> set[int]:
        mine = list(self.held)
        renewed = await conn.fetch(
            _RENEW,
            self.replica_id,
            self.lease_s,
            mine,
        )
        held = {r["partition"]: r["epoch"] for r in renewed}
        lost = {p for p in mine if held.get(p) != self.held[p].epoch}
        for p in lost:
            del self.held[p]
            held.pop(p, None)
        for p in held:
            self.held[p].renewed_at = started
        return lost

    async def _shed(self, conn: Any, target: int) -> set[int]:
        shed = sorted(self.held)[target:]
        await conn.execute(
            _GIVE_BACK,
            self.replica_id,
            shed,
        )
        for p in shed:
            del self.held[p]
        return set(shed)

    async def _claim(self, conn: Any, count: int, started: float) -> set[int]:
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
            count,
        )
        gained = set()
        for row in claimed:
            self.held[row["partition"]] = Lease(row["epoch"], started)
            gained.add(row["partition"])
            # taken over from a replica that stopped renewing: how long it lay orphaned
            # after its lease ran out (the lease itself comes on top)
            if self._on_takeover is not None and row["old_owner"] not in (None, self.replica_id):
                self._on_takeover(max(0.0, row["orphaned_s"]) + self.lease_s)
        return gained

    @guarded
    async def release_all(self) -> None:
        """Give every partition back at once (SIGTERM): a rolling restart hands over fast."""
        mine = list(self.held)
        self.held.clear()
        if not mine:
            return
        async with self._db.pool.acquire() as conn:
            await conn.execute(
                _GIVE_BACK,
                self.replica_id,
                mine,
            )
            await conn.execute(
                "DELETE FROM enkwatch_replicas WHERE replica_id = $1", self.replica_id
            )
