"""Event lines to stdout from a thread of their own: the event loop never waits on a reader.

A reader that stops reading (a stalled log shipper, a full pipe) used to freeze the whole
daemon inside `write()`: no polls, no `/healthz`, no SIGTERM. Here the loop only appends
to a queue and a writer thread does the blocking writes, reporting each line written back
to the loop (an event is confirmed in the journal only then, so a line that never reached
the reader is written again after a restart). The queue is bounded in bytes: past the
bound, `write` waits (the poll that made the event waits, and admission control keeps the
number of such polls at `max_concurrency`), so memory stays flat however long the stall.
The stall is visible (`stalled_s`), and shutdown never waits for the reader longer than
it is told to.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol

from enkwatch.clock import Clock, SystemClock

# lines queued for the reader at most (then writers wait); resume below half of it
MAX_QUEUED_BYTES: Final = 4 * 1024 * 1024
# one write() call carries at most this much (lines joined)
WRITE_CHUNK_BYTES: Final = 256 * 1024
# lines that may not wait (daemon events, a shutdown's) are dropped past this many bytes
HARD_MAX_FACTOR: Final = 2

Written = Callable[[], None]


class StdoutUnusable(Exception):
    """stdout is closed or cannot be written (EPIPE, EBADF, ENOSPC, EIO ...)."""

    def __init__(self, err: OSError) -> None:
        name = errno.errorcode.get(err.errno or 0, "error")
        super().__init__(f"stdout cannot be written: {err.strerror or err} ({name})")
        self.errno = err.errno


class Lines(Protocol):
    """Where event lines go: the writer thread (LineWriter) or a plain stream (DirectLines)."""

    dropped: int

    @property
    def queued_bytes(self) -> int: ...

    def stalled_s(self) -> float: ...

    def has_room(self) -> bool: ...

    async def wait_for_room(self) -> None: ...

    def write_nowait(self, line: bytes, written: Written | None = None) -> None: ...

    def release(self) -> None: ...

    async def close(self, timeout_s: float) -> bool: ...


class _ByteStream(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class DirectLines:
    """Lines written at once to a stream (the commands that only print, tests): blocking."""

    dropped = 0
    queued_bytes = 0

    def __init__(self, stream: _ByteStream) -> None:
        self._stream = stream

    def stalled_s(self) -> float:
        return 0.0

    def has_room(self) -> bool:
        return True

    async def wait_for_room(self) -> None:
        return None

    def write_nowait(self, line: bytes, written: Written | None = None) -> None:
        try:
            self._stream.write(line)
            self._stream.flush()
        except OSError as err:
            raise StdoutUnusable(err) from None
        if written is not None:
            written()

    def release(self) -> None:
        return None

    async def close(self, timeout_s: float) -> bool:
        return True


class LineWriter:
    """Writes lines to a file descriptor from a daemon thread; bounded, never blocking the loop."""

    def __init__(
        self,
        fd: int,
        *,
        on_unusable: Callable[[StdoutUnusable], None] = lambda err: None,
        clock: Clock | None = None,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self._fd = fd
        self._on_unusable = on_unusable
        self._clock = clock or SystemClock()
        self._max = max_queued_bytes
        self._lock = threading.Condition()
        self._queue: deque[tuple[bytes, Written | None]] = deque()
        # lines of this turn of the loop, handed to the thread together at its end (one
        # wake-up, one write() and one report for all the events of a group commit)
        self._pending: list[tuple[bytes, Written | None]] = []
        self._handing_over = False
        self._queued = 0
        self._hard_max = max_queued_bytes * HARD_MAX_FACTOR
        # bytes handed over and not yet written (also those the thread is writing now)
        self._unwritten = 0
        self._closing = False
        self._released = False
        self._confirming = True
        self.dropped = 0
        # CPU time of the writer thread (the benchmark adds it to the event path)
        self.thread_cpu_s = 0.0
        self.unusable: StdoutUnusable | None = None
        # monotonic time of the last progress while lines wait for the reader (None: idle)
        self._waiting_since: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    # -- the loop's side ------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (in the running loop, which receives its reports)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="enkwatch-stdout", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        return self._queued

    def stalled_s(self) -> float:
        """How long lines have waited with no write getting through (0 when nothing waits)."""
        since = self._waiting_since
        return 0.0 if since is None else max(0.0, self._clock.monotonic() - since)

    def has_room(self) -> bool:
        return self._queued < self._max or self._released or self.unusable is not None

    async def wait_for_room(self) -> None:
        """Wait while the queue is full (the reader is slow or stalled)."""
        while not self.has_room():
            self._room.clear()
            await self._room.wait()

    async def write(self, line: bytes, written: Written | None = None) -> None:
        """Queue one line (with its newline); wait first while the queue is full.

        `written` is called in the loop once the line is in the reader's hands. Raises
        StdoutUnusable once stdout has failed.
        """
        await self.wait_for_room()
        self.write_nowait(line, written)

    def release(self) -> None:
        """Shutdown: writers stop waiting for room (their few lines are queued beyond it)."""
        self._released = True
        self._room.set()

    def write_nowait(self, line: bytes, written: Written | None = None) -> None:
        """Queue one line without waiting (daemon events, a shutdown's lines).

        Past twice the bound the line is dropped and counted in `dropped` (its event, if
        journaled, stays unconfirmed and is written again after a restart).
        """
        if self.unusable is not None:
            raise self.unusable
        if self._queued >= self._hard_max:
            self.dropped += 1
            return
        self._pending.append((line, written))
        self._queued += len(line)
        self._idle.clear()
        if not self._handing_over:
            loop = self._loop
            if loop is None or loop.is_closed():
                self._hand_over()  # not started: queued at once
            else:
                self._handing_over = True
                loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """At the end of the turn: this turn's lines to the thread, with one wake-up."""
        self._handing_over = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        size = sum(len(line) for line, _ in pending)
        with self._lock:
            if self._unwritten == 0:
                self._waiting_since = self._clock.monotonic()
            self._unwritten += size
            self._queue.extend(pending)
            self._lock.notify()

    async def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every queued line to be written; True if they were."""
        if self._thread is None or self.unusable is not None:
            return self._queued == 0
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float) -> bool:
        """Flush for up to `timeout_s`, then stop the thread (a blocked write is left behind:
        the thread is a daemon thread, and the lines it holds are unconfirmed)."""
        flushed = await self.flush(timeout_s)
        self._confirming = False  # the journal closes next: later writes stay unconfirmed
        self._hand_over()  # lines of this very turn are written too (unconfirmed)
        with self._lock:
            self._closing = True
            self._lock.notify()
        return flushed

    # -- reports from the thread, run in the loop ------------------------------------------

    def _report(self, callbacks: list[Written], size: int) -> None:
        if self._confirming:
            for done in callbacks:
                done()
        self._queued -= size
        if self._queued < self._max // 2:
            self._room.set()
        if self._queued == 0:
            self._idle.set()

    def _report_unusable(self, err: StdoutUnusable) -> None:
        self.unusable = err
        self._room.set()  # writers waiting for room get the error instead
        self._idle.set()
        self._on_unusable(err)

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                batch: list[bytes] = []
                callbacks: list[Written] = []
                size = 0
                while self._queue and size < WRITE_CHUNK_BYTES:
                    line, done = self._queue.popleft()
                    batch.append(line)
                    size += len(line)
                    if done is not None:
                        callbacks.append(done)
            cpu = time.thread_time()
            try:
                self._write_all(b"".join(batch))
            except OSError as err:
                self._call(self._report_unusable, StdoutUnusable(err))
                return
            with self._lock:
                self._unwritten -= size
                self._waiting_since = self._clock.monotonic() if self._unwritten else None
            self.thread_cpu_s += time.thread_time() - cpu
            self._call(self._report, callbacks, size)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def _call(self, fn: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            return  # the loop closed meanwhile: the process is exiting


__all__ = ["MAX_QUEUED_BYTES", "DirectLines", "LineWriter", "Lines", "StdoutUnusable"]
