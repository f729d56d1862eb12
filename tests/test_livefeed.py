"""The live event stream's ring and readers: bounded whatever the readers do."""

from __future__ import annotations

import orjson

from enkwatch.livefeed import EventFeed, sse_message


def event(key: str, seq: int) -> dict[str, object]:
    return {"event": "task.transition", "task_key": key, "seq": seq, "event_id": f"{key}:{seq}"}


def ids(messages: list[bytes]) -> list[str]:
    return [m.split(b"\n", 1)[0].removeprefix(b"id: ").decode() for m in messages]


def test_one_message_per_event_with_its_id_and_one_data_line() -> None:
    feed = EventFeed()
    feed.publish({**event("t1", 1), "detail": "two\nlines"})
    feed.publish({"event": "daemon.started", "tasks": 1})
    task_msg, daemon_msg = list(feed)
    head, data, end = task_msg.split(b"\n", 2)
    assert head == b"id: t1:1" and end == b"\n"
    assert orjson.loads(data.removeprefix(b"data: "))["detail"] == "two\nlines"
    assert daemon_msg.startswith(b"data: ")  # a daemon event has no event_id: no id line


async def test_resume_after_an_id_in_the_ring_and_not_before_it() -> None:
    feed = EventFeed(ring_size=3)
    for seq in range(1, 6):
        feed.publish(event("t1", seq))
    assert ids(list(feed)) == ["t1:3", "t1:4", "t1:5"]
    assert ids(feed.since("t1:3") or []) == ["t1:4", "t1:5"]
    assert feed.since("t1:5") == []
    assert feed.since("t1:2") is None  # older than the ring: the caller sends a snapshot
    assert feed.since("other:1") is None
    assert len(feed._positions) == 3  # the index forgets what the ring forgot


async def test_a_reader_too_far_behind_is_dropped_not_buffered() -> None:
    feed = EventFeed(queue_size=4)
    slow, fast = feed.connect(), feed.connect()
    assert slow is not None and fast is not None
    for seq in range(1, 5):
        feed.publish(event("t1", seq))
    while not fast.queue.empty():
        fast.queue.get_nowait()
    feed.publish(event("t1", 5))
    assert slow.dropped and slow not in feed.readers and feed.dropped == 1
    assert slow.queue.qsize() <= 4
    assert fast in feed.readers
    # the dropped reader's stream ends (None last); it reconnects with Last-Event-ID
    items = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
    assert items[-1] is None


async def test_readers_are_capped_and_closing_ends_every_stream() -> None:
    feed = EventFeed(max_readers=2)
    a, b = feed.connect(), feed.connect()
    assert a is not None and b is not None and feed.connect() is None
    feed.disconnect(a)
    assert feed.connect() is not None
    feed.close()
    assert b.queue.get_nowait() is None
    assert feed.connect() is None


def test_sse_message_names_and_ids() -> None:
    assert sse_message(b"{}", "k:1", "snapshot") == b"event: snapshot\nid: k:1\ndata: {}\n\n"
    assert sse_message(b"{}", "a\r\nb") == b"id: a  b\ndata: {}\n\n"
