"""Webhook deliveries in a process of their own: the polling process journals, this one posts.

An HTTP POST costs more CPU than a poll's whole share of the budget (aiohttp: 75-150 µs a
request, see docs/performance.md), so with a SQLite state file the outbox (`sinks.Outbox`,
unchanged) runs in a child process, `python -m enkwatch.delivery`, on a connection of its
own to the same file (WAL: its reads never wait; its few writes, a delete per round, wait
at most the busy timeout for the daemon's commit and the other way round). The daemon keeps
what decides which rows exist (the sinks' filters, the disabled marks) and journals the
rows in the event's own transaction as before; the child reads, sends, retries, deletes,
dead-letters and disables, exactly as the in-process outbox does. So every guarantee of the
outbox holds unchanged: the rows are the queue, the child is only who drains it.

They talk in JSON lines over the child's stdin (the daemon's orders) and a pipe on its
fd 1 (its reports; its own fd 1 then points at stderr so that nothing printed by accident
can pass for a report):

- daemon -> child: `start` (the state file, the sinks with their resolved secrets), `wake`
  (rows committed: by sink, the task keys, or everything; coalesced, at most every
  WAKE_EVERY_S), `sinks` (a reload), `idle` (wait until nothing is pending), `stop`;
- child -> daemon: `ready` (with the disabled sinks), `results` (delivery counts, for the
  metrics, at most every REPORT_EVERY_S), `dead` and `disabled` (the fields of the
  `sink.delivery_failed` and `sink.disabled` events, which the daemon writes), `reply`.

The child ignores SIGINT and SIGTERM (a terminal's Ctrl-C, a process group's TERM): the
daemon stops it once it stopped itself, and it exits on its own when its stdin closes (the
daemon killed). One that dies is started again after RESTART_BASE_S, doubling up to
RESTART_MAX_S (`enkwatch_delivery_process_restarts_total`); what it had not deleted is
delivered again (at least once). `:memory:` (no file to share), a PostgreSQL state (its
partitions and fencing live in the replica), a test's fake clock and sinks built by hand
keep the outbox in the daemon's process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO, Any, Final, Protocol

import orjson

from enkwatch.clock import Clock, SystemClock
from enkwatch.config import WebhookConfig
from enkwatch.errors import StateUnavailable
from enkwatch.formats import build_format
from enkwatch.sinks import Outbox, Sink, dead_letter_fields, disabled_fields
from enkwatch.state.base import OutboxRow, OutboxStore, StateError
from enkwatch.state.sqlite import SqliteStore

READY_WITHIN_S: Final = 30.0  # start-up waits this long for the child's first `ready`
ASK_WITHIN_S: Final = 30.0  # the longest wait for the answer to a reload
STOP_WITHIN_S: Final = 5.0  # then it is killed (a POST under way: its row goes again)
RESTART_BASE_S: Final = 1.0
RESTART_MAX_S: Final = 30.0
STABLE_S: Final = 60.0  # a child that ran this long starts its successor's backoff afresh
WAKE_EVERY_S: Final = 0.01
# more task keys than this waiting to be told: the child is told to look at everything
WAKE_KEYS_MAX: Final = 4096
# the child not reading (its pipe holds this much): wake-ups wait, coalesced, until it reads
WRITE_BUFFER_MAX: Final = 1 << 20
REPORT_EVERY_S: Final = 0.05
# the longest line either side reads (a reload's sinks with their templates: config-sized)
LINE_LIMIT: Final = 64 << 20

OnCount = Callable[[str, str, int], None]
OnFields = Callable[[Mapping[str, Any]], None]


class Deliveries(Protocol):
    """The outbox as the service uses it: in its process (`Outbox`) or in a child's."""

    sinks: list[Sink]
    disabled: set[str]  # the sinks a 410 disabled

    def sinks_for(self, event: Mapping[str, Any]) -> list[str]: ...
    def stats(self) -> tuple[int, float | None, int]: ...
    def notify(self, sinks: Iterable[str] | None = None, task_key: str | None = None) -> None: ...
    async def start(self) -> None: ...
    async def reconfigure(self, sinks: Sequence[Sink]) -> None: ...
    async def close(self) -> None: ...
    async def wait_idle(self, timeout_s: float) -> bool: ...


def open_deliveries(
    store: OutboxStore,
    state_path: str,
    sinks: Sequence[Sink],
    clock: Clock,
    on_count: OnCount,
    on_dead: OnFields,
    on_disabled: OnFields,
    on_restart: Callable[[], None],
    inline: bool = False,
    **outbox: Any,
) -> Deliveries:
    """A delivery process for a SQLite state file (see the module's docstring), otherwise
    (or `inline`: `sinks.delivery: inline`) the outbox in this process; `outbox` are further
    arguments of an in-process `Outbox`."""
    separate = (
        not inline
        and isinstance(store, SqliteStore)
        and state_path != ":memory:"
        and isinstance(clock, SystemClock)
        and all(s.hook is not None for s in sinks)
    )
    if separate:
        return DeliveryProcess(store, state_path, sinks, on_count, on_dead, on_disabled, on_restart)
    return Outbox(
        store, sinks, clock,
        on_result=lambda s, outcome: on_count(s.id, outcome, 1),
        on_dead=lambda s, row, err: on_dead(dead_letter_fields(s, row, err)),
        on_disabled=lambda s, code, n: on_disabled(disabled_fields(s, code, n)),
        **outbox,
    )  # fmt: skip


# -- the sinks on the wire (with their secrets: the pipe is the child's alone) ---------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sink_to_wire(sink: Sink) -> dict[str, Any]:
    """A sink as JSON, rebuilt by `sink_from_wire` (its format from its config)."""
    assert sink.hook is not None
    return {
        "hook": sink.hook.model_dump(mode="json"),
        "routing_key": sink.routing_key,
        "id": sink.id,
        "secret": _b64(sink.secret) if sink.secret is not None else None,
        "signing_keys": [_b64(k) for k in sink.signing_keys],
        "events": sorted(sink.events),
        "statuses": sorted(sink.statuses),
        "kinds": sorted(sink.kinds),
        "labels": [list(pair) for pair in sink.labels],
        "timeout_s": sink.timeout_s,
        "max_age_s": sink.max_age_s,
        "fingerprint": sink.fingerprint,
        "secret_texts": list(sink.secret_texts),
    }


def sink_from_wire(wire: Mapping[str, Any]) -> Sink:
    hook = WebhookConfig.model_validate(wire["hook"])
    return Sink(
        id=wire["id"],
        url=hook.url,
        secret=base64.b64decode(wire["secret"]) if wire["secret"] is not None else None,
        events=frozenset(wire["events"]),
        timeout_s=wire["timeout_s"],
        max_age_s=wire["max_age_s"],
        signing_keys=tuple(base64.b64decode(k) for k in wire["signing_keys"]),
        statuses=frozenset(wire["statuses"]),
        kinds=frozenset(wire["kinds"]),
        labels=tuple((k, v) for k, v in wire["labels"]),
        format=build_format(hook, wire["routing_key"]),
        fingerprint=wire["fingerprint"],
        secret_texts=tuple(wire["secret_texts"]),
        hook=hook,
        routing_key=wire["routing_key"],
    )


# -- the daemon's side ---------------------------------------------------------------------


class DeliveryProcess:
    """The outbox drained by a child process; the same interface as `Outbox`."""

    def __init__(
        self,
        store: OutboxStore,
        state_path: str,
        sinks: Sequence[Sink],
        on_count: OnCount,
        on_dead: OnFields,
        on_disabled: OnFields,
        on_restart: Callable[[], None],
    ) -> None:
        self.sinks = list(sinks)
        # the sinks disabled by a 410 (the child decides; told on `ready`, `disabled`, reloads)
        self.disabled: set[str] = set()
        self._store = store
        self._path = state_path
        self._on_count = on_count
        self._on_dead = on_dead
        self._on_disabled = on_disabled
        self._on_restart = on_restart
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._first: asyncio.Future[None] | None = None  # the first child ready, or gone
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        # wake-ups not sent yet: per sink the task keys (None: the whole sink), or everything
        self._wake: dict[str, set[str] | None] = {}
        self._wake_keys = 0
        self._wake_all = False
        self._wake_timer: asyncio.TimerHandle | None = None
        self._last_wake = float("-inf")
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._asked = 0
        self.restarts = 0

    def sinks_for(self, event: Mapping[str, Any]) -> list[str]:
        """The ids of the sinks that take this event."""
        return [s.id for s in self.sinks if s.id not in self.disabled and s.wants(event)]

    def stats(self) -> tuple[int, float | None, int]:
        """Pending deliveries, the age of the oldest, and how many sinks are disabled."""
        return (*self._store.outbox_stats(), len(self.disabled))

    @property
    def pid(self) -> int | None:
        """The child's process id while one runs (tests, the benchmark)."""
        return self._proc.pid if self._proc is not None else None

    def notify(self, sinks: Iterable[str] | None = None, task_key: str | None = None) -> None:
        """Rows were committed (or look again): told to the child soon, coalesced."""
        if sinks is None:
            self._wake_all = True
        elif not self._wake_all:
            wake = self._wake
            for sink_id in sinks:
                if task_key is None:
                    wake[sink_id] = None
                elif (keys := wake.setdefault(sink_id, set())) is not None:
                    keys.add(task_key)
                    self._wake_keys += 1
            if self._wake_keys > WAKE_KEYS_MAX:
                self._wake_all = True
        if self._wake_all:
            self._wake.clear()
            self._wake_keys = 0
        if self._wake_timer is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_wake + WAKE_EVERY_S - loop.time())
            self._wake_timer = loop.call_later(delay, self._send_wake)

    def _send_wake(self) -> None:
        self._wake_timer = None
        proc = self._proc
        if proc is None or not self._ready.is_set():
            return  # a child starting reads every sink's queue anyway
        assert proc.stdin is not None
        if proc.stdin.transport.get_write_buffer_size() > WRITE_BUFFER_MAX:
            self._wake_all = True  # it does not read: one wake-up for all once it does
            self._wake.clear()
            self._wake_keys = 0
            self._wake_timer = asyncio.get_running_loop().call_later(0.1, self._send_wake)
            return
        sinks = {s: None if keys is None else list(keys) for s, keys in self._wake.items()}
        self._send({"op": "wake", "all": self._wake_all, "sinks": sinks})
        self._wake.clear()
        self._wake_keys = 0
        self._wake_all = False
        self._last_wake = asyncio.get_running_loop().time()

    def _send(self, message: Mapping[str, Any]) -> None:
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.write(orjson.dumps(message) + b"\n")

    async def start(self) -> None:
        await self._load_disabled()
        if self.sinks:
            await self._spawn()

    async def _load_disabled(self) -> None:
        """The disabled sinks as the child will find them (it enables a changed one)."""
        try:
            marks = await self._store.disabled_sinks()
        except StateUnavailable:
            return
        self.disabled = {s.id for s in self.sinks if marks.get(s.id) == s.fingerprint}

    async def _spawn(self) -> None:
        """Start the supervisor; wait for the first child to be ready (or to have failed)."""
        self._first = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.ensure_future(self._supervise())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(READY_WITHIN_S):
                await asyncio.shield(self._first)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        delay = RESTART_BASE_S
        while not self._closing:
            began = loop.time()
            try:
                await self._run_child()
            except OSError as err:  # cannot start a process (no memory, no more pids)
                print(f"enkwatch: cannot start the delivery process: {err}", file=sys.stderr)
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            if self._closing:
                return
            self.restarts += 1
            self._on_restart()
            if loop.time() - began >= STABLE_S:
                delay = RESTART_BASE_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    async def _run_child(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "enkwatch.delivery",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=LINE_LIMIT,
        )  # fmt: skip
        self._proc = proc
        try:
            self._send({"op": "start", "state": self._path, "sinks": self._wire()})
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                self._report(orjson.loads(line))
        except (ValueError, KeyError, TypeError) as err:
            # a line over the limit, garbled, or a report without what it must hold: that
            # child is ended and another started, as if it had died
            print(f"enkwatch: the delivery process answered badly: {err!r}", file=sys.stderr)
        finally:
            self._proc = None
            self._ready.clear()
            for reply in self._replies.values():
                if not reply.done():
                    reply.set_result(None)
            self._replies.clear()
            await _end(proc, STOP_WITHIN_S)

    def _wire(self) -> list[dict[str, Any]]:
        return [sink_to_wire(s) for s in self.sinks]

    def _report(self, msg: Mapping[str, Any]) -> None:
        op = msg.get("op")
        if op == "results":
            for sink_id, outcome, count in msg["counts"]:
                self._on_count(sink_id, outcome, count)
        elif op == "dead":
            self._on_dead(msg["fields"])
        elif op == "disabled":
            self.disabled.add(msg["fields"]["sink"])
            self._on_disabled(msg["fields"])
        elif op == "ready":
            self.disabled = set(msg["disabled"])
            self._ready.set()
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
            # rows committed while it started, after it first read its queues
            self._wake_all = True
            self._send_wake()
        elif op == "reply":
            reply = self._replies.pop(msg["id"], None)
            if reply is not None and not reply.done():
                reply.set_result(msg["value"])

    async def _ask(self, op: str, **fields: Any) -> Any:
        """Send an order and wait for its reply (None: the child went away meanwhile)."""
        self._asked += 1
        reply = asyncio.get_running_loop().create_future()
        self._replies[self._asked] = reply
        self._send({"op": op, "id": self._asked, **fields})
        return await reply

    async def reconfigure(self, sinks: Sequence[Sink]) -> None:
        """A reload, applied by the child before this returns (to the rows not yet sent)."""
        old = {s.id: s for s in self.sinks}
        self.sinks = list(sinks)
        self.disabled = {
            s.id
            for s in self.sinks
            if s.id in self.disabled and old[s.id].fingerprint == s.fingerprint
        }
        if self._supervisor is None:
            if self.sinks:
                await self._spawn()
            return
        if self._proc is None:
            return  # between two children: the next one starts with these sinks
        # a child still starting reads this order right after its start
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ASK_WITHIN_S):
                disabled = await self._ask("sinks", sinks=self._wire())
                if disabled is not None:
                    self.disabled = set(disabled)

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no sink has a pending delivery (True) or the timeout passes (False)."""
        if not self.sinks:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._ready.wait()
                if self._wake_timer is not None:
                    self._wake_timer.cancel()
                    self._send_wake()
                return bool(await self._ask("idle", timeout_s=timeout_s))
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop the child: it ends its deliveries under way as the in-process outbox does
        (what went is deleted; a POST cut goes again), or is killed after STOP_WITHIN_S."""
        self._closing = True
        if self._wake_timer is not None:
            self._wake_timer.cancel()
            self._wake_timer = None
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        proc = self._proc
        if proc is None:
            supervisor.cancel()  # waiting to start the next child
        else:
            self._send({"op": "stop"})
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            async with asyncio.timeout(STOP_WITHIN_S):
                await asyncio.shield(supervisor)
        except TimeoutError:
            if proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor


async def _end(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """Wait `grace_s` for the child to exit, then kill it."""
    if proc.stdin is not None:
        proc.stdin.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace_s):
            await proc.wait()
            return
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


# -- the child's side ----------------------------------------------------------------------


class _Child:
    """The delivery process: the orders in, the outbox's results out."""

    def __init__(self, out: asyncio.WriteTransport, store: OutboxStore) -> None:
        self._out = out
        self._store = store
        self._counts: Counter[tuple[str, str]] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        self.outbox: Outbox | None = None
        self._jobs: set[asyncio.Future[Any]] = set()

    def send(self, message: Mapping[str, Any]) -> None:
        self.flush()  # counts first: a reply or an event never overtakes them
        self._write(message)

    def _write(self, message: Mapping[str, Any]) -> None:
        self._out.write(orjson.dumps(message) + b"\n")

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counts:
            counts = [[s, o, n] for (s, o), n in self._counts.items()]
            self._counts.clear()
            self._write({"op": "results", "counts": counts})

    def count(self, sink: Sink, outcome: str) -> None:
        self._counts[sink.id, outcome] += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(REPORT_EVERY_S, self.flush)

    def dead(self, sink: Sink, row: OutboxRow, error: str) -> None:
        self.send({"op": "dead", "fields": dead_letter_fields(sink, row, error)})

    def gone(self, sink: Sink, status: int, dropped: int) -> None:
        self.send({"op": "disabled", "fields": disabled_fields(sink, status, dropped)})

    async def handle(self, msg: Mapping[str, Any]) -> None:
        outbox = self.outbox
        assert outbox is not None
        op = msg["op"]
        if op == "wake":
            if msg["all"]:
                outbox.notify()
            for sink_id, keys in msg["sinks"].items():
                if sink_id in outbox.disabled:
                    self._drop(outbox, sink_id)
                    continue
                if keys is None:
                    outbox.notify((sink_id,))
                else:
                    for key in keys:
                        outbox.notify((sink_id,), key)
        elif op == "sinks":
            await outbox.reconfigure([sink_from_wire(w) for w in msg["sinks"]])
            self.send({"op": "reply", "id": msg["id"], "value": sorted(outbox.disabled)})
        elif op == "idle":
            job = asyncio.ensure_future(self._idle(outbox, msg["id"], msg["timeout_s"]))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

    def _drop(self, outbox: Outbox, sink_id: str) -> None:
        """Rows the daemon queued for a sink before it heard that a 410 disabled it: dropped
        as those of the 410 were (else they would wait until its config changes)."""
        sink = next((s for s in outbox.sinks if s.id == sink_id), None)
        if sink is not None:
            job = asyncio.ensure_future(self._store.disable_sink(sink_id, sink.fingerprint))
            self._jobs.add(job)
            job.add_done_callback(self._jobs.discard)

    async def _idle(self, outbox: Outbox, ask: int, timeout_s: float) -> None:
        ok = await outbox.wait_idle(timeout_s)
        self.send({"op": "reply", "id": ask, "value": ok})


async def serve(orders: IO[bytes], reports: IO[bytes]) -> int:
    """The delivery process: drain the outbox until told to stop or the orders end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), orders)
    out, written = await loop.connect_write_pipe(_Drained, reports)
    first = await reader.readline()
    if not first:
        return 0  # the daemon went before it said anything
    start = orjson.loads(first)
    try:
        store = SqliteStore(start["state"], outbox_only=True)
    except StateError as err:
        print(f"enkwatch delivery process: {err}", file=sys.stderr)
        return 1
    child = _Child(out, store)
    outbox = Outbox(
        store, [sink_from_wire(w) for w in start["sinks"]], SystemClock(),
        on_result=child.count, on_dead=child.dead, on_disabled=child.gone,
    )  # fmt: skip
    child.outbox = outbox
    try:
        await outbox.start()
        child.send({"op": "ready", "disabled": sorted(outbox.disabled)})
        while line := await reader.readline():
            msg = orjson.loads(line)
            if msg["op"] == "stop":
                break
            await child.handle(msg)
    finally:
        await outbox.close()
        child.flush()
        await store.close()
        out.close()
        with contextlib.suppress(TimeoutError):  # the last reports reach the pipe
            async with asyncio.timeout(STOP_WITHIN_S):
                await written.closed
    return 0


class _Drained(asyncio.Protocol):
    """The reports' pipe: `closed` once it was closed and what was written went."""

    def __init__(self) -> None:
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def main() -> int:
    # fd 1 carries the reports: kept for them, and pointed at stderr for anything else
    reports = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return asyncio.run(serve(sys.stdin.buffer, reports))


if __name__ == "__main__":
    sys.exit(main())
