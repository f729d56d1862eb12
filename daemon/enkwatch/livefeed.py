"""The live event stream of `GET /events`: a bounded ring of recent events and its readers.

The one `EventWriter` hands every event to `EventFeed.publish` (an observer given to it at
construction), after the event was journaled and written on stdout. Each event becomes one
server-sent-event message: `id: <event_id>` (task events; daemon events have none) and one
`data:` line of the event's JSON. Memory is bounded whatever the readers do: the ring keeps
the last `ring_size` messages (for `Last-Event-ID` resumption), a reader's queue holds at
most `queue_size` messages (a reader that falls that far behind is dropped, never buffered
for), and at most `max_readers` read at once.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson

RING_SIZE: Final = 1024
QUEUE_SIZE: Final = 256
MAX_READERS: Final = 64


def sse_message(data: bytes, event_id: str | None = None, name: str | None = None) -> bytes:
    """One SSE message; `data` is one line (JSON has no raw newline)."""
    head = b""
    if name is not None:
        head += b"event: " + name.encode() + b"\n"
    if event_id is not None:
        head += b"id: " + _one_line(event_id).encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def _one_line(text: str) -> str:
    # an id is a task key and a number; a key cannot hold CR/LF (config rule), but be sure
    return text.replace("\r", " ").replace("\n", " ")


class Reader:
    """One connected client: a bounded queue of messages; None ends the stream."""

    def __init__(self, queue_size: int) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(queue_size)
        self.dropped = False

    def offer(self, message: bytes | None) -> bool:
        """Queue a message; False (and dropped) when the reader is too far behind."""
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            self.dropped = True
            return False
        return True

    def end(self) -> None:
        """Make the stream end at once (the queue may be full: make room for the end)."""
        while not self.offer(None):
            self.queue.get_nowait()


class EventFeed:
    """The ring of recent events and the readers of the live stream."""

    def __init__(
        self,
        ring_size: int = RING_SIZE,
        queue_size: int = QUEUE_SIZE,
        max_readers: int = MAX_READERS,
    ) -> None:
        # (position, event_id, the event's JSON): the SSE message is made only when a reader
        # wants it (no more work per event than one orjson dump while no one reads the
        # stream, the common case)
        self._ring: deque[tuple[int, str | None, bytes]] = deque(maxlen=ring_size)
        # event_id -> its position in the stream (positions of the ring only)
        self._positions: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._queue_size = queue_size
        self.max_readers = max_readers
        self.readers: set[Reader] = set()
        self.closed = False
        self.dropped = 0

    def publish(self, body: Mapping[str, Any]) -> None:
        """The EventWriter's observer: one event, to the ring and to every reader."""
        event_id = body.get("event_id")
        event_id = event_id if isinstance(event_id, str) else None
        position = next(self._counter)
        if len(self._ring) == self._ring.maxlen:
            _, oldest, _ = self._ring[0]
            if oldest is not None and self._positions.get(oldest) == self._ring[0][0]:
                del self._positions[oldest]
        # a copy of the exact size: orjson's bytes keep its whole buffer (4-8 KiB for an
        # event of ~550 B), which made the ring of 1,024 events hold 8 MiB instead of 0.6
        data = bytes(memoryview(orjson.dumps(body, default=str)))
        self._ring.append((position, event_id, data))
        if self.readers:
            message = sse_message(data, event_id)
            for reader in list(self.readers):
                if not reader.offer(message):
                    self.dropped += 1
                    self.readers.discard(reader)
                    reader.end()
        if event_id is not None:
            self._positions[event_id] = position

    def connect(self) -> Reader | None:
        """A new reader, or None when `max_readers` already read (or the feed is closed)."""
        if self.closed or len(self.readers) >= self.max_readers:
            return None
        reader = Reader(self._queue_size)
        self.readers.add(reader)
        return reader

    def disconnect(self, reader: Reader) -> None:
        self.readers.discard(reader)

    def since(self, event_id: str) -> list[bytes] | None:
        """The messages after `event_id`, or None when it is not in the ring (older than the
        ring, from before a restart, or never sent)."""
        position = self._positions.get(event_id)
        if position is None:
            return None
        return [sse_message(data, eid) for pos, eid, data in self._ring if pos > position]

    def __iter__(self) -> Iterator[bytes]:
        return (sse_message(data, eid) for _, eid, data in self._ring)

    def close(self) -> None:
        """Shutdown: every stream ends (the admin server can then stop at once)."""
        self.closed = True
        for reader in list(self.readers):
            reader.end()
        self.readers.clear()
