"""The outbox's rounds against its guarantees: a drain waits for a row written while the
outbox slept, a state that refuses writes does not make it resend in a loop, and the heads
of tasks waiting for a retry do not hide a due head of another task."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import pytest
from aiohttp import web

from enkwatch import events as ev
from enkwatch import sinks as sinks_module
from enkwatch.clock import SystemClock
from enkwatch.events import EventWriter
from enkwatch.formats import CloudEventsFormat
from enkwatch.sinks import Outbox
from enkwatch.state import postgres
from enkwatch.state.base import OutboxRow, TaskRecord
from enkwatch.state.postgres import PgStore
from enkwatch.state.sqlite import SqliteStore
from tests.kit import StartReceiver, StubTask, until
from tests.pgkit import HOW_TO_ENABLE, find_bin_dir
from tests.test_sinks_lean import journal, sink

needs_pg = pytest.mark.skipif(find_bin_dir() is None, reason=HOW_TO_ENABLE)


async def test_wait_idle_waits_for_a_row_written_while_the_outbox_slept(
    hooks: StartReceiver,
) -> None:
    """--exit-when-done waits until the outbox is empty: a sink found idle before the last
    event was journaled is not idle any more once that event is announced."""
    receiver = await hooks()
    store = SqliteStore(":memory:")
    outbox = Outbox(store, [sink("test", receiver.url)], SystemClock())
    await outbox.start()
    try:
        await until(outbox.idle["test"].is_set, "the sink to go idle")
        await journal(store, ["a"], ["test"])
        outbox.notify()  # as the event writer does once the event is committed
        assert await outbox.wait_idle(10)
        assert store.outbox_stats()[0] == 0
        assert [b["task_key"] for b in receiver.bodies] == ["a"]
    finally:
        await outbox.close()


def refuse_writes(store: SqliteStore, refuse: bool = True) -> None:
    """Writes are refused by SQLite itself (as on a full disk: SQLITE_READONLY here)."""
    store._db.execute(f"PRAGMA query_only = {int(refuse)}")


async def test_a_state_refusing_writes_does_not_make_the_outbox_resend_in_a_loop(
    hooks: StartReceiver,
) -> None:
    """The delete of a delivered row is refused: the row stays pending (at least once) and
    goes again later, not in a loop hammering the receiver with copies every round."""
    receiver = await hooks()
    store = SqliteStore(":memory:")
    await journal(store, ["a"], ["test"])
    refuse_writes(store)
    outbox = Outbox(store, [sink("test", receiver.url)], SystemClock())
    await outbox.start()
    try:
        await until(lambda: store.trouble is not None, "the delete to be refused")
        sent = len(receiver.received)
        with pytest.raises(TimeoutError):
            # a round every 10 ms would have sent it again many times by now
            await asyncio.wait_for(until(lambda: len(receiver.received) > sent + 1), 0.5)
        refuse_writes(store, False)
        outbox.notify()  # the disk has room again: a new event was journaled
        assert await outbox.wait_idle(10)
        assert store.outbox_stats()[0] == 0
    finally:
        await outbox.close()


async def test_a_410_while_the_state_refuses_writes_disables_the_sink_once_it_can(
    hooks: StartReceiver,
) -> None:
    """The sink cannot be remembered as disabled: its worker lives on, and disables it (with
    its sink.disabled) once the state takes writes again."""
    receiver = await hooks(status=410)
    store = SqliteStore(":memory:")
    await journal(store, ["a", "b"], ["test"])
    refuse_writes(store)
    disabled: list[int] = []
    outbox = Outbox(
        store,
        [sink("test", receiver.url)],
        SystemClock(),
        on_disabled=lambda s, status, dropped: disabled.append(dropped),
    )
    await outbox.start()
    try:
        await until(lambda: store.trouble is not None, "the state to refuse a write")
        refuse_writes(store, False)
        outbox.notify()
        await until(lambda: bool(disabled), "the sink to be disabled")
        assert disabled == [2]
        assert await store.disabled_sinks() == {"test": ""}
        assert store.outbox_stats()[0] == 0
    finally:
        await outbox.close()


async def test_a_reload_enabling_a_sink_while_the_state_refuses_writes_goes_on(
    hooks: StartReceiver,
) -> None:
    """A reload re-enables a disabled sink; the state that cannot forget the mark now is a
    known condition (the mark is dropped at the next start, its config changed)."""
    receiver = await hooks()
    store = SqliteStore(":memory:")
    await store.disable_sink("test", "old")
    outbox = Outbox(store, [sink("test", receiver.url, fingerprint="old")], SystemClock())
    await outbox.start()
    try:
        assert outbox.disabled == {"test"}
        refuse_writes(store)
        await outbox.reconfigure([sink("test", receiver.url, fingerprint="new")])
        assert outbox.disabled == set()
        refuse_writes(store, False)
        await journal(store, ["a"], ["test"])
        outbox.notify()
        assert await outbox.wait_idle(10)
        assert [b["task_key"] for b in receiver.bodies] == ["a"]
    finally:
        await outbox.close()


async def due_head_behind_retrying_heads(store: SqliteStore | PgStore) -> None:
    now = SystemClock().now().timestamp()
    await journal(store, [f"t{i}" for i in range(4)], ["test"])
    for row in await store.outbox_heads("test", 100):
        await store.delivery_retry(row.id, 1, now + 3600)  # failed: tried again in an hour
    await journal(store, ["late"], ["test"])


async def test_a_due_head_is_sent_behind_more_retrying_heads_than_a_round_reads(
    hooks: StartReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure blocks only the later deliveries of its own task: with more tasks waiting
    for a retry than one round reads, another task's due delivery still goes."""
    monkeypatch.setattr(sinks_module, "HEADS_PER_ROUND", 3)
    receiver = await hooks()
    store = SqliteStore(":memory:")
    await due_head_behind_retrying_heads(store)
    outbox = Outbox(store, [sink("test", receiver.url)], SystemClock())
    await outbox.start()
    try:
        await until(lambda: bool(receiver.received), "the due delivery", within=2)
    finally:
        await outbox.close()
    assert [b["task_key"] for b in receiver.bodies] == ["late"]


@needs_pg
async def test_due_heads_come_first_on_postgresql(dsn: str) -> None:
    store = PgStore(dsn, "a", SystemClock(), lease_s=15.0)
    await store.open()
    try:
        await store.leases.balance()
        await due_head_behind_retrying_heads(store)
        heads = await store.outbox_heads("test", 3)
        assert [json.loads(r.body)["task_key"] for r in heads][:1] == ["late"]
    finally:
        await store.close()


async def heads_read_cost(backlog: int) -> int:
    """SQLite VM steps (not time) of one read of the queue heads of 2 tasks with a backlog."""
    store = SqliteStore(":memory:")
    now = SystemClock().now().timestamp()
    with store._tx():
        store._db.executemany(
            "INSERT INTO outbox (sink, task_key, body, created_at, next_attempt_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [("test", f"t{i % 2}", b"{}", now, now) for i in range(backlog)],
        )
    steps = 0

    def step() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._db.set_progress_handler(step, 100)
    heads = await store.outbox_heads("test", 1000)
    store._db.set_progress_handler(None, 0)
    assert len(heads) == 2
    return steps


async def test_reading_the_heads_does_not_grow_with_the_backlog() -> None:
    """A sink whose receiver was down has a long backlog, read again on every event while
    it retries: SQLite runs on the event loop, so that read must not scan the backlog."""
    assert await heads_read_cost(20_000) < 2 * await heads_read_cost(200) + 10


def rows_processed(plan: Any) -> int:
    """The rows every node of an EXPLAIN ANALYZE plan produced, over all its loops."""
    node = plan[0]["Plan"] if isinstance(plan, list) else plan
    own = int(node.get("Actual Rows", 0) * node.get("Actual Loops", 1))
    return own + sum(rows_processed(child) for child in node.get("Plans", []))


async def pg_heads_read_cost(store: PgStore, backlog: int) -> int:
    """Rows the plan of one read of the queue heads of 2 tasks goes through, with a backlog."""
    now = SystemClock().now().timestamp()
    async with store.pool.acquire() as conn:
        await conn.execute("DELETE FROM enkwatch_outbox")
        for key in ("t0", "t1"):
            await conn.execute(
                "INSERT INTO enkwatch_outbox (sink, task_key, partition, body, created_at, "
                "next_attempt_at) SELECT 'test', $1, $2, '{}', $3, $3 "
                "FROM generate_series(1, $4)",
                key,
                store.leases.partition(key),
                now,
                backlog // 2,
            )
        await conn.execute("ANALYZE enkwatch_outbox")
        plan = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {postgres.OUTBOX_HEADS}",
            "test",
            store.leases.fresh_partitions(),
            1000,
        )
    assert len(await store.outbox_heads("test", 1000)) == 2
    return rows_processed(json.loads(plan))


@needs_pg
async def test_reading_the_heads_does_not_grow_with_the_backlog_on_postgresql(dsn: str) -> None:
    store = PgStore(dsn, "a", SystemClock(), lease_s=15.0)
    await store.open()
    try:
        await store.leases.balance()
        small = await pg_heads_read_cost(store, 200)
        assert await pg_heads_read_cost(store, 20_000) < 2 * small + 10
    finally:
        await store.close()


# -- the review's leftovers (issue 12) -------------------------------------------------------


class EventHooks:
    """A receiver on 127.0.0.1 that answers each POST by its event's task: `answer(event)`
    gives the status (and may wait); it counts the tries of each event_id, keeps no body."""

    def __init__(self, answer: Callable[[dict[str, Any]], Awaitable[int]]) -> None:
        self.answer = answer
        self.tries: dict[str, int] = {}
        self.arrived: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        event = event.get("data", event)  # a CloudEvents envelope: the event is its data
        event_id = event["event_id"]
        self.tries[event_id] = self.tries.get(event_id, 0) + 1
        self.arrived.append(event_id)
        return web.Response(status=await self.answer(event))

    async def start(self, aiohttp_server: Any) -> str:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_post("/hook", self.handle)
        server = await aiohttp_server(app)
        return str(server.make_url("/hook"))


def answering(status: int) -> Callable[[dict[str, Any]], Awaitable[int]]:
    async def answer(event: dict[str, Any]) -> int:
        return status

    return answer


async def journal_fields(
    store: SqliteStore, key: str, seq: int, sinks: list[str], **fields: Any
) -> None:
    """One transition of task `key` (added on its first event), with these fields."""
    record = TaskRecord(key, key, None, 0.0)
    if seq == 1:
        await store.add_task(record)
    record.seq = seq
    body = {"event": "task.transition", "task_key": key, "seq": seq, "event_id": f"{key}:{seq}"}
    await store.record_event(record, body | fields, sinks)


async def test_the_render_cache_is_bounded_by_bytes(aiohttp_server: Any) -> None:
    """Big events (here 256 KiB each) delivered: what the outbox keeps of them to render
    them once for every sink stays within a few MiB, not 4,096 of them."""
    hooks = EventHooks(answering(204))
    url = await hooks.start(aiohttp_server)
    store = SqliteStore(":memory:")
    count, big = 48, "x" * (256 * 1024)
    for i in range(count):
        await journal_fields(store, f"t{i}", 1, ["test"], reason=big)
    outbox = Outbox(store, [sink("test", url, format=CloudEventsFormat("enkwatch"))], SystemClock())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await outbox.start()
        try:
            assert await outbox.wait_idle(30)
        finally:
            await outbox.close()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(hooks.tries) == count
    # 48 events: 12 MiB of journaled bytes, as much parsed and as much rendered again
    assert held < 12 * 1024 * 1024, f"{held / 2**20:.1f} MiB held"


async def test_rendered_payloads_are_kept_at_their_size() -> None:
    """orjson's bytes keep their whole buffer (4 KiB for an event of ~550 B): the render
    cache keeps a copy of the payload's size, so its byte bound is what it holds."""
    outbox = Outbox(SqliteStore(":memory:"), [], SystemClock())
    fmt = CloudEventsFormat("enkwatch")
    events = [
        {"event": "task.transition", "task_key": f"t{i}", "seq": 1, "event_id": f"t{i}:1",
         "status": "Running", "note": "x" * 300}
        for i in range(500)
    ]  # fmt: skip
    bodies = [orjson.dumps(e) for e in events]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for event, body in zip(events, bodies, strict=True):
            outbox._payload(fmt, event, body, event["event_id"])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    counted = outbox._rendered.bytes
    assert held < 2 * counted, f"{held} B held for {counted} B counted"


async def test_a_410_does_not_count_a_delivery_in_flight_as_dropped(
    aiohttp_server: Any,
) -> None:
    """b's head is answered 410 while a's is in flight; a's is then answered 204: a:1 was
    delivered (counted so), only b:1 and a:2 were dropped, and nothing is counted twice."""
    outbox: Outbox | None = None

    async def answer(event: dict[str, Any]) -> int:
        if event["task_key"] == "b":
            return 410
        box = outbox
        assert box is not None
        await until(lambda: "test" in box.disabled, "b's 410 to disable the sink")
        return 204

    hooks = EventHooks(answer)
    url = await hooks.start(aiohttp_server)
    store = SqliteStore(":memory:")
    await journal(store, ["a", "b", "a"], ["test"])
    dropped: list[int] = []
    results: list[str] = []
    outbox = Outbox(
        store,
        [sink("test", url)],
        SystemClock(),
        on_result=lambda s, o: results.append(o),
        on_disabled=lambda s, status, n: dropped.append(n),
    )
    await outbox.start()
    try:
        await until(lambda: bool(dropped), "the sink to be disabled")
        assert await outbox.wait_idle(10)
    finally:
        await outbox.close()
    assert sorted(hooks.arrived) == ["a:1", "b:1"]
    assert sorted(results) == ["delivered", "disabled"]
    assert dropped == [2]  # b:1 and a:2; a:1 was delivered
    assert store.outbox_stats()[0] == 0
    assert await store.disabled_sinks() == {"test": ""}


class HeadsStore(SqliteStore):
    """Counts the reads of queue heads; `found`: how many heads each read found."""

    found: list[int]

    @property
    def reads(self) -> int:
        return len(self.found)

    async def outbox_heads(self, sink: str, limit: int) -> list[OutboxRow]:
        heads = await super().outbox_heads(sink, limit)
        self.found.append(len(heads))
        return heads

    def asleep_after_a_failure(self) -> bool:
        """a:1 was read twice: once to send it, once to find it waiting (the pause, a retry)."""
        return self.found.count(1) == 2 and self.found[-1] == 1


async def events_of(writer: EventWriter, store: SqliteStore, tasks: list[StubTask]) -> None:
    """One transition of each task, in turn, the loop turning between them."""
    for task in tasks:
        if task.record.seq == 0:
            await store.add_task(task.record)
        await writer.task_event(task, ev.TASK_TRANSITION, ev.INFO, {"status": "Running"})
        for _ in range(5):
            await asyncio.sleep(0)  # the outbox's worker runs if it was woken


async def test_a_paused_sink_does_not_read_its_queue_on_every_event(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver asked for a pause: new events (of any task) are not sendable before
    it ends, so the sink sleeps through them; a reload looks again."""
    monkeypatch.setattr(sinks_module, "RECHECK_S", 600.0)
    hooks = EventHooks(answering(429))
    url = await hooks.start(aiohttp_server)
    store = HeadsStore(":memory:")
    store.found = []
    # no Retry-After: paused for the backoff, a minute at least
    outbox = Outbox(store, [sink("test", url)], SystemClock(), retry_base_s=600)
    writer = EventWriter(SystemClock(), store, sinks_for=outbox.sinks_for, notify=outbox.notify)
    a = StubTask("a")
    await outbox.start()
    try:
        await events_of(writer, store, [a])
        await until(store.asleep_after_a_failure, "the pause")
        reads = store.reads
        await events_of(writer, store, [StubTask(f"t{i}") for i in range(20)] + [a])
        assert store.reads == reads
        await outbox.reconfigure([sink("test", url)])
        await until(lambda: store.reads == reads + 1, "the reload to look again")
    finally:
        await outbox.close()
    assert hooks.arrived == ["a:1"]


async def test_a_retrying_sink_reads_its_queue_only_for_a_row_that_may_be_due(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Task a's delivery waits for its retry: a's new events queue behind it (no read), a
    new task's event may be due now (one read, and it goes)."""
    monkeypatch.setattr(sinks_module, "RECHECK_S", 600.0)

    async def answer(event: dict[str, Any]) -> int:
        return 500 if event["task_key"] == "a" else 204

    hooks = EventHooks(answer)
    url = await hooks.start(aiohttp_server)
    store = HeadsStore(":memory:")
    store.found = []
    outbox = Outbox(store, [sink("test", url)], SystemClock(), retry_base_s=600)
    writer = EventWriter(SystemClock(), store, sinks_for=outbox.sinks_for, notify=outbox.notify)
    a = StubTask("a")
    await outbox.start()
    try:
        await events_of(writer, store, [a])
        await until(store.asleep_after_a_failure, "a's retry")
        reads = store.reads
        await events_of(writer, store, [a] * 20)
        assert store.reads == reads
        await events_of(writer, store, [StubTask("b")])
        await until(lambda: hooks.arrived == ["a:1", "b:1"], "b's delivery")
    finally:
        await outbox.close()
    assert store.outbox_stats()[0] == 21  # a's: they wait for a:1's retry


class SlowDeleteStore(SqliteStore):
    """Deleting delivered rows takes a while (a network round trip, as on PostgreSQL)."""

    release: asyncio.Event
    deleting: asyncio.Event

    async def deliveries_done(self, row_ids: Sequence[int]) -> None:
        self.deleting.set()
        await self.release.wait()
        await super().deliveries_done(row_ids)


async def test_a_sink_removed_and_added_again_has_one_worker(aiohttp_server: Any) -> None:
    """Two reloads (the sink removed, then back) while its round ends: the new worker waits
    for the old one to delete what went, so nothing delivered goes twice."""
    hang = asyncio.Event()

    async def answer(event: dict[str, Any]) -> int:
        if event["task_key"] == "b":
            await hang.wait()  # in flight when the sink is removed: cut, it goes again
        return 204

    hooks = EventHooks(answer)
    url = await hooks.start(aiohttp_server)
    store = SlowDeleteStore(":memory:")
    store.release, store.deleting = asyncio.Event(), asyncio.Event()
    await journal(store, ["a", "b"], ["test"])
    outbox = Outbox(store, [sink("test", url)], SystemClock())
    await outbox.start()
    try:
        await until(lambda: sorted(hooks.arrived) == ["a:1", "b:1"], "a:1 and b:1 sent")
        await until(lambda: hooks.tries["a:1"] == 1 and not outbox.idle["test"].is_set())
        await outbox.reconfigure([])
        await outbox.reconfigure([sink("test", url)])
        await store.deleting.wait()  # the old worker deletes a:1, slowly
        with contextlib.suppress(TimeoutError):
            # a second worker would read a:1, still pending, and send it again
            await asyncio.wait_for(until(lambda: hooks.tries["a:1"] > 1), 0.5)
        hang.set()
        store.release.set()
        assert await outbox.wait_idle(10)
    finally:
        hang.set()
        store.release.set()
        await outbox.close()
    assert hooks.tries["a:1"] == 1
    assert hooks.tries["b:1"] >= 1 and store.outbox_stats()[0] == 0


async def test_a_reload_mid_round_applies_to_every_row_not_yet_sent(
    aiohttp_server: Any,
) -> None:
    """A round of 20 heads, 8 in flight when a reload narrows the sink's filters: those 8 go
    with the config they were sent with; none of the 12 not yet sent is sent."""
    release = asyncio.Event()

    async def answer(event: dict[str, Any]) -> int:
        await release.wait()
        return 204

    hooks = EventHooks(answer)
    url = await hooks.start(aiohttp_server)
    store = SqliteStore(":memory:")
    await journal(store, [f"t{i:02}" for i in range(20)], ["test"])
    results: list[str] = []
    outbox = Outbox(
        store, [sink("test", url)], SystemClock(), on_result=lambda s, o: results.append(o)
    )
    await outbox.start()
    try:
        await until(lambda: len(hooks.arrived) == sinks_module.MAX_PARALLEL_PER_SINK)
        narrower = sink("test", url, kinds=frozenset({"redteam"}), fingerprint="narrower")
        await outbox.reconfigure([narrower])
        release.set()
        assert await outbox.wait_idle(10)
    finally:
        release.set()
        await outbox.close()
    assert len(hooks.arrived) == 8
    assert results.count("delivered") == 8 and results.count("filtered") == 12


async def test_a_drain_does_not_wait_for_a_sink_a_reload_removed(aiohttp_server: Any) -> None:
    """--exit-when-done waits for the outbox to empty: a sink removed by a reload meanwhile
    sends nothing more from this process (its rows wait for the next start)."""
    hang = asyncio.Event()

    async def answer(event: dict[str, Any]) -> int:
        await hang.wait()
        return 204

    hooks = EventHooks(answer)
    url = await hooks.start(aiohttp_server)
    store = SqliteStore(":memory:")
    await journal(store, ["a"], ["test"])
    outbox = Outbox(store, [sink("test", url), sink("other", url)], SystemClock())
    await outbox.start()
    try:
        await until(lambda: hooks.arrived == ["a:1"], "a:1 in flight")
        drain = asyncio.ensure_future(outbox.wait_idle(60))
        await asyncio.sleep(0)  # one turn: the drain waits for the sink "test"
        assert not drain.done()
        await outbox.reconfigure([sink("other", url)])
        assert await asyncio.wait_for(drain, 10)
    finally:
        hang.set()
        await outbox.close()
    assert store.outbox_stats()[0] == 1  # a:1 waits for the next start
