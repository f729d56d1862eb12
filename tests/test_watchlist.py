"""The watch list: loading, the reload diff, and the task API (add, remove, list)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.admin import TaskExists
from enkwatch.clock import FakeClock
from enkwatch.config import Config, parse_config
from enkwatch.errors import ConfigError
from enkwatch.events import EventWriter
from enkwatch.ownership import SOURCE_API, SoleOwner
from enkwatch.schedule import ManualWakeup, PollScheduler
from enkwatch.state.base import TaskRecord
from enkwatch.state.sqlite import SqliteStore
from enkwatch.watch import PollResult, TaskWatch
from enkwatch.watchlist import SOURCE_CONFIG, WatchList


def config(tasks: list[dict[str, Any]], **polling: Any) -> Config:
    raw = {
        "api": {"base_url": "http://127.0.0.1:9"},
        "polling": {"interval_seconds": 30} | polling,
        "state": {"path": ":memory:"},
        "tasks": tasks,
    }
    return parse_config(raw, environ={})


def write(path: Path, tasks: list[dict[str, Any]], **polling: Any) -> None:
    raw = {
        "api": {"base_url": "http://127.0.0.1:9"},
        "polling": {"interval_seconds": 30} | polling,
        "state": {"path": ":memory:"},
        "tasks": tasks,
    }
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")


class Rig:
    """A watch list on a real SQLite store, a sole owner and a scheduler that never fires."""

    def __init__(self, cfg: Config, store: SqliteStore, path: str | None = None) -> None:
        self.clock = FakeClock()
        self.store = store
        self.writer = EventWriter(self.clock, store)
        self.owner = SoleOwner(store, self.writer)
        self.changes = 0
        self.polling: list[Config] = []
        self.sched = PollScheduler(
            self.poll,
            self.clock,
            4,
            on_task_done=lambda task: None,
            on_crash=lambda exc: None,
            wakeup=lambda dispatch: ManualWakeup(),
        )
        self.watchlist = WatchList(
            cfg,
            store,
            self.owner,
            self.sched,
            self.writer,
            self.clock,
            path,
            on_change=self.changed,
            on_polling=self.polling.append,
        )

    async def poll(self, task: TaskWatch) -> PollResult:
        raise AssertionError("nothing is polled in these tests")

    def changed(self) -> None:
        self.changes += 1

    async def load(self) -> WatchList:
        await self.owner.load(self.watchlist)
        self.watchlist.start_polling()
        return self.watchlist


def scheduled(task: TaskWatch) -> bool:
    return task.next_due is not None


@pytest.fixture
def store() -> SqliteStore:
    return SqliteStore(":memory:")


# -- loading ---------------------------------------------------------------------------------


async def test_loaded_tasks_share_their_spec_and_hold_no_side_object(store: SqliteStore) -> None:
    # memory per task (100,000 of them): what tasks say alike is one shared object, and
    # failures, stall checks and list answers get an object only for a task that has them
    entries: list[dict[str, Any]] = [{"task_id": f"t{i}"} for i in range(3)]
    rig = Rig(config([*entries, {"task_id": "x", "interval_seconds": 5}]), store)
    watchlist = await rig.load()
    a, b, c, x = (watchlist.tasks[k] for k in ("t0", "t1", "t2", "x"))
    assert a.spec is b.spec is c.spec and x.spec is not a.spec and x.interval_s == 5
    assert all(t.trouble is None and t.listing is None for t in watchlist.tasks.values())
    assert a.started_mono is not None and a.started_mono is b.started_mono  # one float


async def test_a_swept_kind_records_its_own_answers_from_the_start(store: SqliteStore) -> None:
    # a list read while the task's own poll was answered must not undo that answer: the
    # tasks of a kind the sweeps read keep the time of their own answers from the start
    raw = config([{"task_id": "a"}]).model_dump(mode="json")
    swept = parse_config(raw | {"discover": [{"kind": "dataset"}]}, environ={})
    watchlist = await Rig(swept, store).load()
    listing = watchlist.tasks["a"].listing
    assert listing is not None and listing.answered_mono == float("-inf")


async def test_load_stores_the_config_tasks_and_keeps_those_added_by_api(
    store: SqliteStore,
) -> None:
    await store.add_task(TaskRecord("api-1", "api-1", None, 1.0, spec={"task_id": "api-1"}))
    await store.add_task(TaskRecord("orphan", "orphan", None, 1.0))  # no spec: not ours
    done = TaskRecord("old", "old", None, 1.0, spec={"task_id": "old"})
    done.outcome = "Finished"
    await store.add_task(done)
    rig = Rig(config([{"task_id": "a"}, {"dataset": "Election2", "labels": {"team": "x"}}]), store)
    watchlist = await rig.load()

    assert set(watchlist.tasks) == {"a", "dataset:Election2", "api-1", "old"}
    assert watchlist.tasks["a"].source == SOURCE_CONFIG
    assert watchlist.tasks["api-1"].source == SOURCE_API
    assert watchlist.tasks["dataset:Election2"].labels == {"team": "x"}
    assert set(await store.load_tasks()) >= {"a", "dataset:Election2"}  # stored
    # due at once, except a task that is already done
    assert [k for k, t in watchlist.tasks.items() if scheduled(t)] == [
        "a",
        "dataset:Election2",
        "api-1",
    ]
    # a sole owner forgets the config's entries once the watches are built
    assert watchlist.config.tasks == []


async def test_outcomes_count_done_tasks(store: SqliteStore) -> None:
    watchlist = await Rig(config([{"task_id": "a"}, {"task_id": "b"}]), store).load()
    watchlist.tasks["a"].record.outcome = "Finished"
    assert watchlist.outcomes() == {"finished": 1, "failed": 0, "gave_up": 0}


# -- the reload diff -------------------------------------------------------------------------


async def test_apply_adds_changes_and_removes_config_tasks(store: SqliteStore) -> None:
    rig = Rig(config([{"task_id": "a"}, {"task_id": "b"}, {"task_id": "c"}]), store)
    watchlist = await rig.load()
    a, b = watchlist.tasks["a"], watchlist.tasks["b"]
    await watchlist.add_task({"task_id": "by-api"})
    with capture_logs() as logs:
        await watchlist.apply(
            config([{"task_id": "a"}, {"task_id": "b", "labels": {"team": "y"}}, {"task_id": "d"}])
        )
    [reloaded] = logs
    assert reloaded["event"] == ev.CONFIG_RELOADED
    assert (reloaded["added"], reloaded["changed"], reloaded["removed"]) == (["d"], ["b"], ["c"])
    assert reloaded["restart_required"] == []
    assert set(watchlist.tasks) == {"a", "b", "d", "by-api"}  # an API task is not the config's
    assert watchlist.tasks["a"] is a and watchlist.tasks["b"] is b  # kept, not restarted
    assert b.labels == {"team": "y"}
    assert scheduled(watchlist.tasks["d"])
    assert rig.changes == 1
    assert rig.polling == []  # the polling section did not change


async def test_apply_follows_the_polling_section_for_tasks_without_their_own(
    store: SqliteStore,
) -> None:
    rig = Rig(config([{"task_id": "a"}, {"task_id": "b", "interval_seconds": 5}]), store)
    watchlist = await rig.load()
    with capture_logs() as logs:
        await watchlist.apply(
            config([{"task_id": "a"}, {"task_id": "b", "interval_seconds": 5}], interval_seconds=60)
        )
    assert watchlist.tasks["a"].interval_s == 60
    assert watchlist.tasks["b"].interval_s == 5
    assert [c.polling.interval_seconds for c in rig.polling] == [60]
    assert logs[0]["changed"] == []


async def test_a_section_that_needs_a_restart_is_named(store: SqliteStore) -> None:
    watchlist = await Rig(config([{"task_id": "a"}]), store).load()
    new = config([{"task_id": "a"}]).model_copy(
        update={"api": config([]).api.model_copy(update={"timeout_seconds": 3.0})}
    )
    with capture_logs() as logs:
        await watchlist.apply(new)
    assert logs[0]["restart_required"] == ["api"]


async def test_reload_reads_the_file_and_a_bad_one_changes_nothing(
    tmp_path: Path, store: SqliteStore
) -> None:
    path = tmp_path / "c.yaml"
    write(path, [{"task_id": "a"}])
    rig = Rig(config([{"task_id": "a"}]), store, str(path))
    watchlist = await rig.load()
    path.write_text("tasks: [{task_id: a, interval_seconds: -5}]\n", encoding="utf-8")
    with capture_logs() as logs:
        await watchlist.reload()
    [failed] = logs
    assert failed["event"] == ev.CONFIG_RELOAD_FAILED
    assert failed["errors"] == ["tasks[0].interval_seconds: must be greater than 0"]
    assert set(watchlist.tasks) == {"a"}

    write(path, [{"task_id": "a"}, {"task_id": "b"}])
    with capture_logs() as logs:
        await watchlist.check_config_file()  # the file changed: reloaded
        await watchlist.check_config_file()  # unchanged since: nothing
    assert [e["event"] for e in logs] == [ev.CONFIG_RELOADED]
    assert set(watchlist.tasks) == {"a", "b"}


async def test_no_reload_once_stopped(tmp_path: Path, store: SqliteStore) -> None:
    path = tmp_path / "c.yaml"
    write(path, [{"task_id": "a"}])
    watchlist = await Rig(config([{"task_id": "a"}]), store, str(path)).load()
    watchlist.stopped = True
    write(path, [{"task_id": "a"}, {"task_id": "b"}])
    with capture_logs() as logs:
        await watchlist.reload()
    assert logs == [] and set(watchlist.tasks) == {"a"}


# -- the task API ----------------------------------------------------------------------------


async def test_add_list_remove(store: SqliteStore) -> None:
    rig = Rig(config([{"task_id": "a"}]), store)
    watchlist = await rig.load()
    added = await watchlist.add_task({"dataset": "Election2", "labels": {"team": "x"}})
    assert added["task_key"] == "dataset:Election2"
    assert added["source"] == SOURCE_API
    assert (added["dataset"], added["labels"], added["seq"]) == ("Election2", {"team": "x"}, 0)
    assert scheduled(watchlist.tasks["dataset:Election2"])
    stored = (await store.load_tasks())["dataset:Election2"]
    # survives restarts (with its kind: issue 10)
    assert stored.spec == {"kind": "dataset", "dataset": "Election2", "labels": {"team": "x"}}

    with pytest.raises(TaskExists):
        await watchlist.add_task({"dataset": "Election2"})
    with pytest.raises(ConfigError):
        await watchlist.add_task({"task_id": "x", "interval_seconds": -1})

    listed = {t["task_key"]: t for t in await watchlist.list_tasks()}
    assert set(listed) == {"a", "dataset:Election2"}
    assert listed["a"]["source"] == SOURCE_CONFIG
    assert listed["a"]["next_poll_at"] == "2026-01-01T00:00:00.000000Z"  # due now, by the clock
    assert "polled_here" not in listed["a"]  # only replicas say where a task is polled

    task = watchlist.tasks["dataset:Election2"]
    assert await watchlist.remove_task("dataset:Election2") is True
    assert await watchlist.remove_task("dataset:Election2") is False
    assert await watchlist.remove_task("never-watched") is False
    assert "dataset:Election2" not in watchlist.tasks
    assert not scheduled(task)
    assert (await store.load_tasks())["dataset:Election2"].spec is None  # gone after a restart
    assert rig.changes == 1


async def test_a_task_removed_then_added_again_continues_its_sequence(
    store: SqliteStore,
) -> None:
    watchlist = await Rig(config([]), store).load()
    await watchlist.add_task({"task_id": "t"})
    watchlist.tasks["t"].record.seq = 4
    await store.record_event(watchlist.tasks["t"].record, {"event_id": "t:4", "seq": 4})
    await watchlist.remove_task("t")
    again = await watchlist.add_task({"task_id": "t"})
    assert again["seq"] == 4  # the stored record, not a new one


async def test_checkpoint_stores_the_poll_counts(store: SqliteStore) -> None:
    watchlist = await Rig(config([{"task_id": "a"}]), store).load()
    watchlist.tasks["a"].record.polls = 7
    await watchlist.checkpoint()
    assert (await store.load_tasks())["a"].polls == 7


async def test_done_is_the_polls_own_business(store: SqliteStore) -> None:
    """A task done before a restart is loaded, listed, and never scheduled again."""
    record = TaskRecord("a", "a", None, 1.0)
    record.outcome = "Failed"
    await store.add_task(record)
    watchlist = await Rig(config([{"task_id": "a"}]), store).load()
    assert watchlist.tasks["a"].done and not scheduled(watchlist.tasks["a"])
