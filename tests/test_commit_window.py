"""Group commit with a commit window: events that come often share one transaction, across
turns of the loop; a full batch, a rare event, shutdown and close commit without waiting."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.clock import SystemClock
from enkwatch.events import EventWriter
from enkwatch.state.sqlite import COMMIT_BATCH_MAX, SqliteStore
from tests.kit import StubTask, journal_written, until

# longer than any test: a batch that waits for its window is never committed by it here
NEVER_S = 3600.0


async def open_store(tasks: list[StubTask]) -> tuple[SqliteStore, list[str]]:
    store = SqliteStore(":memory:", commit_delay_s=NEVER_S)
    await store.add_tasks([t.record for t in tasks])
    commits: list[str] = []
    staged: list[str] = []

    def trace(sql: str) -> None:
        # the commits of events: a commit of confirmations alone (the writer thread wrote a
        # line; its timer) comes when the thread is scheduled, which no test controls
        if sql.startswith("INSERT INTO events"):
            staged.append(sql)
        elif sql == "COMMIT" and staged:
            commits.append(sql)
            staged.clear()

    store._db.set_trace_callback(trace)
    return store, commits


def transition(writer: EventWriter, task: StubTask) -> asyncio.Task[None]:
    return asyncio.ensure_future(
        writer.task_event(task, ev.TASK_TRANSITION, ev.INFO, {"status": "Running"})
    )


async def turns(count: int) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


async def test_events_that_come_often_wait_for_the_window_and_share_its_commit() -> None:
    tasks = [StubTask(f"t{i}") for i in range(4)]
    store, commits = await open_store(tasks)
    writer = EventWriter(SystemClock(), store)
    with capture_logs() as logs:
        # the first event after a quiet spell is committed at the end of its turn
        await transition(writer, tasks[0])
        assert len(commits) == 1
        # the next ones come soon after: they wait for the window, each from its own turn
        waiting = []
        for task in tasks[1:]:
            waiting.append(transition(writer, task))
            await turns(3)
        assert not any(w.done() for w in waiting)
        assert len(commits) == 1
        assert [e["event_id"] for e in logs] == ["t0:1"]  # journal before write
        # shutdown: committed at once, all three in one transaction
        store.commit_now()
        await asyncio.gather(*waiting)
    assert len(commits) == 2
    assert [e["event_id"] for e in logs] == ["t0:1", "t1:1", "t2:1", "t3:1"]
    assert [store.events(t.key)[0]["seq"] for t in tasks] == [1, 1, 1, 1]
    # after commit_now there is no window any more: the next event commits this turn
    await transition(writer, tasks[0])
    assert len(commits) == 3
    await store.close()


async def test_a_full_batch_is_committed_without_waiting_for_its_window() -> None:
    tasks = [StubTask(f"t{i}") for i in range(COMMIT_BATCH_MAX + 1)]
    store, commits = await open_store(tasks)
    writer = EventWriter(SystemClock(), store)
    with capture_logs():
        await transition(writer, tasks[0])  # events are frequent from now on
        waiting = [transition(writer, t) for t in tasks[1:]]
        await asyncio.gather(*waiting)
    assert len(commits) == 2
    assert len(store.journal()) == COMMIT_BATCH_MAX + 1
    await store.close()


async def test_close_commits_a_waiting_batch_and_its_events_are_written() -> None:
    tasks = [StubTask("a"), StubTask("b")]
    store, commits = await open_store(tasks)
    writer = EventWriter(SystemClock(), store)
    with capture_logs() as logs:
        await transition(writer, tasks[0])
        waiting = transition(writer, tasks[1])
        await turns(3)
        assert not waiting.done()
        await store.close()
        await waiting
    assert [e["event_id"] for e in logs] == ["a:1", "b:1"]
    assert len(commits) == 2


async def test_a_task_keeps_its_order_across_windows() -> None:
    task = StubTask("t")
    store = SqliteStore(":memory:", commit_delay_s=0.001)
    await store.add_task(task.record)
    writer = EventWriter(SystemClock(), store)
    seen: list[Any] = []
    with capture_logs() as logs:
        for _ in range(20):  # each waits for its commit before the next is built
            await writer.task_event(task, ev.TASK_TRANSITION, ev.INFO, {})
            seen.append(task.record.seq)
    assert [e["seq"] for e in logs] == seen == list(range(1, 21))
    assert [e["seq"] for e in store.events("t")] == list(range(1, 21))
    await store.close()


async def test_a_batch_holding_half_the_polls_that_may_run_is_committed_at_once() -> None:
    tasks = [StubTask(f"t{i}") for i in range(5)]
    store, commits = await open_store(tasks)
    writer = EventWriter(SystemClock(), store)
    writer.concurrent_writers(8)  # max_concurrency 8: four events fill a batch
    with capture_logs():
        await transition(writer, tasks[0])
        waiting = []
        for task in tasks[1:]:  # each from its own turn: only the fourth fills it
            waiting.append(transition(writer, task))
            await turns(3)
        await asyncio.gather(*waiting)
    assert len(commits) == 2
    writer.concurrent_writers(1)  # one poll at a time: never a window to wait for
    with capture_logs():
        await transition(writer, tasks[0])
    assert len(commits) == 3
    await store.close()


async def test_confirmations_ride_with_a_staged_batch_instead_of_a_commit_of_their_own() -> None:
    tasks = [StubTask("a"), StubTask("b")]
    store, commits = await open_store(tasks)
    writer = EventWriter(SystemClock(), store)
    with capture_logs():
        await transition(writer, tasks[0])  # written at once (capture): a:1 confirmed
        assert store._confirmations == [("a", 1)]
        waiting = transition(writer, tasks[1])  # staged for the window
        await turns(3)
        store._flush_confirmations()  # their timer fires meanwhile: nothing committed
        assert len(commits) == 1 and store._confirmations == [("a", 1)]
        store.commit_now()
        await waiting
    assert len(commits) == 2  # the batch took the confirmation along
    assert store._confirmations == [("b", 1)]
    assert journal_written(store._db, "task_key") == [("a", 1, 1), ("b", 1, 0)]
    await store.close()


async def test_the_writer_released_at_shutdown_commits_what_waits_at_once() -> None:
    tasks = [StubTask("a"), StubTask("b")]
    store, commits = await open_store(tasks)
    writer = EventWriter(SystemClock(), store)
    with capture_logs() as logs:
        await transition(writer, tasks[0])
        waiting = transition(writer, tasks[1])
        await turns(3)
        assert not waiting.done()
        writer.release()  # SIGTERM, or `watch` once every task is done
        await waiting
    assert [e["event_id"] for e in logs] == ["a:1", "b:1"]
    assert len(commits) == 2
    await store.close()


async def test_confirmations_of_a_failed_batch_are_committed_on_their_own_later() -> None:
    tasks = [StubTask("a"), StubTask("b")]
    store, _ = await open_store(tasks)
    store.commit_delay_s = 0.0
    store._db.execute("UPDATE tasks SET seq = 1 WHERE task_key = 'b'")  # b:1 was journaled
    writer = EventWriter(SystemClock(), store)
    with capture_logs() as logs:
        await transition(writer, tasks[0])
        assert store._confirmations == [("a", 1)]
        with pytest.raises(sqlite3.IntegrityError):  # b:1 exists: the batch fails whole
            await transition(writer, tasks[1])
    assert [e["event_id"] for e in logs] == ["a:1"]
    await until(lambda: store._confirmations == [], "the confirmation committed alone")
    assert journal_written(store._db) == [("a", 1, 1)]
    await store.close()
