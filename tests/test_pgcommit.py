"""PostgreSQL group commit against a real server: one transaction for many polls' events,
each still fenced and compare-and-set on its own."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from enkwatch.errors import LeaseLost, StateUnavailable
from enkwatch.state.base import TaskRecord
from enkwatch.state.leases import partition_of
from enkwatch.state.postgres import PgStore
from tests.kit import until
from tests.pgkit import HOW_TO_ENABLE, find_bin_dir
from tests.test_state_postgres import Clock, open_store, transition

BIN = find_bin_dir()
pytestmark = pytest.mark.skipif(BIN is None, reason=HOW_TO_ENABLE)


def keys_in_two_partitions(n: int) -> tuple[list[str], list[str]]:
    """n task keys of one partition and n of another."""
    by_part: dict[int, list[str]] = {}
    i = 0
    while True:
        key = f"task-{i}"
        i += 1
        keys = by_part.setdefault(partition_of(key), [])
        keys.append(key)
        full = [k for k in by_part.values() if len(k) >= n]
        if len(full) >= 2:
            return full[0][:n], full[1][:n]


async def add(store: PgStore, keys: list[str]) -> list[TaskRecord]:
    records = [TaskRecord(k, k, None, 0.0) for k in keys]
    await store.add_tasks(records)
    return records


async def journal(dsn: str) -> list[tuple[str, int]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT task_key, seq FROM enkwatch_events ORDER BY task_key")
        return [(r["task_key"], r["seq"]) for r in rows]
    finally:
        await conn.close()


async def test_events_of_polls_ending_together_share_one_transaction(dsn: str) -> None:
    store = await open_store(dsn, "a")
    try:
        await store.leases.balance()
        records = await add(store, [f"t{i}" for i in range(20)])
        before = store.commits
        await asyncio.gather(*(store.record_event(r, transition(r, "Queued")) for r in records))
        assert store.commits - before == 1  # one commit for the twenty (before: twenty)
        assert sorted(await journal(dsn)) == sorted((r.task_key, 1) for r in records)
        loaded = await store.load_tasks()
        assert {k: (t.seq, t.last_status) for k, t in loaded.items()} == {
            r.task_key: (1, "Queued") for r in records
        }
    finally:
        await store.close()


async def test_a_fenced_partition_fails_only_its_own_events(dsn: str) -> None:
    store = await open_store(dsn, "a")
    admin = await asyncpg.connect(dsn)
    try:
        await store.leases.balance()
        kept_keys, fenced_keys = keys_in_two_partitions(3)
        kept, fenced = await add(store, kept_keys), await add(store, fenced_keys)
        # another replica took the partition (epoch + 1) while we still believe we hold it
        await admin.execute(
            "UPDATE enkwatch_partition_lease SET owner = 'b', epoch = epoch + 1 "
            "WHERE partition = $1",
            partition_of(fenced_keys[0]),
        )
        results = await asyncio.gather(
            *(store.record_event(r, transition(r, "Queued")) for r in kept + fenced),
            return_exceptions=True,
        )
        assert results[:3] == [None, None, None]
        for lost in results[3:]:
            assert isinstance(lost, LeaseLost) and "fenced" in str(lost)
        assert store.fenced == 3
        assert sorted(await journal(dsn)) == sorted((k, 1) for k in kept_keys)
    finally:
        await admin.close()
        await store.close()


async def test_a_failed_transaction_commits_nothing_of_its_batch(dsn: str) -> None:
    store = await open_store(dsn, "a")
    admin = await asyncpg.connect(dsn)
    try:
        await store.leases.balance()
        records = await add(store, ["x1", "x2", "x3"])
        # a row in the way of x2's insert: the whole transaction fails
        await admin.execute(
            "INSERT INTO enkwatch_events (task_key, seq, partition, body, replica, epoch) "
            "VALUES ('x2', 1, 0, '{}', 'other', 0)"
        )
        results = await asyncio.gather(
            *(store.record_event(r, transition(r, "Queued")) for r in records),
            return_exceptions=True,
        )
        assert all(isinstance(r, StateUnavailable) for r in results), results
        assert await journal(dsn) == [("x2", 1)]  # only the row in the way
        loaded = await store.load_tasks()
        assert all(t.seq == 0 and t.last_status is None for t in loaded.values())
    finally:
        await admin.close()
        await store.close()


async def test_a_window_groups_events_and_close_commits_the_open_batch(dsn: str) -> None:
    # a window of an hour: only the batch's size or the store's close can commit it
    store = PgStore(dsn, "a", Clock(), lease_s=15.0, commit_delay_s=3600.0)
    await store.open()
    closed = False
    try:
        await store.leases.balance()
        first, *rest = await add(store, [f"w{i}" for i in range(6)])
        await store.record_event(first, transition(first, "Queued"))  # rare: this turn
        store.concurrent_writers(4)  # a batch commits at once with 2 events
        pair = [
            asyncio.ensure_future(store.record_event(r, transition(r, "Queued"))) for r in rest[:2]
        ]
        await asyncio.gather(*pair)  # full: committed without waiting for the window
        last: list[asyncio.Future[None]] = [
            asyncio.ensure_future(store.record_event(rest[2], transition(rest[2], "Queued")))
        ]
        await asyncio.sleep(0)  # staged, waiting for its window
        assert not last[0].done()
        await store.close()  # SIGTERM's path: what is open commits
        closed = True
        await last[0]
        assert len(await journal(dsn)) == 4
    finally:
        if not closed:
            await store.close()


async def waiters(admin: asyncpg.Connection, n: int) -> bool:
    """At least n sessions of this database wait for a lock."""
    count = await admin.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return int(count) >= n


async def test_a_batch_over_two_partitions_and_a_renewal_do_not_deadlock(dsn: str) -> None:
    # the batch takes its lease rows in partition order (FOR SHARE); the renewal must take
    # them in the same order, whatever the rows' places in the table, else each holds a row
    # the other waits for and PostgreSQL aborts one: the batch's events were lost here
    store = await open_store(dsn, "a")
    admin = await asyncpg.connect(dsn)
    other = await asyncpg.connect(dsn)
    try:
        await store.leases.balance()
        keys = [k for ks in keys_in_two_partitions(1) for k in ks]
        lo, hi = sorted(keys, key=partition_of)
        # the lower partition's row moves behind the higher's (as a non-HOT update or a
        # table rewrite moves a row): a scan of the table meets the higher one first
        await admin.execute(
            "WITH gone AS (DELETE FROM enkwatch_partition_lease WHERE partition = $1 "
            "RETURNING *) INSERT INTO enkwatch_partition_lease SELECT * FROM gone",
            partition_of(lo),
        )
        records = await add(store, [lo, hi])
        # another batch's commit under way holds its share lock on the lower partition
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "SELECT 1 FROM enkwatch_partition_lease WHERE partition = $1 FOR SHARE",
            partition_of(lo),
        )
        renewal = asyncio.ensure_future(store.leases.balance())
        await until(lambda: waiters(admin, 1), "the renewal waiting for that batch")
        events = [
            asyncio.ensure_future(store.record_event(r, transition(r, "Queued"))) for r in records
        ]
        # the batch commits, or waits for the renewal (never holding what the renewal needs)
        await until(
            lambda: all(e.done() for e in events) or waiters(admin, 2), "the batch under way"
        )
        await tx.commit()
        results = await asyncio.gather(renewal, *events, return_exceptions=True)
        assert results == [(set(), set()), None, None]
        assert sorted(await journal(dsn)) == sorted([(lo, 1), (hi, 1)])
    finally:
        await other.close()
        await admin.close()
        await store.close()
