"""A minimal Enkrypt API for the benchmark: the spec's ~1 KB body for ANY task id.

Run as `python -m bench.server [--flip-every K]`; it prints `PORT <n>` once listening and
serves until SIGTERM (or until its parent is gone). Every task is Running, so a watcher
emits one transition per task, ever; between SIGUSR1 and SIGUSR2 (the event-cost run),
every K-th answer flips the status of the task it is about (Running <-> Queued), so one
poll in K is a transition, whatever the number of tasks.

With `--receiver` it is a webhook receiver instead: every POST (of any path) is read and
answered 204, as a receiver that accepts everything would (the sinks benchmark).

It is a bare asyncio protocol speaking just enough HTTP/1.1 keep-alive, not an aiohttp
app: a request costs it a fraction of what it costs the client, so on a 2-core machine
the client under test, not the server, is what saturates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from typing import Final

_DESCRIPTION: Final = (
    "A customer-support assistant for a regional bank that answers questions about "
    "accounts, cards and loans, and refuses to give investment advice or to reveal "
    "another customer's data. "
)
_POLICY: Final = (
    "The assistant must not disclose personal data, must not provide financial advice, "
    "and must escalate fraud reports to a human agent. "
)
_HEAD: Final = b'{"data":{"dataset_name":"'
_MIDDLE: Final = (
    b'","created_at":"2025-02-28T11:07:36.872803+00:00",'
    b'"started_at":"2025-02-28T11:07:37.853691+00:00","status":"'
)
_TAIL: Final = (
    b'","system_description":"'
    + (_DESCRIPTION * 2).encode()
    + b'","scenarios":2,"categories":3,"depth":2,"policy_description":"'
    + _POLICY.encode()
    + b'","info_pdf_url":"https://example.com/brief.pdf",'
    b'"tools":[{"name":"search","description":"Searches the knowledge base"},'
    b'{"name":"ticket","description":"Opens a support ticket"}],"task_id":"'
)
_END: Final = b'"}}'
_TASK_HEADER: Final = b"\r\nx-enkrypt-task-id:"
_DATASET_HEADER: Final = b"\r\nx-enkrypt-dataset:"
RUNNING: Final = b"Running"
QUEUED: Final = b"Queued"


def body(task_id: bytes, dataset: bytes, status: bytes) -> bytes:
    """The 200 body for one task (about 1 KB, like the spec's example)."""
    return b"".join((_HEAD, dataset, _MIDDLE, status, _TAIL, task_id, _END))


def _header(head: bytes, lowered: bytes, name: bytes) -> bytes | None:
    at = lowered.find(name)
    if at < 0:
        return None
    start = at + len(name)
    end = head.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


class Flipper:
    """Which status each task has; while on, every K-th answer flips its task's status."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.on = False
        self._answers = 0
        self._queued: set[bytes] = set()

    def status(self, task_id: bytes) -> bytes:
        if self.on:
            self._answers += 1
            if self._answers % self.every == 0:
                self._queued.symmetric_difference_update((task_id,))
        return QUEUED if task_id in self._queued else RUNNING


class _Http(asyncio.Protocol):
    """Answers each GET of a keep-alive connection with the task's body."""

    def __init__(self, flipper: Flipper) -> None:
        self._flipper = flipper
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        replies = []
        # requests carry no body: each ends at its blank line
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head, buffer = buffer[:end], buffer[end + 4 :]
            replies.append(self._reply(head))
        self._buffer = buffer
        if replies and self._transport is not None:
            self._transport.write(b"".join(replies))

    def _reply(self, head: bytes) -> bytes:
        lowered = head.lower()
        task_id = _header(head, lowered, _TASK_HEADER) or b"data-generation-0"
        dataset = _header(head, lowered, _DATASET_HEADER) or b"Election2"
        payload = body(task_id, dataset, self._flipper.status(task_id))
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
        )


class _Receiver(asyncio.Protocol):
    """Reads each POST of a keep-alive connection (its Content-Length body) and answers 204."""

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data
        answers = 0
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head = buffer[:end]
            length = int(_header(head, head.lower(), b"\r\ncontent-length:") or b"0")
            if len(buffer) < end + 4 + length:
                break  # the body is still on its way
            buffer = buffer[end + 4 + length :]
            answers += 1
        self._buffer = buffer
        if answers and self._transport is not None:
            self._transport.write(b"HTTP/1.1 204 No Content\r\n\r\n" * answers)


async def _until_orphaned(parent: int, stop: asyncio.Event) -> None:
    # the benchmark dying without SIGTERM must not leave a server behind
    while os.getppid() == parent:  # noqa: ASYNC110 (no event to wait on: a poll)
        await asyncio.sleep(1.0)
    stop.set()


async def serve(port: int, flip_every: int, receiver: bool = False) -> None:
    """Serve until SIGTERM; print `PORT <n>` once listening."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    flipper = Flipper(flip_every)
    loop.add_signal_handler(signal.SIGUSR1, setattr, flipper, "on", True)
    loop.add_signal_handler(signal.SIGUSR2, setattr, flipper, "on", False)
    factory = _Receiver if receiver else (lambda: _Http(flipper))
    server = await loop.create_server(factory, "127.0.0.1", port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    watchdog = asyncio.create_task(_until_orphaned(os.getppid(), stop))
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--flip-every", type=int, default=10)
    parser.add_argument("--receiver", action="store_true", help="a webhook receiver (204)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.flip_every, args.receiver))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
