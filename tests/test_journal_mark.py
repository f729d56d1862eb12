"""The SQLite journal's watermark: what was written out is one number and a few stragglers,
never below a row whose line was not written; files of schema 1 are converted once."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from enkwatch.models import TASK_POLL_FAILED, TASK_TRANSITION
from enkwatch.state.base import TaskRecord
from enkwatch.state.sqlite import SCHEMA_VERSION, SqliteStore
from enkwatch.state.written import AHEAD_MAX, WrittenMark
from tests.kit import SCHEMA_1, journal_written


def record(key: str, seq: int) -> TaskRecord:
    return TaskRecord(key, key, None, 1_767_225_600.0, seq=seq)


def event(key: str, seq: int, name: str = TASK_TRANSITION) -> dict[str, Any]:
    return {"event": name, "level": "info", "task_key": key, "seq": seq}


async def journal(store: SqliteStore, *items: tuple[str, int], name: str = TASK_TRANSITION) -> None:
    for key, seq in items:
        await store.record_event(record(key, seq), event(key, seq, name))


# -- the mark alone ---------------------------------------------------------------------------


def test_a_confirmation_out_of_order_waits_for_the_rows_below_it() -> None:
    mark = WrittenMark(0)
    mark.committed([(1, "a", 1), (2, "b", 1), (3, "a", 2)], ())
    mark.confirm("b", 1)
    assert mark.through == 0 and mark.unconfirmed([1, 2, 3]) == [1, 3]
    mark.confirm("a", 1)
    assert mark.through == 2
    mark.confirm("nope", 9)  # unknown, and repeated: nothing changes
    mark.confirm("a", 1)
    assert mark.through == 2 and mark.unconfirmed([1, 2, 3]) == [3]
    mark.confirm("a", 2)
    assert mark.through == 3 and mark.changes().through == 3


def test_a_row_never_confirmed_becomes_a_straggler_and_memory_stays_bounded() -> None:
    mark = WrittenMark(0)
    rows = [(i, f"t{i}", 1) for i in range(1, AHEAD_MAX + 10)]
    mark.committed(rows, ())
    for _, key, seq in rows[1:]:  # every row but the first (its poll was cancelled)
        mark.confirm(key, seq)
    assert mark.stragglers == {1}
    assert mark.through == rows[-1][0]
    assert mark.unconfirmed(i for i, _, _ in rows) == [1]
    changes = mark.changes()
    assert changes.add == (1,) and changes.through == rows[-1][0]
    mark.saved(changes)
    mark.confirm("t1", 1)  # written late after all
    assert mark.stragglers == set() and mark.changes().drop == (1,)


# -- the store --------------------------------------------------------------------------------


async def test_a_straggler_is_written_again_after_a_restart_and_only_it(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, commit_delay_s=0.0)
    keys = [(f"t{i}", 1) for i in range(AHEAD_MAX + 5)]
    await journal(store, *keys)
    for key, seq in keys[1:]:
        await store.mark_written(key, seq)
    await store.close()

    reopened = SqliteStore(path, commit_delay_s=0.0)
    assert [(e.task_key, e.seq) for e in await reopened.unwritten_events()] == [keys[0]]
    await reopened.mark_written(*keys[0])
    await reopened.close()
    again = SqliteStore(path, commit_delay_s=0.0)
    assert await again.unwritten_events() == []
    assert again._db.execute("SELECT COUNT(*) FROM events_stragglers").fetchone() == (0,)
    await again.close()


async def test_the_id_of_a_deleted_poll_failure_is_not_reused(tmp_path: Path) -> None:
    """A written poll failure's row is deleted: the watermark is above every row left, and a
    row journaled after a restart must not take an id at or below it (it would count as
    written before it was)."""
    path = str(tmp_path / "s.db")
    store = SqliteStore(path, commit_delay_s=0.0)
    await journal(store, ("t", 1))
    await journal(store, ("t", 2), name=TASK_POLL_FAILED)
    await store.mark_written("t", 1)
    await store.mark_written("t", 2)
    await store.close()
    reopened = SqliteStore(path, commit_delay_s=0.0)
    assert [e["seq"] for e in reopened.events("t")] == [1]
    await journal(reopened, ("t", 3))
    assert [(e.task_key, e.seq) for e in await reopened.unwritten_events()] == [("t", 3)]
    await reopened.close()


async def test_an_event_of_a_task_without_a_row_is_journaled(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), commit_delay_s=0.0)
    await journal(store, ("unknown", 1))
    assert [e.seq for e in await store.unwritten_events()] == [1]
    await store.close()


async def test_a_seq_journaled_twice_fails_its_batch(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "s.db"), commit_delay_s=0.0)
    await store.add_task(record("t", 0))
    await journal(store, ("t", 1))
    with pytest.raises(sqlite3.IntegrityError):
        await journal(store, ("t", 1))
    assert [e["seq"] for e in store.events("t")] == [1]
    await store.close()


# -- schema 1 ---------------------------------------------------------------------------------


def schema_1_file(path: Path, rows: list[tuple[str, int, str, int]]) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO tasks (task_key, seq, watch_started_at) VALUES ('a', 3, 1)")
        db.execute("INSERT INTO tasks (task_key, seq, watch_started_at) VALUES ('b', 2, 1)")
        for key, seq, name, written in rows:
            db.execute(
                "INSERT INTO events (task_key, seq, body, written) VALUES (?, ?, ?, ?)",
                (key, seq, f'{{"event":"{name}","task_key":"{key}","seq":{seq}}}', written),
            )
        db.commit()


async def test_a_schema_1_file_is_converted_and_replays_exactly_what_was_unwritten(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    schema_1_file(
        path,
        [
            ("a", 1, TASK_TRANSITION, 1),
            ("b", 1, TASK_TRANSITION, 0),  # unwritten, below written rows
            ("a", 2, TASK_POLL_FAILED, 1),  # written poll failure: pruned
            ("a", 3, TASK_TRANSITION, 1),
            ("b", 2, TASK_POLL_FAILED, 0),  # unwritten poll failure: replayed, then deleted
        ],
    )
    store = SqliteStore(str(path), commit_delay_s=0.0)
    replay = await store.unwritten_events()
    assert [(e.task_key, e.seq) for e in replay] == [("b", 1), ("b", 2)]
    for e in replay:
        await store.mark_written(e.task_key, e.seq)
    await journal(store, ("a", 4))
    await store.close()

    with closing(sqlite3.connect(path)) as db:
        assert journal_written(db) == [("a", 1, 1), ("b", 1, 1), ("a", 3, 1), ("a", 4, 0)]
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert "events_unwritten" not in names
    assert version == (str(SCHEMA_VERSION),)
    reopened = SqliteStore(str(path), commit_delay_s=0.0)
    assert [(e.task_key, e.seq) for e in await reopened.unwritten_events()] == [("a", 4)]
    await reopened.close()
