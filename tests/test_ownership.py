"""Ownership, the role chosen once: a sole owner (SQLite) or a partition owner (leases)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.clock import FakeClock
from enkwatch.config import PollingConfig, validate_task_entry
from enkwatch.events import EventWriter
from enkwatch.ownership import SOURCE_API, PartitionOwner, SoleOwner, choose_owner
from enkwatch.state.base import TaskRecord
from enkwatch.state.postgres import PgStore
from enkwatch.state.sqlite import SqliteStore
from enkwatch.watch import TaskWatch


def watch(record: TaskRecord, source: str = "config") -> TaskWatch:
    cfg = validate_task_entry({"task_id": record.task_key})
    return TaskWatch.from_config(cfg, PollingConfig(), record, source)


class Local:
    """The watch list as an owner sees it (`ownership.LocalWatchList`)."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskWatch] = {}
        self.loaded: dict[str, TaskRecord] | None = None
        self.registered = 0

    def watch_for_record(self, record: TaskRecord) -> TaskWatch | None:
        return watch(record, SOURCE_API) if record.spec is not None else None

    def adopt(self, task: TaskWatch) -> None:
        self.tasks[task.key] = task

    def drop(self, task: TaskWatch) -> None:
        self.tasks.pop(task.key, None)

    async def load_all(self, records: dict[str, TaskRecord]) -> None:
        self.loaded = records
        for record in records.values():
            self.adopt(watch(record))

    async def register_config(self) -> None:
        self.registered += 1


class Timers:
    """Where an owner registers its periodic job (`schedule.Timers`)."""

    def __init__(self) -> None:
        self.jobs: list[tuple[float, str]] = []

    def every(self, seconds: float, job: Callable[[], Any], name: str) -> None:
        self.jobs.append((seconds, name))


def event(key: str, seq: int) -> dict[str, Any]:
    return {
        "event": ev.TASK_TRANSITION,
        "level": "info",
        "task_key": key,
        "seq": seq,
        "event_id": f"{key}:{seq}",
    }


# -- the sole owner --------------------------------------------------------------------------


async def test_the_sole_owner_writes_again_what_was_not_confirmed_then_loads() -> None:
    store = SqliteStore(":memory:")
    record = TaskRecord("a", "a", None, 1.0)
    await store.add_task(record)
    record.seq = 1
    await store.record_event(record, event("a", 1))
    await store.mark_written("a", 1)
    record.seq = 2
    await store.record_event(record, event("a", 2))  # journaled, never confirmed written
    owner = choose_owner(store, EventWriter(FakeClock(), store), FakeClock())
    assert isinstance(owner, SoleOwner)
    local = Local()
    with capture_logs() as logs:
        await owner.load(local)
    assert [e["event_id"] for e in logs] == ["a:2"]
    assert await store.unwritten_events() == []
    assert local.loaded is not None and set(local.loaded) == {"a"}
    assert owner.may_poll is None  # every task is ours
    assert owner.stats() is None
    assert owner.keeps_config is False
    timers = Timers()
    await owner.start(timers)
    await owner.stop()
    assert timers.jobs == []


async def test_the_sole_owner_is_the_local_watch_list() -> None:
    store = SqliteStore(":memory:")
    owner = SoleOwner(store, EventWriter(FakeClock(), store))
    local = Local()
    await owner.load(local)
    api = watch(TaskRecord("by-api", "by-api", None, 1.0), SOURCE_API)
    await store.add_task(api.record)
    await store.set_task_spec("by-api", {"task_id": "by-api"})
    config = watch(TaskRecord("cfg", "cfg", None, 1.0))
    owner.admit(api)
    owner.admit(config)
    assert await owner.watches("by-api") and not await owner.watches("other")
    assert [(t.key, here) for t, here in await owner.listing()] == [
        ("by-api", None),
        ("cfg", None),
    ]
    owner.lost("cfg")
    assert set(local.tasks) == {"by-api"}
    await owner.forget("by-api", api)
    assert (await store.load_tasks())["by-api"].spec is None  # not loaded after a restart


# -- the partition owner, on a real PostgreSQL ---------------------------------------------


async def test_partition_owners_share_the_tasks_and_hand_them_over(dsn: str) -> None:
    clock = FakeClock()
    stores = [PgStore(dsn, name, clock, lease_s=15.0) for name in ("a", "b")]
    for store in stores:
        await store.open()
    try:
        writer = EventWriter(clock, stores[0])
        owners = [choose_owner(store, writer, clock) for store in stores]
        assert all(isinstance(owner, PartitionOwner) for owner in owners)
        a, b = owners[0], owners[1]
        assert isinstance(a, PartitionOwner) and isinstance(b, PartitionOwner)
        keys = [f"t{i:02d}" for i in range(20)]
        for key in keys:
            await stores[0].add_task(TaskRecord(key, key, None, 1.0, spec={"task_id": key}))
        la, lb = Local(), Local()
        await a.load(la)
        assert la.registered == 1 and a.keeps_config is True
        timers = Timers()
        await a.start(timers)
        assert [name for _, name in timers.jobs] == ["leases"]
        assert set(la.tasks) == set(keys)  # alone: every partition
        assert a.may_poll is not None and all(a.may_poll(k) for k in keys)

        await b.load(lb)
        await b.start(Timers())
        await a.tick()  # sees b: sheds above its share
        await b.tick()  # claims what a gave back
        assert set(la.tasks) | set(lb.tasks) == set(keys)
        assert not set(la.tasks) & set(lb.tasks)
        assert lb.tasks
        assert b.may_poll is not None
        assert all(b.may_poll(k) != a.may_poll(k) for k in keys)
        stats = a.stats()
        assert stats is not None
        assert stats["partitions_owned"] + (b.stats() or {})["partitions_owned"] == 64
        assert {"fenced", "conflicts", "commits"} <= stats.keys()

        # the shared list: everything, each marked with whether it is polled here
        listed = {t.key: here for t, here in await a.listing()}
        assert set(listed) == set(keys)
        assert {k for k, here in listed.items() if here} == set(la.tasks)
        assert await a.watches(next(iter(lb.tasks)))  # watched by the other replica

        await a.stop()  # SIGTERM: every partition given back at once
        assert a.stats() == {**(a.stats() or {}), "partitions_owned": 0}
        await b.tick()
        assert set(lb.tasks) == set(keys)
        await b.stop()
    finally:
        for store in stores:
            await store.close()
