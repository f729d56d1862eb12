"""The SQLite state on a full disk, and a journal that does not grow with poll failures.

A full disk is made deterministically with SQLite's `PRAGMA max_page_count` on the store's
own connection: the free pages are used up by filler rows, and every event carries a label
larger than a page, so journaling it needs new (overflow) pages.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.client import ApiClient
from enkwatch.clock import FakeClock
from enkwatch.config import PollingConfig, TaskConfig
from enkwatch.errors import StateNotWritten, StateUnavailable
from enkwatch.events import EventWriter
from enkwatch.limits import RequestGate
from enkwatch.models import TASK_POLL_FAILED, TASK_TRANSITION
from enkwatch.state.base import TaskRecord
from enkwatch.state.sqlite import SqliteStore
from enkwatch.watch import DONE, Poller, TaskWatch
from tests.kit import (
    SCHEMA_1,
    events_named,
    journal_written,
    make_config,
    running,
    sim_task,
    simulator,
    until,
)
from tests.test_watch import SECRET, TASK_ID, ok

KEY = "task-full"
# larger than a page (4 KiB): each event needs pages of its own
BIG_LABEL = "x" * 6000


def fill_disk(db: sqlite3.Connection) -> None:
    """The database may not grow, and has no free page left."""
    db.execute("CREATE TABLE IF NOT EXISTS filler (x BLOB)")
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages}")
    for size in (4000, 500, 50):
        while True:
            try:
                db.execute("INSERT INTO filler VALUES (randomblob(?))", (size,))
            except sqlite3.OperationalError:
                break


def free_disk(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA max_page_count = 1000000")


def record(seq: int = 0, **changes: Any) -> TaskRecord:
    return TaskRecord(KEY, KEY, None, watch_started_at=1_767_225_600.0, seq=seq, **changes)


def event(seq: int, name: str = TASK_TRANSITION, **extra: Any) -> dict[str, Any]:
    return {"event": name, "task_key": KEY, "seq": seq, "labels": {"big": BIG_LABEL}, **extra}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(str(tmp_path / "state.db"))
    await opened.add_task(record())
    yield opened
    free_disk(opened._db)
    await opened.close()


async def test_a_refused_write_commits_nothing_and_is_reported_once(store: SqliteStore) -> None:
    told: list[str | None] = []
    store.on_availability = told.append
    await store.record_event(record(1, last_status="Queued"), event(1, status="Queued"))
    fill_disk(store._db)
    for _ in range(3):
        with pytest.raises(StateNotWritten) as caught:
            await store.record_event(record(2, last_status="Running"), event(2), ["hook"])
    assert isinstance(caught.value, StateUnavailable)  # the callers' known condition
    assert "database or disk is full" in str(caught.value)
    assert str(store._db.execute("PRAGMA database_list").fetchone()[2]) not in str(caught.value)
    assert told == [told[0]] and told[0] is not None  # once, with the reason
    # nothing of the refused transaction: the task row, the journal, the outbox
    assert (await store.load_task(KEY)) == record(1, last_status="Queued")
    assert [e["seq"] for e in store.events(KEY)] == [1]
    assert store.pending_outbox() == []
    free_disk(store._db)
    await store.record_event(record(2, last_status="Running"), event(2))
    assert told[1:] == [None]  # recovered
    assert [e["seq"] for e in store.events(KEY)] == [1, 2]


async def test_confirmations_wait_for_the_disk(store: SqliteStore) -> None:
    await store.record_event(record(1), event(1))
    # a confirmation needs no new page: the file refuses every write (read-only) instead
    store._db.execute("PRAGMA query_only = 1")
    await store.mark_written(KEY, 1)
    store._flush_confirmations(retry=False)
    assert store.trouble is not None and "SQLITE_READONLY" in store.trouble
    store._db.execute("PRAGMA query_only = 0")
    # kept, and committed with the next flush (here: before the journal is read)
    assert [e.seq for e in await store.unwritten_events()] == []
    assert store.trouble is None


async def test_outbox_and_checkpoint_writes_are_known_conditions(store: SqliteStore) -> None:
    await store.record_event(record(1), event(1), ["hook"])
    (row,) = store.pending_outbox()
    store._db.execute("PRAGMA query_only = 1")
    for write in (
        store.delivery_done(row.id),
        store.delivery_retry(row.id, 1, 0.0),
        store.delivery_dead(row.id),
        store.checkpoint_polls([(KEY, 5)]),
        store.set_task_spec(KEY, None),
        store.enqueue(["hook"], {"event": "daemon.started"}),
        store.reset_task(KEY, 0.0),  # `forget` (was a raw sqlite3 error: a 500, a traceback)
    ):
        with pytest.raises(StateNotWritten):
            await write
    store._db.execute("PRAGMA query_only = 0")
    assert [r.id for r in store.pending_outbox()] == [row.id]


async def test_written_poll_failures_leave_the_journal(store: SqliteStore) -> None:
    seq = 0
    for n in range(5):
        seq += 1
        await store.record_event(record(seq), event(seq, TASK_POLL_FAILED, attempt=n + 1))
        await store.mark_written(KEY, seq)
    seq += 1
    await store.record_event(record(seq, last_status="Running"), event(seq, status="Running"))
    await store.mark_written(KEY, seq)
    # a poll failure journaled but not confirmed stays until it was written (replay)
    seq += 1
    await store.record_event(record(seq), event(seq, TASK_POLL_FAILED))
    store._flush_confirmations()
    assert journal_written(store._db) == [(KEY, 6, 1), (KEY, 7, 0)]
    (replayed,) = await store.unwritten_events()
    assert replayed.seq == 7
    await store.mark_written(KEY, 7)
    store._flush_confirmations()
    assert [e["seq"] for e in store.events(KEY)] == [6]


async def test_poll_failures_of_earlier_versions_are_pruned_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path)) as old:
        old.executescript(SCHEMA_1)
        old.execute("DELETE FROM meta WHERE key = 'journal_pruned'")  # as an old version left it
        old.execute("INSERT INTO tasks (task_key, seq, watch_started_at) VALUES (?, 3, 1)", (KEY,))
        for seq, name in enumerate([TASK_POLL_FAILED, TASK_TRANSITION, TASK_POLL_FAILED], start=1):
            old.execute(
                "INSERT INTO events (task_key, seq, body, written) VALUES (?, ?, ?, 1)",
                (KEY, seq, f'{{"event":"{name}","seq":{seq}}}'),
            )
        old.commit()
    reopened = SqliteStore(str(path))
    assert [e["seq"] for e in reopened.events(KEY)] == [2]
    await reopened.close()


async def test_a_state_full_at_start_is_a_clear_error(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"))
    store._db.execute("PRAGMA query_only = 1")
    with pytest.raises(StateNotWritten, match="SQLITE_READONLY"):
        await store.add_tasks([record()])
    store._db.execute("PRAGMA query_only = 0")
    await store.close()


async def test_load_task_is_a_keyed_lookup(store: SqliteStore) -> None:
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    assert await store.load_task(KEY) == record()
    assert await store.load_task("nope") is None
    assert all("FROM tasks WHERE task_key = " in s for s in statements), statements


async def test_a_full_disk_delays_a_transition_and_loses_none(tmp_path: Path) -> None:
    """The real Service against the simulator: the disk fills after the first transition."""
    task = sim_task("t1", ("Queued", 1.0), ("Running", None))
    async with simulator(task) as sim:
        tasks = [{"task_id": "t1", "labels": {"big": BIG_LABEL}}]
        config = make_config(sim.url, str(tmp_path / "state.db"), tasks)
        with capture_logs() as logs:
            async with running(config) as svc:
                assert svc.running is not None
                store = svc.running.store
                assert isinstance(store, SqliteStore)
                await until(lambda: len(events_named(logs, ev.TASK_TRANSITION)) == 1, "Queued")
                fill_disk(store._db)
                await until(lambda: bool(events_named(logs, ev.STATE_UNAVAILABLE)), "unavailable")
                # polling goes on, and the refused change is tried again: still refused
                asked = sim.stats.requests
                await until(lambda: sim.stats.requests >= asked + 2, "two more polls")
                assert store.trouble is not None
                assert len(events_named(logs, ev.TASK_TRANSITION)) == 1
                free_disk(store._db)
                await until(lambda: len(events_named(logs, ev.TASK_TRANSITION)) == 2, "Running")
                await until(lambda: bool(events_named(logs, ev.STATE_RECOVERED)), "recovered")
                journal = store.events("t1")
    (unavailable,) = events_named(logs, ev.STATE_UNAVAILABLE)
    assert unavailable["log_level"] == "warning"
    assert "database or disk is full" in unavailable["error"]
    assert str(tmp_path) not in unavailable["error"]
    assert len(events_named(logs, ev.STATE_RECOVERED)) == 1
    transitions = events_named(logs, ev.TASK_TRANSITION)
    assert [(e["previous_status"], e["status"], e["seq"]) for e in transitions] == [
        (None, "Queued", 1),
        ("Queued", "Running", 2),
    ]
    assert [e["seq"] for e in journal] == [1, 2]
    # the order: unavailable before the delayed transition, recovered with it
    names = [e["event"] for e in logs]
    assert names.index(ev.STATE_UNAVAILABLE) < names.index(ev.STATE_RECOVERED)


class RefusingStore(SqliteStore):
    """Refuses to journal the events named in `refuse`, as a full disk would."""

    refuse: frozenset[str] = frozenset()

    async def record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str] = ()
    ) -> None:
        if event.get("event") in self.refuse:
            raise StateNotWritten(None, "database or disk is full (SQLITE_FULL)")
        await super().record_event(record, event, sinks)


async def test_a_refused_second_event_keeps_the_first(aiohttp_server: Any) -> None:
    """A poll that journals a transition, then is refused its gave_up, rolls back only the
    gave_up: the transition is not emitted again, the give-up is, once the disk has room."""

    async def running_task(_: web.Request) -> web.StreamResponse:
        return ok("Running")()

    app = web.Application()
    app.router.add_get("/datasets/get-task", running_task)
    server: TestServer = await aiohttp_server(app)
    clock = FakeClock()
    store = RefusingStore(":memory:")
    store.refuse = frozenset({ev.TASK_GAVE_UP})
    polling = PollingConfig(interval_seconds=10, jitter=0, max_backoff_seconds=60)
    cfg = TaskConfig(task_id=TASK_ID, deadline_seconds=10)
    record = TaskRecord(cfg.key, TASK_ID, None, clock.now().timestamp() - 100)
    await store.add_task(record)
    task = TaskWatch.from_config(cfg, polling, record)
    async with ApiClient(str(server.make_url("")), SECRET, 5, RequestGate(0, clock)) as client:
        poller = Poller(client, EventWriter(clock, store), clock, polling, random.Random(3))
        with capture_logs() as logs:
            delay = await poller.poll(task)
            assert isinstance(delay, float) and delay >= 1.0  # tried again later
            assert (record.last_status, record.seq, record.outcome) == ("Running", 1, None)
            store.refuse = frozenset()
            assert await poller.poll(task) == DONE
    assert [(e["event"], e["seq"]) for e in logs] == [
        (ev.TASK_TRANSITION, 1),
        (ev.TASK_GAVE_UP, 2),
    ]
    assert [e["seq"] for e in store.events(cfg.key)] == [1, 2]
    await store.close()
