"""The SQLite state store: schema, WAL, the event journal, and refusing what is not ours."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from enkwatch.state import open_store
from enkwatch.state.base import JournaledEvent, StateError, TaskRecord
from enkwatch.state.sqlite import SCHEMA_VERSION, SqliteStore

TASK_ID = "data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668"


def record(key: str = TASK_ID, **changes: Any) -> TaskRecord:
    fields: dict[str, Any] = {
        "task_key": key,
        "task_id": key if not key.startswith("dataset:") else None,
        "dataset": "Election2",
        "watch_started_at": 1_767_225_600.5,
    }
    fields.update(changes)
    return TaskRecord(**fields)


def event(rec: TaskRecord, **extra: Any) -> dict[str, Any]:
    return {
        "event": "task.transition",
        "level": "info",
        "timestamp": "2026-01-01T00:00:00.000000Z",
        "task_key": rec.task_key,
        "seq": rec.seq,
        "event_id": f"{rec.task_key}:{rec.seq}",
        **extra,
    }


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
async def store(db_path: Path) -> Iterator[SqliteStore]:
    opened = SqliteStore(str(db_path))
    yield opened
    await opened.close()


def raw_connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def test_tables_are_created(store: SqliteStore, db_path: Path) -> None:
    with closing(raw_connect(db_path)) as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert {"meta", "tasks", "events", "events_stragglers"} <= names
    assert version == (str(SCHEMA_VERSION),)


def test_wal_mode_is_on(store: SqliteStore, db_path: Path) -> None:
    db = raw_connect(db_path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


async def test_open_store_gives_a_sqlite_store(db_path: Path) -> None:
    opened = open_store(str(db_path))
    try:
        assert isinstance(opened, SqliteStore)
    finally:
        await opened.close()


async def test_add_task_and_load_it_back(store: SqliteStore) -> None:
    spec = {"task_id": TASK_ID, "labels": {"team": "safety"}, "deadline_seconds": 60.0}
    await store.add_task(record(spec=spec))
    await store.add_task(record("dataset:FinanceQA", dataset="FinanceQA"))
    tasks = await store.load_tasks()
    assert tasks == {
        TASK_ID: record(spec=spec),
        "dataset:FinanceQA": record("dataset:FinanceQA", dataset="FinanceQA"),
    }


async def test_add_task_is_idempotent(store: SqliteStore) -> None:
    await store.add_task(record())
    rec = record(last_status="Running", seq=1)
    await store.record_event(rec, event(rec))
    # adding the task again (a restart, a config reload) keeps what is known
    await store.add_task(record(watch_started_at=9.0, dataset="Other", seq=0))
    [loaded] = (await store.load_tasks()).values()
    assert loaded.watch_started_at == 1_767_225_600.5
    assert loaded.dataset == "Election2"
    assert loaded.last_status == "Running"
    assert loaded.seq == 1


async def test_record_event_persists_the_task_and_the_event(db_path: Path) -> None:
    store = SqliteStore(str(db_path))
    await store.add_task(record())
    rec = record(
        last_status="Failed",
        last_unknown_status="Paused",
        seen_dataset="Election2",
        seen_task_id=TASK_ID,
        seq=3,
        polls=12,
        outcome="failed",
    )
    body = event(rec, status="Failed", previous_status="Running", labels={"team": "é"})
    await store.record_event(rec, body)
    await store.close()  # no explicit flush: each call is its own committed transaction

    reopened = SqliteStore(str(db_path))
    try:
        assert await reopened.load_tasks() == {TASK_ID: rec}
        assert reopened.events(TASK_ID) == [body]
        assert await reopened.unwritten_events() == [JournaledEvent(TASK_ID, 3, body)]
    finally:
        await reopened.close()


async def test_record_event_is_one_transaction(store: SqliteStore) -> None:
    await store.add_task(record())
    first = record(last_status="Queued", seq=1, polls=1)
    await store.record_event(first, event(first))
    # the same seq again: the event cannot be journaled, so the task row must not change
    clash = record(last_status="Running", seq=1, polls=2)
    with pytest.raises(sqlite3.IntegrityError):
        await store.record_event(clash, event(clash))
    assert (await store.load_tasks())[TASK_ID] == first
    assert store.events(TASK_ID) == [event(first)]
    # and the store is still usable
    second = record(last_status="Running", seq=2, polls=2)
    await store.record_event(second, event(second))
    assert (await store.load_tasks())[TASK_ID] == second


async def test_unwritten_events_in_order_with_identical_bodies(store: SqliteStore) -> None:
    a, b = record("task-a"), record("dataset:b", dataset="b")
    await store.add_task(a)
    await store.add_task(b)
    journal: list[JournaledEvent] = []
    for n, (key, extra) in enumerate(
        [
            ("task-a", {"status": "Queued", "previous_status": None}),
            ("dataset:b", {"status": "Running", "labels": {"k": "ü — 日本"}}),
            ("task-a", {"status": "Running", "polls": 7, "watched_seconds": 1.25}),
            ("dataset:b", {"status": "Whatever", "nested": {"list": [1, 2.5, True, None]}}),
            ("task-a", {"status": "Finished", "terminal": True}),
        ],
        start=1,
    ):
        rec = record(key, dataset="b" if key == "dataset:b" else "Election2", seq=n)
        body = event(rec, **extra)
        await store.record_event(rec, body)
        journal.append(JournaledEvent(key, n, body))
    assert await store.unwritten_events() == journal

    await store.mark_written("task-a", 1)
    await store.mark_written("dataset:b", 4)
    await store.mark_written("nope", 99)  # unknown: nothing happens
    assert await store.unwritten_events() == [journal[1], journal[2], journal[4]]
    for item in journal:
        await store.mark_written(item.task_key, item.seq)
    assert await store.unwritten_events() == []
    # written events stay in the journal
    assert [e["seq"] for e in store.events("task-a")] == [1, 3, 5]


async def test_marks_survive_a_restart(db_path: Path) -> None:
    store = SqliteStore(str(db_path))
    await store.add_task(record())
    for seq in (1, 2):
        rec = record(seq=seq)
        await store.record_event(rec, event(rec))
    await store.mark_written(TASK_ID, 1)
    await store.close()
    reopened = SqliteStore(str(db_path))
    try:
        assert [(e.task_key, e.seq) for e in await reopened.unwritten_events()] == [(TASK_ID, 2)]
    finally:
        await reopened.close()


async def test_checkpoint_polls(db_path: Path) -> None:
    store = SqliteStore(str(db_path))
    await store.add_task(record("a"))
    await store.add_task(record("b"))
    await store.checkpoint_polls([("a", 5), ("b", 9), ("unknown", 1)])
    await store.checkpoint_polls(iter([("a", 6)]))
    await store.close()
    reopened = SqliteStore(str(db_path))
    try:
        tasks = await reopened.load_tasks()
        assert (tasks["a"].polls, tasks["b"].polls) == (6, 9)
        assert set(tasks) == {"a", "b"}
    finally:
        await reopened.close()


async def test_memory_store_works() -> None:
    store = SqliteStore(":memory:")
    try:
        await store.add_task(record())
        rec = record(last_status="Queued", seq=1)
        await store.record_event(rec, event(rec))
        await store.checkpoint_polls([(TASK_ID, 4)])
        assert (await store.load_tasks())[TASK_ID].polls == 4
        assert await store.unwritten_events() == [JournaledEvent(TASK_ID, 1, event(rec))]
        await store.mark_written(TASK_ID, 1)
        assert await store.unwritten_events() == []
    finally:
        await store.close()


async def test_reopening_keeps_the_schema_version(db_path: Path) -> None:
    await SqliteStore(str(db_path)).close()
    await SqliteStore(str(db_path)).close()
    with closing(raw_connect(db_path)) as db:
        rows = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
    assert rows == [(str(SCHEMA_VERSION),)]


def set_schema_version(path: Path, value: str) -> None:
    db = raw_connect(path)
    try:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (value,))
    finally:
        db.close()


async def test_a_newer_schema_is_refused(db_path: Path) -> None:
    await SqliteStore(str(db_path)).close()
    set_schema_version(db_path, str(SCHEMA_VERSION + 1))
    with pytest.raises(StateError) as info:
        SqliteStore(str(db_path))
    assert str(db_path) in str(info.value)
    assert "newer" in str(info.value)


async def test_a_schema_version_that_is_not_a_number_is_refused(db_path: Path) -> None:
    await SqliteStore(str(db_path)).close()
    set_schema_version(db_path, "banana")
    with pytest.raises(StateError) as info:
        SqliteStore(str(db_path))
    assert str(db_path) in str(info.value)


@pytest.mark.parametrize("size", [16, 100, 4096, 65536])
def test_a_corrupt_file_is_refused_with_its_path(db_path: Path, size: int) -> None:
    db_path.write_bytes(random.Random(size).randbytes(size))
    with pytest.raises(StateError) as info:
        SqliteStore(str(db_path))
    assert str(db_path) in str(info.value)


def test_a_directory_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(StateError) as info:
        SqliteStore(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_a_missing_directory_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "state.db"
    with pytest.raises(StateError) as info:
        SqliteStore(str(path))
    assert str(path) in str(info.value)


def test_another_programs_database_is_refused(db_path: Path) -> None:
    db = raw_connect(db_path)
    db.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT)")
    db.execute("INSERT INTO tasks (title) VALUES ('buy milk')")
    db.close()
    with pytest.raises(StateError) as info:
        SqliteStore(str(db_path))
    assert str(db_path) in str(info.value)
    # and it was not stamped as ours
    with closing(raw_connect(db_path)) as db:
        stamped = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        assert db.execute("SELECT title FROM tasks").fetchall() == [("buy milk",)]
    assert stamped == []


async def test_forget_resets_only_an_ended_task_and_keeps_its_seq(store: SqliteStore) -> None:
    rec = TaskRecord("t1", "t1", None, 5.0, polls=4)
    await store.add_task(rec)
    for seq, status in ((1, "Running"), (2, "Finished")):
        rec.seq, rec.last_status = seq, status
        rec.outcome = "Finished" if status == "Finished" else None
        body = {
            "event": "task.transition",
            "status": status,
            "timestamp": f"2026-01-01T00:00:0{seq}.000000Z",
        }
        if seq == 1:
            assert await store.reset_task("t1", 9.0) is False  # not ended
        await store.record_event(rec, body)
    assert await store.status_times() == {"t1": "2026-01-01T00:00:02.000000Z"}
    assert await store.reset_task("t1", 9.0) is True
    stored = (await store.load_tasks())["t1"]
    assert (stored.outcome, stored.last_status, stored.polls) == (None, None, 0)
    assert stored.watch_started_at == 9.0 and stored.seq == 2
    assert await store.reset_task("nope", 9.0) is False


# -- schema 3: an outbox row refers to its event's journal row --------------------------------


async def test_a_task_events_deliveries_refer_to_its_journal_row(store: SqliteStore) -> None:
    rec = record("t1")
    await store.add_task(rec)
    rec.seq = 1
    moved = event(rec, status="Running")
    await store.record_event(rec, moved, ["a", "b"])
    rec.seq = 2
    failed = event(rec, event="task.poll_failed", error="timeout")
    await store.record_event(rec, failed, ["a"])
    raw = store._db.execute("SELECT sink, length(body), event_row FROM outbox ORDER BY id")
    rows = raw.fetchall()
    # no copy of a transition's bytes per sink; a poll failure's journal row is deleted once
    # written, so its delivery holds its bytes
    assert [(s, n == 0, ref is None) for s, n, ref in rows] == [
        ("a", True, False),
        ("b", True, False),
        ("a", False, True),
    ]
    heads = await store.outbox_heads("a", 10)
    assert [orjson.loads(h.body) for h in heads] == [moved]
    assert [orjson.loads(r.body) for r in store.pending_outbox()] == [moved, moved, failed]
    store.confirm_written("t1", 1)
    store.confirm_written("t1", 2)
    store.commit_now()
    await store.deliveries_done([h.id for h in heads])
    [second] = await store.outbox_heads("a", 10)
    assert orjson.loads(second.body) == failed


async def test_a_schema_2_file_is_converted_and_its_deliveries_go_as_they_were(
    db_path: Path,
) -> None:
    first = SqliteStore(str(db_path))
    await first.close()
    body = b'{"event":"task.transition","task_key":"t1","seq":1,"event_id":"t1:1"}'
    with closing(raw_connect(db_path)) as db:  # as enkwatch with schema 2 left it
        db.execute("ALTER TABLE outbox DROP COLUMN event_row")
        db.execute("CREATE INDEX outbox_pending ON outbox (sink, id) WHERE state = 'pending'")
        db.execute(
            "INSERT INTO outbox (sink, task_key, body, created_at, next_attempt_at) "
            "VALUES ('a', 't1', ?, 1.0, 1.0)",
            (body,),
        )
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    store = SqliteStore(str(db_path))
    try:
        [head] = await store.outbox_heads("a", 10)
        assert head.body == body
    finally:
        await store.close()
    with closing(raw_connect(db_path)) as db:
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert version == ("3",) and "outbox_pending" not in indexes and "outbox_heads" in indexes
