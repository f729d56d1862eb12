"""The outbox's rounds against its guarantees: a drain waits for a row written while the
outbox slept."""

from __future__ import annotations

from enkwatch.clock import SystemClock
from enkwatch.sinks import Outbox
from enkwatch.state.sqlite import SqliteStore
from tests.kit import StartReceiver, until
from tests.test_sinks_lean import journal, sink


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
