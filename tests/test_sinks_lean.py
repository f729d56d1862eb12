"""The outbox's lean delivery: queue heads only, delivered rows deleted together, an event
rendered once for the sinks that share its format, an idle outbox woken by the lease loop."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from aiohttp import web

from enkwatch.clock import SystemClock
from enkwatch.events import EventWriter
from enkwatch.formats import Payload
from enkwatch.ownership import PartitionOwner, choose_owner
from enkwatch.sinks import Outbox, Sink
from enkwatch.state.base import TaskRecord
from enkwatch.state.postgres import PgStore
from enkwatch.state.sqlite import SqliteStore
from tests.kit import StartReceiver, until
from tests.pgkit import HOW_TO_ENABLE, find_bin_dir

needs_pg = pytest.mark.skipif(find_bin_dir() is None, reason=HOW_TO_ENABLE)


class CountingFormat:
    """The journaled event as it is, counting its renderings."""

    def __init__(self, key: str) -> None:
        self.cache_key = ("counting", key)
        self.rendered: list[str] = []

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return True

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        self.rendered.append(message_id)
        return Payload(raw)


def sink(name: str, url: str, **kw: Any) -> Sink:
    return Sink(
        id=name,
        url=url,
        secret=None,
        events=frozenset({"task.transition"}),
        timeout_s=5.0,
        max_age_s=3600.0,
        **kw,
    )


async def journal(store: SqliteStore | PgStore, keys: Sequence[str], sinks: list[str]) -> None:
    """One transition per key, in this order (a key twice: its next event)."""
    records: dict[str, TaskRecord] = {}
    for key in keys:
        if key not in records:
            records[key] = TaskRecord(key, key, None, 0.0)
            await store.add_task(records[key])
        rec = records[key]
        rec.seq += 1
        body = {"event": "task.transition", "task_key": key, "seq": rec.seq}
        await store.record_event(rec, body | {"event_id": f"{key}:{rec.seq}"}, sinks)


def seqs(rows: Sequence[Any]) -> list[tuple[str, int]]:
    return [(r.task_key, json.loads(r.body)["seq"]) for r in rows]


async def test_only_the_head_of_each_tasks_queue_is_read() -> None:
    store = SqliteStore(":memory:")
    await journal(store, ["a", "b", "a", "b", "a"], ["hook", "other"])
    heads = await store.outbox_heads("hook", 100)
    assert seqs(heads) == [("a", 1), ("b", 1)]
    await store.deliveries_done([r.id for r in heads])
    assert seqs(await store.outbox_heads("hook", 100)) == [("a", 2), ("b", 2)]
    assert seqs(await store.outbox_heads("hook", 1)) == [("a", 2)]
    assert store.outbox_stats()[0] == 3 + 5  # the other sink's rows are untouched


class BatchStore(SqliteStore):
    """Records each deletion of delivered rows."""

    deleted: list[int]

    async def deliveries_done(self, row_ids: Sequence[int]) -> None:
        self.deleted.append(len(row_ids))
        await super().deliveries_done(row_ids)


async def test_delivered_rows_are_deleted_together(hooks: StartReceiver) -> None:
    receiver = await hooks()
    store = BatchStore(":memory:")
    store.deleted = []
    await journal(store, [f"t{i}" for i in range(20)], ["test"])
    outbox = Outbox(store, [sink("test", receiver.url)], SystemClock())
    await outbox.start()
    try:
        assert await outbox.wait_idle(10)
    finally:
        await outbox.close()
    assert len(receiver.received) == 20
    assert store.deleted == [20]  # every head was due in the first round: one statement
    assert store.outbox_stats() == (0, None)


async def test_an_event_is_rendered_once_for_the_sinks_sharing_its_format(
    hooks: StartReceiver,
) -> None:
    receiver = await hooks()
    shared, own = CountingFormat("shared"), CountingFormat("own")
    sinks = [
        sink("one", receiver.url, format=shared),
        sink("two", receiver.url, format=shared),
        sink("three", receiver.url, format=own),
    ]
    store = SqliteStore(":memory:")
    await journal(store, ["a", "a", "b"], [s.id for s in sinks])
    outbox = Outbox(store, sinks, SystemClock())
    await outbox.start()
    try:
        assert await outbox.wait_idle(10)
    finally:
        await outbox.close()
    assert len(receiver.received) == 9
    assert sorted(shared.rendered) == ["a:1", "a:2", "b:1"]
    assert sorted(own.rendered) == ["a:1", "a:2", "b:1"]
    headers = receiver.received[0][0]
    assert headers["User-Agent"].startswith("enkwatch/")
    assert headers["webhook-id"] == headers["Idempotency-Key"]


@needs_pg
async def test_the_same_heads_and_batch_deletes_on_postgresql(dsn: str) -> None:
    store = PgStore(dsn, "a", SystemClock(), lease_s=15.0)
    await store.open()
    try:
        await store.leases.balance()
        await journal(store, ["a", "b", "a", "b", "a"], ["hook"])
        heads = await store.outbox_heads("hook", 100)
        assert seqs(heads) == [("a", 1), ("b", 1)]
        await store.deliveries_done([r.id for r in heads])
        assert seqs(await store.outbox_heads("hook", 100)) == [("a", 2), ("b", 2)]
        await store.deliveries_done([])
        assert len(await store.pending_deliveries("hook", 100)) == 3
    finally:
        await store.close()


@needs_pg
async def test_the_lease_loop_wakes_an_idle_outbox_while_rows_wait(dsn: str) -> None:
    """An idle outbox waits to be woken (no timer): rows of a partition taken over from
    another replica are not announced by an event, the lease loop finds them."""
    other = PgStore(dsn, "other", SystemClock(), lease_s=15.0)
    store = PgStore(dsn, "a", SystemClock(), lease_s=15.0)
    await other.open()
    await store.open()
    woken: list[int] = []
    try:
        await other.leases.balance()
        await journal(other, ["x"], ["hook"])  # written by the replica that then goes away
        await other.leases.release_all()
        writer = EventWriter(SystemClock(), store)
        owner = choose_owner(store, writer, SystemClock(), lambda: woken.append(1))
        assert isinstance(owner, PartitionOwner)
        await owner.tick()
        assert woken == [1]
        await store.deliveries_done([r.id for r in await store.outbox_heads("hook", 10)])
        await owner.tick()
        assert woken == [1]  # nothing waits: the outbox is left asleep
    finally:
        await store.close()
        await other.close()


async def test_a_410_does_not_count_what_the_same_round_delivered_as_dropped(
    aiohttp_server: Any,
) -> None:
    """Task a's head is answered 204 and task b's 410 in the same round: the row of a that
    went is deleted before the sink is disabled, only the rows that did not go are dropped."""
    answered: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        if event["task_key"] == "a":
            answered.append("a")
            return web.Response(status=204)
        await until(lambda: bool(answered), "a's delivery to be answered")
        return web.Response(status=410)

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = await aiohttp_server(app)
    store = SqliteStore(":memory:")
    await journal(store, ["a", "b", "a"], ["test"])
    dropped: list[int] = []
    outbox = Outbox(
        store,
        [sink("test", str(server.make_url("/hook")))],
        SystemClock(),
        on_disabled=lambda s, status, n: dropped.append(n),
    )
    await outbox.start()
    try:
        assert await outbox.wait_idle(10)
    finally:
        await outbox.close()
    assert dropped == [2]  # b:1 and a:2; a:1 was delivered
    assert store.outbox_stats()[0] == 0
