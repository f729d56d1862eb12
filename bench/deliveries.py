"""CPU per webhook delivery: `python -m bench.deliveries [--events N] [--profile] [--floor]`.

The real delivery code (`enkwatch.sinks.Outbox` on a real `SqliteStore` file) drains the
three sinks of the benchmark (json with a Standard Webhooks secret, cloudevents, slack) to
the bare receiver of `bench.server --receiver` (a second process answering 204). Events are
journaled as the service journals them (`record_event`, group commit), at a steady pace
(`--rate`, 1,000 a second, every event to the three sinks); the figure is this process's
CPU with the outbox draining minus the CPU of the same feeding without it, per delivery.

- `--profile`: the same run under cProfile, its time split by phase (selecting the rows,
  rendering, signing and headers, the aiohttp POST and reading the answer, deleting the
  row, metrics, waking); shares of the profile, scaled to the CPU measured without it.
- `--floor`: the CPU of a bare aiohttp POST of the same bodies, with the same headers and
  session settings, as many at once, to the same receiver: what no change to enkwatch's
  own code can go below in this process while it posts with aiohttp; and the CPU of the
  same POSTs written by a bare asyncio protocol (no HTTP library, plain HTTP only): the
  floor of any client in an asyncio process.

Measured in CPU (`time.process_time`), which load on the machine disturbs less than wall
time; say under what load (`uptime`) a figure was taken.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from bench.measure import task_id
from bench.run import Server
from bench.worker import SINK_SECRET, sinks_document
from enkwatch import __version__
from enkwatch.clock import SystemClock
from enkwatch.config import SinksConfig
from enkwatch.delivery import DeliveryProcess
from enkwatch.formats import message_id
from enkwatch.sinks import MAX_ANSWER_READ_BYTES, MAX_PARALLEL_PER_SINK, Outbox, Sink, build_sinks
from enkwatch.state.base import TaskRecord
from enkwatch.state.sqlite import SqliteStore

# the feeder journals a batch of events this often (group commit per batch)
TICK_S = float(os.environ.get("BENCH_TICK_S", "0.005"))

# phase: the functions (file fragment, name) whose cumulative profile time it is
PHASES: dict[str, tuple[tuple[str, str], ...]] = {
    "select rows": (("state/sqlite.py", "pending_deliveries"), ("state/sqlite.py", "outbox_heads")),
    "render": (
        ("formats.py", "render"),
        ("formats.py", "message_id"),
        ("~", "<built-in method orjson.loads>"),
    ),
    "sign + headers": (("sinks.py", "_headers"), ("sinks.py", "headers")),
    "aiohttp POST + answer": (
        ("aiohttp/client.py", "_request"),
        ("aiohttp/client.py", "__aexit__"),
        ("bodies.py", "read_prefix"),
    ),
    "delete rows": (("state/sqlite.py", "delivery_done"), ("state/sqlite.py", "deliveries_done")),
    "metrics": (("bench/deliveries.py", "<lambda>"),),
    "feeding (journal + outbox rows, not delivery)": (
        ("bench/deliveries.py", "feed"),
        ("state/sqlite.py", "_flush_batch"),
    ),
}


def _event(key: str, seq: int) -> dict[str, Any]:
    """A transition event shaped as the service writes one."""
    return {
        "timestamp": "2026-11-28T15:12:24.142414Z",
        "level": "info",
        "event": "task.transition",
        "task_id": key,
        "dataset": "FinanceQA",
        "kind": "dataset",
        "task_key": key,
        "seq": seq,
        "event_id": f"{key}:{seq}",
        "labels": {"team": "finance"},
        "previous_status": "Queued" if seq % 2 else "Running",
        "status": "Running" if seq % 2 else "Queued",
        "terminal": False,
        "polls": seq,
        "created_at": "2026-11-28T15:12:19.267300+00:00",
        "started_at": "2026-11-28T15:12:20.267300+00:00",
        "watched_seconds": 4.928,
    }


def _sinks(port: int) -> list[Sink]:
    doc = sinks_document(port)
    return build_sinks(SinksConfig.model_validate(doc), {"BENCH_SINK_SECRET": SINK_SECRET})


class Feeder:
    """Journals `rate` events a second over `tasks` tasks, each to every sink."""

    def __init__(self, store: SqliteStore, sink_ids: Sequence[str], tasks: int) -> None:
        self._store = store
        self._sink_ids = list(sink_ids)
        self.records = [TaskRecord(task_id(i), task_id(i), "FinanceQA", 0.0) for i in range(tasks)]
        self._next = 0

    async def setup(self) -> None:
        await self._store.add_tasks(self.records)

    async def feed(self, events: int, rate: float, notify: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        per_tick = max(1, round(rate * TICK_S))
        began = loop.time()
        sent = 0
        while sent < events:
            batch = []
            for _ in range(min(per_tick, events - sent)):
                rec = self.records[self._next % len(self.records)]
                self._next += 1
                rec.seq += 1
                batch.append(
                    self._store.record_event(rec, _event(rec.task_key, rec.seq), self._sink_ids)
                )
            await asyncio.gather(*batch)
            notify()
            sent += len(batch)
            await asyncio.sleep(max(0.0, began + sent / rate - loop.time()))

    async def overlapping(self, events: int, rate: float, notify: Callable[[], None]) -> None:
        """As `feed`, but as polls journal: each event on its own, not waiting for the ones
        before (they share the commit window's transactions, ~50 events at 1,000 a second)."""
        loop = asyncio.get_running_loop()
        per_tick = max(1, round(rate * TICK_S))
        began = loop.time()
        jobs: list[asyncio.Future[None]] = []

        async def one(rec: TaskRecord, seq: int) -> None:
            await self._store.record_event(rec, _event(rec.task_key, seq), self._sink_ids)
            notify()

        while len(jobs) < events:
            for _ in range(min(per_tick, events - len(jobs))):
                rec = self.records[self._next % len(self.records)]
                self._next += 1
                rec.seq += 1
                jobs.append(asyncio.ensure_future(one(rec, rec.seq)))
            await asyncio.sleep(max(0.0, began + len(jobs) / rate - loop.time()))
        await asyncio.gather(*jobs)


async def _drained(outbox: Outbox, store: SqliteStore, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while store.outbox_stats()[0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the outbox did not drain within {timeout_s:.0f} s")
        outbox.notify()
        await asyncio.sleep(0.01)


async def measure(
    port: int, events: int, rate: float, profile: cProfile.Profile | None
) -> dict[str, Any]:
    """CPU per delivery of the real outbox: feeding with it draining, minus feeding alone."""
    sinks = _sinks(port)
    with tempfile.TemporaryDirectory(prefix="enkwatch-deliveries-") as tmp:
        # feeding alone (the journal, the outbox rows): what the service pays without delivery
        store = SqliteStore(str(Path(tmp) / "alone.db"), SystemClock())
        feeder = Feeder(store, [s.id for s in sinks], min(events, 1000))
        await feeder.setup()
        cpu0 = time.process_time()
        await feeder.feed(events, rate, lambda: None)
        feed_cpu = time.process_time() - cpu0
        await store.close()

        store = SqliteStore(str(Path(tmp) / "deliver.db"), SystemClock())
        feeder = Feeder(store, [s.id for s in sinks], min(events, 1000))
        await feeder.setup()
        registry = CollectorRegistry()
        counter = Counter("deliveries", "", ["sink", "outcome"], registry=registry)
        outbox = Outbox(
            store, sinks, SystemClock(), on_result=lambda s, o: counter.labels(s.id, o).inc()
        )
        await outbox.start()
        # warm up: connections open, code paths taken
        await feeder.feed(50, rate, outbox.notify)
        await _drained(outbox, store, 30)
        wall0, cpu0 = time.monotonic(), time.process_time()
        if profile is not None:
            profile.enable()
        await feeder.feed(events, rate, outbox.notify)
        await _drained(outbox, store, 60)
        if profile is not None:
            profile.disable()
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        await outbox.close()
        delivered = sum(
            registry.get_sample_value("deliveries_total", {"sink": s.id, "outcome": "delivered"})
            or 0.0
            for s in sinks
        )
        await store.close()
    deliveries = events * len(sinks)
    if delivered < deliveries:
        raise RuntimeError(f"only {delivered:.0f} of {deliveries} deliveries were made")
    return {
        "events": events,
        "deliveries": deliveries,
        "wall_s": wall,
        "cpu_s": cpu,
        "feed_cpu_s": feed_cpu,
        "cpu_per_delivery_us": (cpu - feed_cpu) / deliveries * 1e6,
        "feed_cpu_per_event_us": feed_cpu / events * 1e6,
    }


async def daemon_side(port: int, events: int, rate: float) -> dict[str, Any]:
    """The daemon's CPU per event for its deliveries when a delivery process makes them
    (`enkwatch.delivery`): feeding with the process draining, minus feeding without sinks;
    and, between them, feeding the rows with nobody draining (what the rows alone cost).
    The three are fed in turns, twice each, and the best of each kept (load moves them)."""
    sinks = _sinks(port)
    ids = [s.id for s in sinks]
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="enkwatch-deliveries-") as tmp:
        for turn in range(2):
            for label in ("no sinks", "rows only", "delivery process"):
                store = SqliteStore(str(Path(tmp) / f"{label}-{turn}.db"), SystemClock())
                feeder = Feeder(store, ids if label != "no sinks" else [], min(events, 1000))
                await feeder.setup()
                process = None
                notify: Callable[[], None] = lambda: None  # noqa: E731
                if label == "delivery process":
                    process = DeliveryProcess(
                        store, store.path, sinks, lambda *a: None, lambda f: None,
                        lambda f: None, lambda: None,
                    )  # fmt: skip
                    await process.start()
                    notify = process.notify
                await feeder.overlapping(50, rate, notify)  # warm up
                cpu0 = time.process_time()
                await feeder.overlapping(events, rate, notify)
                cpu = time.process_time() - cpu0
                if process is not None:
                    if not await process.wait_idle(60):
                        raise RuntimeError("the delivery process did not drain the outbox")
                    await process.close()
                await store.close()
                per_event = cpu / events * 1e6
                best[label] = min(best.get(label, per_event), per_event)
    return {
        "cpu_per_event_us": {k: round(v, 1) for k, v in best.items()},
        "rows_us_per_event": round(best["rows only"] - best["no sinks"], 1),
        "daemon_us_per_event": round(best["delivery process"] - best["no sinks"], 1),
    }


async def _paced(n: int, rate: float, one: Callable[[int], Awaitable[None]]) -> None:
    """`one(i)` for i < n, started at `rate` a second in ticks of TICK_S (as the outbox is
    fed), and waited for."""
    loop = asyncio.get_running_loop()
    per_tick = max(1, round(rate * TICK_S))
    began = loop.time()
    jobs = []
    while len(jobs) < n:
        for _ in range(min(per_tick, n - len(jobs))):
            jobs.append(asyncio.ensure_future(one(len(jobs))))
        await asyncio.sleep(max(0.0, began + len(jobs) / rate - loop.time()))
    await asyncio.gather(*jobs)


async def floor(port: int, events: int, rate: float) -> dict[str, Any]:
    """CPU per bare aiohttp POST of the same bodies and headers, at the same pace (the rate
    of events, times the sinks), on a session set up as the outbox's."""
    sinks = _sinks(port)
    bodies = []
    for sink in sinks:
        event = _event(task_id(1), 1)
        raw = json.dumps(event, separators=(",", ":")).encode()
        mid = message_id(event, raw)
        payload = sink.format.render(event, raw, mid)
        headers = {
            "Content-Type": payload.content_type,
            "Idempotency-Key": mid,
            "webhook-id": mid,
            "webhook-timestamp": str(int(time.time())),
            "webhook-signature": "v1," + "A" * 44,
        }
        bodies.append((sink.url, payload.body, headers))
    session = aiohttp.ClientSession(
        headers={"User-Agent": f"enkwatch/{__version__}"},
        cookie_jar=aiohttp.DummyCookieJar(),
        connector=aiohttp.TCPConnector(limit=0),
    )
    timeout = aiohttp.ClientTimeout(total=10.0)
    sem = asyncio.Semaphore(MAX_PARALLEL_PER_SINK * len(sinks))

    async def post(url: str, body: bytes, headers: dict[str, str]) -> None:
        async with (
            sem,
            session.post(
                url, data=body, headers=headers, allow_redirects=False, timeout=timeout
            ) as resp,
        ):
            await resp.content.read(MAX_ANSWER_READ_BYTES)
            assert 200 <= resp.status < 300, resp.status

    async def one(i: int) -> None:
        await post(*bodies[i % len(bodies)])

    try:
        await _paced(100, rate * len(sinks), one)
        cpu0 = time.process_time()
        n = events * len(sinks)
        await _paced(n, rate * len(sinks), one)
        cpu = time.process_time() - cpu0
    finally:
        await session.close()
    return {"posts": n, "cpu_s": cpu, "cpu_per_post_us": cpu / n * 1e6}


class _RawClient(asyncio.Protocol):
    """One keep-alive connection writing pre-built POSTs, one at a time, and reading each
    answer's status line and headers: an HTTP client with nothing but what a 204 needs."""

    def __init__(self) -> None:
        self._buffer = b""
        self._waiter: asyncio.Future[int] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end >= 0 and self._waiter is not None and not self._waiter.done():
            status = int(self._buffer[9:12])
            self._buffer = self._buffer[end + 4 :]  # a 204 has no body
            self._waiter.set_result(status)

    async def post(self, request: bytes) -> int:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await self._waiter


async def raw_floor(port: int, events: int, rate: float) -> dict[str, Any]:
    """CPU per POST of the same bodies and headers through a bare asyncio protocol (no HTTP
    library): what the event loop and the kernel cost, the floor of any in-process client."""
    sinks = _sinks(port)
    loop = asyncio.get_running_loop()
    requests = []
    for sink in sinks:
        event = _event(task_id(1), 1)
        raw = json.dumps(event, separators=(",", ":")).encode()
        mid = message_id(event, raw)
        payload = sink.format.render(event, raw, mid)
        head = (
            f"POST /hook/{sink.id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"User-Agent: enkwatch/{__version__}\r\nContent-Type: {payload.content_type}\r\n"
            f"Idempotency-Key: {mid}\r\nwebhook-id: {mid}\r\n"
            f"webhook-timestamp: {int(time.time())}\r\nwebhook-signature: v1,{'A' * 44}\r\n"
            f"Content-Length: {len(payload.body)}\r\n\r\n"
        )
        requests.append(head.encode() + payload.body)
    clients = []
    for _ in range(MAX_PARALLEL_PER_SINK * len(sinks)):
        _, client = await loop.create_connection(_RawClient, "127.0.0.1", port)
        clients.append(client)

    free: asyncio.Queue[_RawClient] = asyncio.Queue()
    for client in clients:
        free.put_nowait(client)

    async def one(i: int) -> None:
        client = await free.get()
        try:
            status = await client.post(requests[i % len(requests)])
            assert status == 204, status
        finally:
            free.put_nowait(client)

    try:
        await _paced(240, rate * len(sinks), one)
        n = events * len(sinks)
        cpu0 = time.process_time()
        await _paced(n, rate * len(sinks), one)
        cpu = time.process_time() - cpu0
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.close()
    return {"posts": n, "cpu_s": cpu, "cpu_per_post_us": cpu / n * 1e6}


def phases(profile: cProfile.Profile, cpu_per_delivery_us: float) -> dict[str, float]:
    """The profile's time by phase, as microseconds of the measured CPU per delivery (the
    whole run's CPU, feeding included, divided by the deliveries)."""
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    found: dict[str, float] = {}
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for phase, wanted in PHASES.items():
        cum = 0.0
        for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in raw.items():
            if any(frag in file and name == fn for frag, fn in wanted):
                cum += ct
        found[phase] = cum / total
    found["other (event loop, tasks, waking)"] = max(0.0, 1.0 - sum(found.values()))
    return {k: round(v * cpu_per_delivery_us, 1) for k, v in found.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.deliveries", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=3000, help="events fed (x3 deliveries)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events per second fed")
    parser.add_argument("--rounds", type=int, default=3, help="measure this many times; best")
    parser.add_argument("--profile", action="store_true", help="also split the CPU by phase")
    parser.add_argument("--floor", action="store_true", help="also measure a bare aiohttp POST")
    parser.add_argument("--top", type=int, default=0, help="print the profile's top N functions")
    parser.add_argument(
        "--process",
        action="store_true",
        help="the daemon's CPU per event when a delivery process makes the deliveries",
    )
    args = parser.parse_args(argv)
    receiver = Server("--receiver")
    if args.process:
        try:
            side = asyncio.run(daemon_side(receiver.port, args.events, args.rate))
        finally:
            receiver.close()
        print(json.dumps({"load_average": os.getloadavg(), **side}, indent=2))
        return 0
    try:
        runs = [
            asyncio.run(measure(receiver.port, args.events, args.rate, None))
            for _ in range(args.rounds)
        ]
        best = min(runs, key=lambda r: r["cpu_per_delivery_us"])
        out: dict[str, Any] = {
            "load_average": os.getloadavg(),
            "cpu_per_delivery_us": [round(r["cpu_per_delivery_us"], 1) for r in runs],
            "best": best,
        }
        if args.profile:
            prof = cProfile.Profile()
            asyncio.run(measure(receiver.port, args.events, args.rate, prof))
            whole_us = best["cpu_s"] / best["deliveries"] * 1e6  # feeding included
            out["phases_us_per_delivery"] = phases(prof, whole_us)
            if args.top:
                pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
        if args.floor:
            floors = [
                asyncio.run(floor(receiver.port, args.events, args.rate))
                for _ in range(args.rounds)
            ]
            out["floor_cpu_per_post_us"] = [round(f["cpu_per_post_us"], 1) for f in floors]
            raws = [
                asyncio.run(raw_floor(receiver.port, args.events, args.rate))
                for _ in range(args.rounds)
            ]
            out["raw_protocol_cpu_per_post_us"] = [round(f["cpu_per_post_us"], 1) for f in raws]
    finally:
        receiver.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    raise SystemExit(main())
