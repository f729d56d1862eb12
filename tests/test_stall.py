"""task.stalled: once per status and task, persisted, ended by the next transition.

The poller's check and the stall timer run on a FakeClock against a real aiohttp API
server; the service test runs the real assembly against the simulator.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.client import ApiClient
from enkwatch.clock import FakeClock
from enkwatch.config import PollingConfig, TaskConfig, parse_config
from enkwatch.errors import ConfigError
from enkwatch.events import EventWriter
from enkwatch.formats import PagerDutyFormat
from enkwatch.limits import RequestGate
from enkwatch.schedule import ManualWakeup, PollScheduler, StallTimer
from enkwatch.state.base import TaskRecord
from enkwatch.state.sqlite import SqliteStore
from enkwatch.watch import LOST, Poller, PollResult, TaskWatch

SECRET = "sk-test-SECRET-stall"


class Api:
    """Answers every request with the status the test sets."""

    def __init__(self) -> None:
        self.status = "Queued"
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        data = {
            "dataset_name": "ds",
            "created_at": "2026-01-01T00:00:00+00:00",
            "status": self.status,
            "task_id": "t1",
        }
        return web.json_response({"data": data})


class Rig:
    """A poller over a SQLite file, its API, a FakeClock; `reopen` is a restart."""

    def __init__(self, url: str, api: Api, path: Path) -> None:
        self.url, self.api, self.path = url, api, path
        self.clock = FakeClock()
        self.store = SqliteStore(str(path), self.clock)
        self.polling = PollingConfig(interval_seconds=10, jitter=0, stall_after_seconds=60)

    def poller(self, client: ApiClient) -> Poller:
        writer = EventWriter(self.clock, self.store)
        return Poller(client, writer, self.clock, self.polling, random.Random(1))

    async def task(self, **cfg: Any) -> TaskWatch:
        config = TaskConfig(task_id="t1", **cfg)
        records = await self.store.load_tasks()
        record = records.get(config.key)
        if record is None:
            record = TaskRecord("t1", "t1", None, self.clock.now().timestamp())
            await self.store.add_task(record)
        return TaskWatch.from_config(config, self.polling, record)

    async def reopen(self) -> None:
        await self.store.close()
        self.store = SqliteStore(str(self.path), self.clock)


@pytest.fixture
async def rig(aiohttp_server: Any, tmp_path: Path) -> AsyncIterator[Rig]:
    api = Api()
    app = web.Application()
    app.router.add_get("/datasets/get-task", api.handle)
    server: TestServer = await aiohttp_server(app)
    r = Rig(str(server.make_url("")), api, tmp_path / "state.db")
    yield r
    await r.store.close()


def client_for(rig: Rig) -> ApiClient:
    return ApiClient(rig.url, SECRET, 5, RequestGate(0, rig.clock))


def named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_once_per_status_persisted_and_ended_by_the_next_transition(rig: Rig) -> None:
    async with client_for(rig) as client:
        poller = rig.poller(client)
        task = await rig.task()
        with capture_logs() as logs:
            await poller.poll(task)  # Queued: the stint begins
            assert poller.stall_due_in(task) == 60
            rig.clock.advance(59)
            assert await poller.check_stall(task) == pytest.approx(1)
            rig.clock.advance(2)
            assert await poller.check_stall(task) is None
            assert await poller.check_stall(task) is None  # once per status
        [stalled] = named(logs, ev.TASK_STALLED)
        assert stalled["log_level"] == "warning"
        assert stalled["status"] == "Queued" and stalled["stalled_seconds"] == 61
        assert stalled["event_id"] == "t1:2" and stalled["task_key"] == "t1"
        assert rig.api.requests == 1  # a check sends no request

    await rig.reopen()  # a restart: the stall was journaled with the task's state
    async with client_for(rig) as client:
        poller = rig.poller(client)
        task = await rig.task()
        assert task.record.stalled_status == "Queued"
        assert poller.stall_due_in(task) is None
        rig.api.status = "Running"
        with capture_logs() as logs:
            await poller.poll(task)
            [moved] = named(logs, ev.TASK_TRANSITION)
            assert moved["stall_ended"] is True and moved["status"] == "Running"
            assert task.record.stalled_status is None
            assert poller.stall_due_in(task) == 60  # a new status, a new stint
            rig.api.status = "Finished"
            await poller.poll(task)
            [_, done] = named(logs, ev.TASK_TRANSITION)
            assert "stall_ended" not in done
            assert poller.stall_due_in(task) is None  # done: never stalled


async def test_a_task_threshold_overrides_the_default_and_none_disables(rig: Rig) -> None:
    async with client_for(rig) as client:
        poller = rig.poller(client)
        task = await rig.task(stall_after_seconds=5)
        await poller.poll(task)
        assert poller.stall_due_in(task) == 5
        rig.polling = PollingConfig(interval_seconds=10)  # no default, no own threshold
        other = rig.poller(client)
        plain = TaskWatch.from_config(TaskConfig(task_id="t1"), rig.polling, task.record)
        assert other.stall_due_in(plain) is None


async def test_a_check_never_races_the_tasks_poll(rig: Rig) -> None:
    async with client_for(rig) as client:
        poller = rig.poller(client)
        task = await rig.task()
        await poller.poll(task)
        rig.clock.advance(120)
        poller._busy.add(task.key)  # a poll of the task is under way
        assert await poller.check_stall(task) == pytest.approx(0.5)
        poller._busy.discard(task.key)
        task.next_due = rig.clock.monotonic()  # its poll is due: that goes first
        assert await poller.check_stall(task) == pytest.approx(0.5)
        task.next_due = rig.clock.monotonic() + 5
        with capture_logs() as logs:
            assert await poller.check_stall(task) is None
        assert named(logs, ev.TASK_STALLED)


class FakeSource:
    """A stall source whose answers the test sets."""

    def __init__(self) -> None:
        self.due: dict[str, float | None] = {}
        self.results: dict[str, float | Any | None] = {}
        self.checked: list[str] = []

    def stall_due_in(self, task: TaskWatch) -> float | None:
        return self.due.get(task.key)

    async def check_stall(self, task: TaskWatch) -> Any:
        self.checked.append(task.key)
        return self.results.get(task.key)


def watch(name: str) -> TaskWatch:
    cfg = TaskConfig(task_id=name)
    return TaskWatch.from_config(cfg, PollingConfig(), TaskRecord(name, name, None, 0.0))


async def test_the_stall_timer_follows_the_poll_heap_on_the_monotonic_clock() -> None:
    clock = FakeClock()
    source = FakeSource()
    stalls = StallTimer(source, clock)
    ended: list[tuple[str, PollResult]] = []

    async def never(task: TaskWatch) -> PollResult:
        raise AssertionError("no poll in this test")

    sched = PollScheduler(
        never, clock, 4, on_task_done=lambda t: None, on_crash=lambda e: None,
        on_end=lambda t, r: ended.append((t.key, r)), stalls=stalls,
    )  # fmt: skip
    a, b, c = watch("a"), watch("b"), watch("c")
    source.due.update(a=30.0, b=10.0, c=None)
    for t in (a, b, c):
        sched.add(t, due=clock.monotonic() + 100)  # polls far away
    assert stalls.pending() == 2
    wakeup = stalls.wakeup
    assert isinstance(wakeup, ManualWakeup) and wakeup.armed == clock.monotonic() + 10
    # re-pushed with the same due time: nothing moves
    sched.add(b, due=clock.monotonic() + 100)
    assert stalls.pending() == 2
    clock.advance(10)
    source.results["b"] = LOST
    stalls.fire()
    await _settle(stalls)
    assert source.checked == ["b"] and ended == [("b", LOST)]
    # a removed task is never checked
    sched.remove(a)
    clock.advance(30)
    stalls.fire()
    await _settle(stalls)
    assert source.checked == ["b"] and stalls.pending() == 0


async def test_checks_that_moved_leave_a_bounded_heap() -> None:
    # each transition moves a task's check (a new status, a new stint): the entries left
    # behind are dropped once they are an eighth of the heap (and 256)
    clock = FakeClock()
    source = FakeSource()
    stalls = StallTimer(source, clock)
    tasks = [watch(f"t{i}") for i in range(1_000)]
    for round_ in range(5):
        for task in tasks:
            source.due[task.key] = 100.0 + round_
            stalls.follow(task)
    for task in tasks[:100]:
        stalls.forget(task)
    assert stalls.pending() == 900
    assert len(stalls) <= 1_200  # 5,000 entries without compaction
    clock.advance(200)
    stalls.fire()
    await _settle(stalls)
    assert sorted(source.checked) == sorted(t.key for t in tasks[100:])  # each once


async def test_a_check_that_is_early_looks_again_later() -> None:
    clock = FakeClock()
    source = FakeSource()
    stalls = StallTimer(source, clock)
    a = watch("a")
    source.due["a"] = 5.0
    stalls.follow(a)
    clock.advance(5)
    source.results["a"] = 0.5  # e.g. its poll was under way
    stalls.fire()
    await _settle(stalls)
    assert a.stall_due == pytest.approx(clock.monotonic() + 0.5)  # when the check said
    stalls.stop()
    clock.advance(5)
    stalls.fire()
    assert source.checked == ["a"]


async def _settle(stalls: StallTimer) -> None:
    if stalls.running:
        await asyncio.wait(set(stalls.running))


def test_stall_after_seconds_is_checked_with_its_key_path() -> None:
    raw = {
        "polling": {"stall_after_seconds": -1},
        "tasks": [{"task_id": "a", "stall_after_seconds": 10**9}],
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={})
    text = "\n".join(info.value.problems)
    assert "polling.stall_after_seconds" in text
    assert "tasks[0].stall_after_seconds" in text


def test_pagerduty_triggers_on_a_stall_and_resolves_when_the_task_moves_on() -> None:
    fmt = PagerDutyFormat("rk-1", "enkwatch")
    stalled = {
        "event": ev.TASK_STALLED, "level": "warning", "task_key": "t1", "status": "Queued",
        "stalled_seconds": 61.0, "timestamp": "2026-01-01T00:01:01.000000Z",
    }  # fmt: skip
    raw = orjson.dumps(stalled)
    body = orjson.loads(fmt.render(stalled, raw, "t1:2").body)
    assert body["event_action"] == "trigger" and body["dedup_key"] == "t1"
    assert body["payload"]["severity"] == "warning"
    assert "stalled in Queued" in body["payload"]["summary"]
    moved = {
        "event": ev.TASK_TRANSITION, "task_key": "t1", "status": "Running",
        "terminal": False, "stall_ended": True,
    }  # fmt: skip
    assert fmt.accepts(moved)
    body = orjson.loads(fmt.render(moved, orjson.dumps(moved), "t1:3").body)
    assert body == {"routing_key": "rk-1", "event_action": "resolve", "dedup_key": "t1"}
    assert not fmt.accepts(moved | {"stall_ended": False})


async def test_a_state_file_of_an_older_enkwatch_gets_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE tasks (task_key TEXT PRIMARY KEY, task_id TEXT, dataset TEXT,"
        " last_status TEXT, last_unknown_status TEXT, seen_dataset TEXT, seen_task_id TEXT,"
        " seq INTEGER NOT NULL DEFAULT 0, watch_started_at REAL NOT NULL,"
        " polls INTEGER NOT NULL DEFAULT 0, outcome TEXT, spec TEXT);"
        "INSERT INTO tasks (task_key, task_id, last_status, seq, watch_started_at)"
        " VALUES ('t1', 't1', 'Queued', 3, 5.0);"
    )
    db.commit()
    db.close()
    store = SqliteStore(str(path))
    try:
        record = (await store.load_tasks())["t1"]
        assert (record.last_status, record.seq) == ("Queued", 3)
        assert (record.status_since, record.stalled_status) == (None, None)
    finally:
        await store.close()
