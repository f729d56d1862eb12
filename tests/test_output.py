"""The stdout writer: lines reach the reader in order, a stalled reader never blocks the loop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

import pytest

from enkwatch.clock import FakeClock
from enkwatch.output import LineWriter, StdoutUnusable
from tests.kit import WAIT_S, until


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def read_available(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_lines_arrive_in_order_and_each_is_confirmed_once_written(
    pipe: tuple[int, int],
) -> None:
    read_fd, write_fd = pipe
    writer = LineWriter(write_fd)
    writer.start()
    confirmed: list[int] = []
    for i in range(100):
        await writer.write(b"line %d\n" % i, lambda i=i: confirmed.append(i))
    assert await writer.flush(WAIT_S)
    assert confirmed == list(range(100))
    assert read_available(read_fd) == b"".join(b"line %d\n" % i for i in range(100))
    assert writer.queued_bytes == 0
    assert writer.stalled_s() == 0.0
    assert await writer.close(WAIT_S)


async def test_a_reader_that_stops_reading_never_blocks_the_loop(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    clock = FakeClock()
    size = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    writer = LineWriter(write_fd, clock=clock, max_queued_bytes=4096)
    writer.start()
    line = b"x" * 1023 + b"\n"
    confirmed = 0

    def done() -> None:
        nonlocal confirmed
        confirmed += 1

    # fill the pipe and the queue: the writer then waits, the loop does not
    count = (size + 64 * 1024) // 1024
    writes = asyncio.ensure_future(_write_many(writer, line, count, done))
    await until(lambda: writer.queued_bytes >= 4096, "the queue filled")
    clock.advance(42.0)
    assert writer.stalled_s() >= 42.0
    assert not writes.done(), "the writes got through a pipe nobody reads"
    assert writer.queued_bytes <= 4096 + len(line)  # bounded, however many lines come
    # the reader comes back: everything arrives, in order, and the stall ends
    received = b""
    async with asyncio.timeout(WAIT_S):
        while not writes.done():
            received += read_available(read_fd)
            await asyncio.sleep(0.01)
        assert await writer.flush(WAIT_S)
    received += read_available(read_fd)
    assert received == line * count
    assert confirmed == count
    assert writer.stalled_s() == 0.0
    await writer.close(WAIT_S)


async def _write_many(writer: LineWriter, line: bytes, count: int, done: object) -> None:
    for _ in range(count):
        await writer.write(line, done)  # type: ignore[arg-type]


async def test_close_gives_up_on_a_stalled_reader_within_its_timeout(
    pipe: tuple[int, int],
) -> None:
    _, write_fd = pipe
    size = fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ)
    writer = LineWriter(write_fd)
    writer.start()
    confirmed: list[int] = []
    for i in range(size // 1000 + 10):
        writer.write_nowait(b"y" * 999 + b"\n", lambda i=i: confirmed.append(i))
    assert not await writer.close(0.2)  # the reader never comes: not flushed, not stuck
    assert len(confirmed) < size // 1000 + 10  # what did not reach the reader is unconfirmed


async def test_a_closed_reader_makes_stdout_unusable(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    os.close(read_fd)
    failed = asyncio.Event()
    errors: list[StdoutUnusable] = []

    def unusable(err: StdoutUnusable) -> None:
        errors.append(err)
        failed.set()

    writer = LineWriter(write_fd, on_unusable=unusable)
    writer.start()
    confirmed: list[int] = []
    await writer.write(b"lost\n", lambda: confirmed.append(1))
    await asyncio.wait_for(failed.wait(), WAIT_S)
    assert errors[0].errno == errno.EPIPE
    assert "stdout cannot be written" in str(errors[0])
    assert confirmed == []
    with pytest.raises(StdoutUnusable):
        await writer.write(b"more\n")
