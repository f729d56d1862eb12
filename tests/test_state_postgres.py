"""The PostgreSQL store against a real server: leases, fencing, compare-and-set, balance."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from enkwatch.clock import FakeClock
from enkwatch.errors import LeaseLost
from enkwatch.state.base import TaskRecord
from enkwatch.state.leases import partition_of
from enkwatch.state.postgres import PgStore
from tests.kit import StartSim, invoke, running, sim_task, until
from tests.pgkit import HOW_TO_ENABLE, find_bin_dir

BIN = find_bin_dir()
pytestmark = pytest.mark.skipif(BIN is None, reason=HOW_TO_ENABLE)


class Clock(FakeClock):
    """A monotonic clock the test moves (`clock.now_s += s`: time passes for this replica)."""

    def __init__(self) -> None:
        super().__init__()
        self.now_s = 1000.0

    def monotonic(self) -> float:
        return self.now_s


async def open_store(dsn: str, name: str, clock: Clock | None = None, **kw: Any) -> PgStore:
    store = PgStore(dsn, name, clock or Clock(), lease_s=15.0, **kw)
    await store.open()
    return store


def transition(rec: TaskRecord, status: str) -> dict[str, Any]:
    rec.seq += 1
    rec.last_status = status
    return {
        "event": "task.transition",
        "status": status,
        "task_key": rec.task_key,
        "seq": rec.seq,
        "event_id": f"{rec.task_key}:{rec.seq}",
    }


async def test_partitions_spread_over_replicas_and_come_back(dsn: str) -> None:
    a = await open_store(dsn, "a")
    b = await open_store(dsn, "b")
    c = await open_store(dsn, "c")
    try:
        await a.leases.balance()
        assert len(a.leases.held) == 64  # alone: everything
        await b.leases.balance()
        await c.leases.balance()
        await a.leases.balance()  # sees three live replicas: keeps ceil(64 / 3) = 22
        for store in (b, c, b, c):
            await store.leases.balance()
        owned = [set(s.leases.held) for s in (a, b, c)]
        assert all(20 <= len(o) <= 22 for o in owned)  # each at most ceil(64 / 3)
        assert set().union(*owned) == set(range(64))
        assert not (owned[0] & owned[1] or owned[1] & owned[2] or owned[0] & owned[2])
        await a.leases.release_all()  # SIGTERM: handed over at once
        await b.leases.balance()
        await c.leases.balance()
        assert len(b.leases.held) + len(c.leases.held) == 64
    finally:
        for store in (a, b, c):
            await store.close()


async def test_a_fenced_replica_cannot_write_and_the_new_owner_can(dsn: str) -> None:
    clock_a = Clock()
    a = await open_store(dsn, "a", clock_a)
    b = await open_store(dsn, "b")
    try:
        await a.leases.balance()
        rec = TaskRecord("task-1", "task-1", None, 0.0)
        await a.add_task(rec)
        await a.record_event(rec, transition(rec, "Queued"))
        # a freezes; its leases expire on the database clock; b claims (epoch + 1)
        async with a.pool.acquire() as conn:
            await conn.execute(
                "UPDATE enkwatch_partition_lease SET expires_at = now() - interval '1 s'"
            )
            await conn.execute("DELETE FROM enkwatch_replicas WHERE replica_id = 'a'")
        gained, _ = await b.leases.balance()
        assert partition_of("task-1") in gained
        # a wakes up believing (by its own clock) it still holds the lease: the epoch fences it
        stale = TaskRecord("task-1", "task-1", None, 0.0, last_status="Queued", seq=1)
        with pytest.raises(LeaseLost, match="fenced"):
            await a.record_event(stale, transition(stale, "Running"))
        [fresh] = (await b.load_tasks([partition_of("task-1")])).values()
        assert fresh.seq == 1 and fresh.last_status == "Queued"
        await b.record_event(fresh, transition(fresh, "Running"))
        async with b.pool.acquire() as conn:
            rows = await conn.fetch("SELECT seq, status, replica FROM enkwatch_events ORDER BY seq")
        assert [(r["seq"], r["status"], r["replica"]) for r in rows] == [
            (1, "Queued", "a"),
            (2, "Running", "b"),
        ]
    finally:
        await a.close()
        await b.close()


async def test_a_stale_local_lease_stops_writes_before_the_database_is_asked(dsn: str) -> None:
    clock = Clock()
    a = await open_store(dsn, "a", clock)
    try:
        await a.leases.balance()
        rec = TaskRecord("task-1", "task-1", None, 0.0)
        await a.add_task(rec)
        assert a.leases.usable("task-1")
        clock.now_s += a.leases.safe_s  # frozen (SIGSTOP) past the safe window, by our own clock
        assert not a.leases.usable("task-1")
        with pytest.raises(LeaseLost, match="does not hold"):
            await a.record_event(rec, transition(rec, "Queued"))
    finally:
        await a.close()


async def test_two_connections_racing_the_same_transition_one_wins(dsn: str) -> None:
    a = await open_store(dsn, "a")
    try:
        await a.leases.balance()
        await a.add_task(TaskRecord("task-1", "task-1", None, 0.0))
        racers = [TaskRecord("task-1", "task-1", None, 0.0) for _ in range(8)]
        results = await asyncio.gather(
            *(a.record_event(r, transition(r, "Queued")) for r in racers),
            return_exceptions=True,
        )
        assert sum(1 for r in results if r is None) == 1
        assert all(isinstance(r, LeaseLost) for r in results if r is not None)
        assert a.conflicts == 7
        async with a.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM enkwatch_events") == 1
    finally:
        await a.close()


async def test_unwritten_events_are_found_by_the_next_owner(dsn: str) -> None:
    a = await open_store(dsn, "a")
    b = await open_store(dsn, "b")
    try:
        await a.leases.balance()
        rec = TaskRecord("task-1", "task-1", None, 0.0)
        await a.add_task(rec)
        await a.record_event(rec, transition(rec, "Queued"))  # then killed: never confirmed
        await a.leases.release_all()
        await b.leases.balance()
        [event] = await b.unwritten_events()
        assert event.body["event_id"] == "task-1:1"
        await b.mark_written("task-1", 1)
        assert await b.unwritten_events() == []
    finally:
        await a.close()
        await b.close()


async def test_the_watch_list_is_shared_and_changes_are_notified(dsn: str) -> None:
    a = await open_store(dsn, "a")
    b = await open_store(dsn, "b")
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        await b.listen(heard.put_nowait)
        await a.add_task(TaskRecord("dataset:X", None, "X", 0.0))
        await a.set_task_spec("dataset:X", {"dataset": "X"})
        assert await asyncio.wait_for(heard.get(), 5) == "dataset:X"
        [rec] = (await b.load_tasks()).values()
        assert rec.spec == {"dataset": "X"}
        await a.set_task_spec("dataset:X", None)
        assert await asyncio.wait_for(heard.get(), 5) == "dataset:X"
        assert await b.load_tasks() == {}
    finally:
        await a.close()
        await b.close()


async def test_migrate_state_from_sqlite(dsn: str, tmp_path: Any) -> None:
    import json
    import subprocess

    from enkwatch.state.sqlite import SqliteStore

    path = str(tmp_path / "state.db")
    lite = SqliteStore(path)
    rec = TaskRecord("task-1", "task-1", None, 5.0, spec={"task_id": "task-1"})
    await lite.add_task(rec)
    await lite.record_event(rec, transition(rec, "Queued"), ["hook"])
    await lite.mark_written("task-1", 1)
    await lite.record_event(rec, transition(rec, "Running"))
    rec.stalled_status = "Running"  # task.stalled was emitted: migrated with the task
    rec.status_since = 7.5
    rec.seq += 1
    await lite.record_event(rec, {"event": "task.stalled", "task_key": "task-1", "seq": 3})
    await lite.disable_sink("gone", "fp-1")  # a 410: the mark moves too
    await lite.close()

    def run() -> subprocess.CompletedProcess[str]:
        return invoke("migrate-state", "--from", path, "--to", dsn)

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "tasks_copied": 1,
        "tasks_already_there": 0,
        "events_copied": 3,
        "deliveries_copied": 1,
        "disabled_sinks_copied": 1,
    }
    again = await asyncio.to_thread(run)  # idempotent: nothing copied twice
    assert json.loads(again.stdout)["tasks_already_there"] == 1

    store = await open_store(dsn, "a")
    try:
        await store.leases.balance()
        [moved] = (await store.load_tasks()).values()
        assert (moved.seq, moved.last_status, moved.watch_started_at) == (3, "Running", 5.0)
        assert (moved.stalled_status, moved.status_since) == ("Running", 7.5)
        assert moved.spec == {"task_id": "task-1"}
        assert await store.disabled_sinks() == {"gone": "fp-1"}
        await store.record_event(moved, transition(moved, "Finished"))  # seq continues: 4
        # the history written there counts as written; 2 and 3 were never confirmed written
        # (the daemon was killed first): the new owner writes them, before the new event
        # (before: migrated as written, never written anywhere)
        assert [e.seq for e in await store.unwritten_events()] == [2, 3, 4]
        [row] = await store.pending_deliveries("hook", 10)
        assert json.loads(row.body)["event_id"] == "task-1:1"
    finally:
        await store.close()

    missing = await asyncio.to_thread(invoke, "migrate-state", "--from", "/nope.db", "--to", dsn)
    assert missing.returncode == 2 and "--from: /nope.db is not a file" in missing.stderr


async def test_a_replica_in_process_reloads_and_serves_the_shared_list(
    dsn: str, tmp_path: Any, simulate: StartSim
) -> None:
    import yaml
    from structlog.testing import capture_logs

    from enkwatch import events as ev
    from enkwatch.config import load_config

    scn = (sim_task("a", ("Running", None)), sim_task("b", ("Running", None)))
    sim = await simulate(*scn)
    url = sim.url
    cfg = tmp_path / "replica.yaml"

    def write(tasks: list[dict[str, str]]) -> None:
        cfg.write_text(
            yaml.safe_dump(
                {
                    "api": {"base_url": url},
                    "polling": {"interval_seconds": 0.05, "max_requests_per_second": 0},
                    "state": {"path": dsn, "lease_seconds": 3},
                    "tasks": tasks,
                }
            )
        )

    write([{"task_id": "a"}])
    with capture_logs() as logs:
        async with running(load_config(cfg), config_path=str(cfg)) as svc:
            transitions = lambda key: [  # noqa: E731
                e for e in logs if e["event"] == ev.TASK_TRANSITION and e["task_key"] == key
            ]
            await until(lambda: bool(transitions("a")))
            write([{"task_id": "a"}, {"task_id": "b"}])
            await svc.running.watchlist.reload()
            await until(lambda: bool(transitions("b")))
            listed = {t["task_key"]: t for t in await svc.running.watchlist.list_tasks()}
            assert set(listed) == {"a", "b"}
            assert listed["b"]["polled_here"] is True
            assert await svc.running.watchlist.remove_task("a")
            assert {t["task_key"] for t in await svc.running.watchlist.list_tasks()} == {"b"}
            assert "a" not in svc.running.watchlist.tasks


async def test_confirmations_that_fail_are_kept_and_committed_later(dsn: str) -> None:
    # lease 3 s: the store's statements time out after 2 s (its smallest command timeout)
    store = PgStore(dsn, "a", Clock(), lease_s=3.0)
    await store.open()
    admin = await asyncpg.connect(dsn)
    try:
        await store.leases.balance()
        rec = TaskRecord("t1", "t1", None, 0.0)
        await store.add_tasks([rec])
        await store.record_event(rec, transition(rec, "Queued"))
        store.confirm_written("t1", rec.seq)
        # the confirmation cannot get through: the journal is locked until it times out
        locked = admin.transaction()
        await locked.start()
        await admin.execute("LOCK TABLE enkwatch_events IN ACCESS EXCLUSIVE MODE")
        await store.flush_confirmations()
        await locked.rollback()
        # kept, not dropped: the next flush commits it (before: unconfirmed for good)
        await store.flush_confirmations()
        assert await store.unwritten_events() == []
    finally:
        await admin.close()
        await store.close()


async def test_forget_resets_an_ended_task_and_notifies(dsn: str) -> None:
    a = await open_store(dsn, "a")
    b = await open_store(dsn, "b")
    heard: asyncio.Queue[str] = asyncio.Queue()
    try:
        await b.listen(heard.put_nowait)
        await a.leases.balance()
        rec = TaskRecord("task-f", "task-f", None, 5.0, polls=4)
        await a.add_task(rec)
        event = {**transition(rec, "Running"), "timestamp": "2026-01-01T00:00:01.000000Z"}
        await a.record_event(rec, event)
        assert await a.reset_task("task-f", 9.0) is False  # not ended: still watched
        rec.outcome = "Finished"
        done = {**transition(rec, "Finished"), "timestamp": "2026-01-01T00:00:02.000000Z"}
        await a.record_event(rec, done)
        assert (await b.status_times())["task-f"] == "2026-01-01T00:00:02.000000Z"
        assert await b.reset_task("task-f", 9.0) is True
        assert await asyncio.wait_for(heard.get(), 5) == "task-f"
        stored = (await a.load_tasks())["task-f"]
        assert (stored.outcome, stored.last_status, stored.polls) == (None, None, 0)
        assert stored.watch_started_at == 9.0 and stored.seq == 2  # event ids stay unique
        assert await b.reset_task("nope", 9.0) is False
    finally:
        await a.close()
        await b.close()


def poll_failed(rec: TaskRecord) -> dict[str, Any]:
    rec.seq += 1
    return {"event": "task.poll_failed", "task_key": rec.task_key, "seq": rec.seq}


async def test_written_poll_failures_leave_the_shared_journal(dsn: str) -> None:
    a = await open_store(dsn, "a")
    b = await open_store(dsn, "b")
    try:
        await a.leases.balance()
        rec = TaskRecord("task-1", "task-1", None, 0.0)
        await a.add_task(rec)
        for make in (poll_failed, lambda r: transition(r, "Queued"), poll_failed):
            await a.record_event(rec, make(rec))
            await a.mark_written("task-1", rec.seq)
        await a.record_event(rec, poll_failed(rec))  # then killed: never confirmed
        await a.flush_confirmations()
        rows = await a.pool.fetch("SELECT seq, written FROM enkwatch_events ORDER BY seq")
        assert [(r["seq"], r["written"]) for r in rows] == [(2, True), (4, False)]
        # the next owner writes it again, then it goes too
        await a.leases.release_all()
        await b.leases.balance()
        [event] = await b.unwritten_events()
        assert event.seq == 4
        await b.mark_written("task-1", 4)
        await b.flush_confirmations()
        assert await b.pool.fetchval("SELECT array_agg(seq) FROM enkwatch_events") == [2]
        # and a keyed lookup of the shared watch list
        assert (await b.load_task("task-1")) is not None
        assert await b.load_task("nope") is None
    finally:
        await a.close()
        await b.close()


async def test_a_disabled_sink_is_shared_and_its_pending_deliveries_dropped(dsn: str) -> None:
    a = await open_store(dsn, "a")
    b = await open_store(dsn, "b")
    try:
        await a.leases.balance()
        await a.enqueue(["hook", "other"], {"event": "daemon.started"})
        await a.enqueue(["hook"], {"event": "daemon.stopping"})
        assert await a.disable_sink("hook", "fp-1") == 2
        assert await b.disabled_sinks() == {"hook": "fp-1"}
        assert await a.pending_deliveries("hook", 10) == []
        assert [r.sink for r in await a.pending_deliveries("other", 10)] == ["other"]
        await b.enable_sink("hook")
        assert await a.disabled_sinks() == {}
    finally:
        await a.close()
        await b.close()
