"""The benchmark's child processes: each serves commands from `bench.run` over a pipe.

`python -m bench.worker KIND` reads one JSON command per line on stdin and answers each
with one JSON line on stdout. KIND is `bare` (the bare aiohttp loop), `enkwatch` (the real
`enkwatch.service.Service`), `design` (heap scheduler against APScheduler-job-per-task) or
`render` (structlog's JSONRenderer with stdlib json against orjson). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from bench.measure import cpu_s, percentile, rss_bytes, task_id

PATH = "/datasets/get-task"
API_KEY = "bench-key"
DRAIN_TIMEOUT_S = 10.0


def _sink(path: str) -> TextIO:
    """A text file the JSON events go to (kept open for the process's life)."""
    return open(path, "w", encoding="utf-8")


def _process_cpu_s(pid: int | None) -> float:
    """User + system CPU of another process so far (0 without one), from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Window:
    """CPU, wall time and a counter over one measuring window."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count
        self._start = (cpu_s(), time.perf_counter(), count())

    def close(self) -> dict[str, float]:
        cpu, wall, n = cpu_s(), time.perf_counter(), self._count()
        c0, w0, n0 = self._start
        return {"count": n - n0, "cpu_s": cpu - c0, "wall_s": wall - w0}


# -- the bare aiohttp loop -----------------------------------------------------------------


class BareWorker:
    """One session, `pool` connections, `pool` coroutines each doing GET + read in a loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._url = ""
        self._pool = 0
        self.requests = 0

    async def start(self, port: int, pool: int) -> dict[str, Any]:
        self._url = f"http://127.0.0.1:{port}{PATH}"
        self._pool = pool
        # the same pool, timeout and default headers as enkwatch's ApiClient
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=pool, limit_per_host=pool),
            timeout=aiohttp.ClientTimeout(total=10),
            headers={"Accept": "application/json", "User-Agent": "enkwatch/bench"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        # the floor runs on the same interpreter settings as the daemon: enkwatch tunes its
        # collector at start-up (enkwatch.service.tune_gc), so the bare loop does too and
        # the ratios measure enkwatch's own work, not a GC setting
        from enkwatch.health import tune_gc

        tune_gc()
        await self.run(0.3)  # open the connections
        return {"pid": os.getpid()}

    async def run(self, window_s: float) -> dict[str, float]:
        assert self._session is not None
        session, url = self._session, self._url
        deadline = time.monotonic() + window_s

        async def loop(i: int) -> None:
            headers = {"apikey": API_KEY, "X-Enkrypt-Task-ID": task_id(i)}
            while time.monotonic() < deadline:
                async with session.get(url, headers=headers) as resp:
                    await resp.read()
                self.requests += 1

        window = Window(lambda: self.requests)
        await asyncio.gather(*(loop(i) for i in range(self._pool)))
        return window.close()

    async def stop(self) -> dict[str, Any]:
        if self._session is not None:
            await self._session.close()
        return {}


# -- the real service ----------------------------------------------------------------------


# the sinks benchmark: three sinks of three formats, every transition to each
SINK_SECRET = "whsec_" + "YmVuY2gtc2VjcmV0LWJlbmNoLXNlY3JldC1iZW5jaCE="
SINK_FORMATS = ("json", "cloudevents", "slack")


def sinks_document(receiver_port: int | None) -> dict[str, Any]:
    if receiver_port is None:
        return {"webhooks": []}
    url = f"http://127.0.0.1:{receiver_port}/hook"
    return {
        "webhooks": [
            {
                "url": f"{url}/{fmt}",
                "name": f"bench-{fmt}",
                "format": fmt,
                "secrets": [{"env": "BENCH_SINK_SECRET"}],
                "events": ["task.transition"],
            }
            for fmt in SINK_FORMATS
        ]
    }


def config_document(
    n: int, port: int, pool: int, state_path: str, receiver_port: int | None = None
) -> dict[str, Any]:
    """The decoded config of a watch list of `n` tasks on a long interval."""
    return {
        "sinks": sinks_document(receiver_port),
        "api": {"base_url": f"http://127.0.0.1:{port}", "timeout_seconds": 10},
        "polling": {
            "interval_seconds": 3600,
            "jitter": 0.1,
            "max_concurrency": pool,
            "max_requests_per_second": 0,
        },
        "state": {"path": state_path},
        "tasks": [{"task_id": task_id(i)} for i in range(n)],
    }


class EnkwatchWorker:
    """Drives `enkwatch.service.Service` with `n` tasks against the benchmark server."""

    def __init__(self) -> None:
        self.service: Any = None
        self._run: asyncio.Task[int] | None = None
        self._n = 0
        self._pool = 0
        self._started = 0
        self._first_round_at: float | None = None
        self._t_run = 0.0
        self._lateness: list[float] | None = None
        self._event_cpu_s = 0.0
        # CPU seconds of each timed phase of the event path
        self.phases: dict[str, float] = {}
        # group commits made (calls of SqliteStore._flush_batch)
        self.commits = 0
        self.events = 0
        self._events_file: Any = None

    # the hooks: lateness of every start, CPU of every event

    def _on_start(self, lateness_s: float) -> None:
        self._started += 1
        if self._lateness is not None:
            self._lateness.append(lateness_s)
        if self._first_round_at is None and self.service.running.scheduler.started_polls >= self._n:
            self._first_round_at = time.perf_counter()

    def _time_events(self) -> None:
        """Add the CPU of every phase of the event path to a total.

        An event's path suspends (it awaits its group commit, and the writer thread writes
        it), so timing the coroutine from start to end would count whatever else ran
        meanwhile. Each synchronous phase is timed instead: the body (with redaction), the
        staging into the batch, the batch's commit, rendering and queueing the line with the
        metrics and outbox hooks, the confirmations (the writer thread's reports and their
        batched commit); the writer thread's own CPU (time.thread_time) is added at read time.
        """
        from enkwatch.events import EventWriter

        if not hasattr(EventWriter, "_task_body"):
            self._time_poller_emit()  # an older enkwatch: one commit per event, no awaits
            return
        from enkwatch.output import LineWriter
        from enkwatch.state.sqlite import SqliteStore

        worker = self

        def timed(cls: Any, name: str, counts: bool = False) -> None:
            original: Any = getattr(cls, name)

            # the loop thread's own CPU: process_time would also count whatever the writer
            # thread does meanwhile, and that is added from its own thread_time below
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                start = time.thread_time()
                try:
                    return original(*args, **kwargs)
                finally:
                    spent = time.thread_time() - start
                    worker._event_cpu_s += spent
                    worker.phases[name] = worker.phases.get(name, 0.0) + spent
                    if counts:
                        worker.events += 1
                    elif name == "_flush_batch":
                        worker.commits += 1

            setattr(cls, name, wrapper)

        timed(EventWriter, "_task_body", counts=True)
        timed(EventWriter, "_publish")
        timed(SqliteStore, "_stage")
        timed(SqliteStore, "_flush_batch")
        timed(SqliteStore, "_flush_confirmations")
        timed(LineWriter, "_report")

    @property
    def event_cpu_s(self) -> float:
        """The event path's CPU so far, the writer thread's included."""
        running = getattr(self.service, "running", None)
        out = getattr(running.writer, "out", None) if running is not None else None
        return self._event_cpu_s + float(getattr(out, "thread_cpu_s", 0.0))

    def _time_poller_emit(self) -> None:
        """Add the CPU of every `Poller._emit` (journal, render, write, hooks) to a total."""
        from enkwatch.watch import Poller

        original: Any = Poller._emit
        worker = self

        if inspect.iscoroutinefunction(original):

            async def timed(self: Poller, task: Any, name: str, level: str, **fields: Any) -> None:
                # SQLite answers without suspending: no other coroutine runs in between
                start = time.process_time()
                try:
                    await original(self, task, name, level, **fields)
                finally:
                    worker._event_cpu_s += time.process_time() - start
                    worker.events += 1

            Poller._emit = timed  # type: ignore[method-assign]
            # the confirmations of written events are committed in batches, outside _emit:
            # their CPU belongs to the events too
            from enkwatch.state.sqlite import SqliteStore

            flush: Any = SqliteStore._flush_confirmations

            def timed_flush(store: SqliteStore, retry: bool = True) -> None:
                start = time.process_time()
                try:
                    flush(store, retry)
                finally:
                    worker._event_cpu_s += time.process_time() - start

            SqliteStore._flush_confirmations = timed_flush  # type: ignore[method-assign]
        else:

            def timed_sync(self: Poller, task: Any, name: str, level: str, **fields: Any) -> None:
                start = time.process_time()
                try:
                    original(self, task, name, level, **fields)
                finally:
                    worker._event_cpu_s += time.process_time() - start
                    worker.events += 1

            Poller._emit = timed_sync  # type: ignore[method-assign]

    async def start(
        self,
        n: int,
        port: int,
        pool: int,
        state_path: str,
        events_path: str,
        receiver_port: int | None = None,
    ) -> dict[str, Any]:
        from enkwatch.config import parse_config
        from enkwatch.events import configure_logging
        from enkwatch.service import Service
        from enkwatch.sinks import build_sinks

        self._n, self._pool = n, pool
        self._time_events()
        self._events_file = _sink(events_path)
        configure_logging(stream=self._events_file)
        gc.collect()
        rss_before = rss_bytes()
        raw = config_document(n, port, pool, state_path, receiver_port)
        t0 = time.perf_counter()
        config = parse_config(raw, environ={})
        parse_s = time.perf_counter() - t0
        del raw
        sinks = build_sinks(config.sinks, {"BENCH_SINK_SECRET": SINK_SECRET})
        self.service = Service(config, API_KEY, sinks=sinks)
        self._t_run = time.perf_counter()
        self._run = asyncio.create_task(self.service.run(install_signals=False))
        ready = asyncio.create_task(self.service.ready.wait())
        await asyncio.wait({ready, self._run}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            self._run.result()  # raises what the service died of
        ready_s = time.perf_counter() - self._t_run
        self.service.running.scheduler.lateness_hook = self._on_start
        return {
            "rss_before_bytes": rss_before,
            "config_parse_s": parse_s,
            "service_ready_s": ready_s,
            "startup_s": parse_s + ready_s,
        }

    @property
    def _sched(self) -> Any:
        return self.service.running.scheduler

    async def first_round(self, timeout_s: float) -> dict[str, Any]:
        """Wait until every task was polled once and those polls are over."""
        deadline = time.monotonic() + timeout_s
        # a bounded poll of state that the service's own callbacks change
        while self._first_round_at is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await self._drain()
        done = self._first_round_at is not None
        return {
            "first_round_s": (self._first_round_at or time.perf_counter()) - self._t_run,
            "complete": done,
            "events": self.events,
            "event_cpu_s": self.event_cpu_s,
            "event_phases_s": dict(self.phases),
            "rss_bytes": rss_bytes(),
        }

    async def _drain(self) -> None:
        sched = self._sched
        sched.max_in_flight = 0
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while sched.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.002)

    def _resume(self) -> None:
        self._sched.max_in_flight = self._pool
        self._sched.dispatch()

    async def schedule(self, interval_s: float, spread_s: float, delay_s: float = 0.0) -> dict:
        """Every task on `interval_s`, first due spread evenly over `spread_s` from now."""
        await self._drain()
        sched = self._sched
        tasks = list(self.service.running.watchlist.tasks.values())
        random.Random(1).shuffle(tasks)
        # every task out first, then the spread from now: its first due times do not pass
        # while this loop still runs (at 100,000 tasks removing them takes ~0.3-0.6 s,
        # which counted as lateness when the spread began before it)
        for task in tasks:
            task.interval_s = interval_s
            sched.remove(task)
        start = time.monotonic() + delay_s
        step = spread_s / len(tasks)
        for i, task in enumerate(tasks):
            sched.add(task, start + i * step)
        return {}

    async def saturate(self, window_s: float, warm_s: float = 0.2) -> dict[str, Any]:
        """Resume at full demand, measure `window_s`, pause again."""
        self._resume()
        await asyncio.sleep(warm_s)
        window = Window(lambda: self._started)
        await asyncio.sleep(window_s)
        out = window.close()
        await self._drain()
        return out

    async def load(self, window_s: float, settle_s: float) -> dict[str, Any]:
        """Resume, let the load settle, then measure lateness, CPU, events and RSS."""
        self._resume()
        await asyncio.sleep(settle_s)
        self._lateness = []
        events0, event_cpu0, commits0 = self.events, self.event_cpu_s, self.commits
        phases0, thread0 = dict(self.phases), self.event_cpu_s - self._event_cpu_s
        window = Window(lambda: self._started)
        rss_max = 0
        end = time.monotonic() + window_s
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(0.25, left))
            rss_max = max(rss_max, rss_bytes())
        out: dict[str, Any] = window.close()
        late = sorted(self._lateness)
        self._lateness = None
        await self._drain()
        out.update(
            rss_bytes=rss_max,
            heap_len=len(self._sched),
            lateness_ms={
                "p50": percentile(late, 50) * 1e3,
                "p99": percentile(late, 99) * 1e3,
                "max": late[-1] * 1e3 if late else float("nan"),
                "samples": len(late),
            },
            events=self.events - events0,
            event_commits=self.commits - commits0,
            event_cpu_s=self.event_cpu_s - event_cpu0,
            event_phases_s={
                **{k: v - phases0.get(k, 0.0) for k, v in self.phases.items()},
                "writer_thread": self.event_cpu_s - self._event_cpu_s - thread0,
            },
        )
        return out

    def _delivered(self) -> float:
        registry = self.service.metrics.registry
        return sum(
            registry.get_sample_value(
                "enkwatch_webhook_deliveries_total", {"sink": s.id, "outcome": "delivered"}
            )
            or 0.0
            for s in self.service.running.outbox.sinks
        )

    async def deliver(self, window_s: float, settle_s: float) -> dict[str, Any]:
        """`load`, and the webhook deliveries made in its window, and the backlog after it.

        The deliveries of the first round's events (one per task and sink) are made first:
        the window measures the steady state, not the catching up on a backlog."""
        outbox = self.service.running.outbox
        await outbox.wait_idle(60.0)
        delivered0 = self._delivered()
        # the delivery process's CPU (it has one with a state file: see enkwatch.delivery)
        pid = getattr(outbox, "pid", None)
        child0 = _process_cpu_s(pid)
        out = await self.load(window_s, settle_s)
        out["delivered"] = self._delivered() - delivered0
        out["outbox_pending"] = outbox.stats()[0]
        out["delivery_process"] = pid is not None
        out["delivery_process_cpu_s"] = _process_cpu_s(pid) - child0
        return out

    async def idle(self, window_s: float) -> dict[str, Any]:
        """CPU over a window in which no poll is due (the heartbeat and checkpoints run)."""
        self._resume()
        started = self._started
        window = Window(lambda: self._started)
        await asyncio.sleep(window_s)
        out = window.close()
        out["polls"] = self._started - started
        return out

    async def add_cost(self, count: int) -> dict[str, Any]:
        """`PollScheduler.add` of `count` new tasks, each timed alone (far-future due times)."""
        from enkwatch.state.base import TaskRecord
        from enkwatch.watch import TaskWatch

        sched = self._sched
        tasks = [
            TaskWatch(
                key=f"added-{i}",
                task_id=f"added-{i}",
                dataset=None,
                labels={},
                interval_s=3600.0,
                deadline_s=None,
                record=TaskRecord(f"added-{i}", f"added-{i}", None, time.time()),
            )
            for i in range(count)
        ]
        due = time.monotonic() + 3600.0
        times = []
        clock = time.perf_counter_ns
        for task in tasks:
            t0 = clock()
            sched.add(task, due)
            times.append(clock() - t0)
        for task in tasks:
            sched.remove(task)
        times.sort()
        return {
            "count": count,
            "mean_us": sum(times) / len(times) / 1e3,
            "p99_us": percentile(times, 99) / 1e3,
            "max_us": times[-1] / 1e3,
        }

    async def stop(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.service.request_stop()
        assert self._run is not None
        from enkwatch.cli import exit_code

        outcome = await asyncio.wait_for(self._run, 30)
        code = outcome if isinstance(outcome, int) else exit_code(outcome)
        if self._events_file is not None:
            self._events_file.close()
        return {"exit_code": code, "stop_s": time.perf_counter() - t0}


# -- design comparison: heap + one wake-up job, against one APScheduler job per task --------


class DesignWorker:
    """The same poller, client and store, scheduled two ways, side by side in one process."""

    def __init__(self) -> None:
        self._stack: Any = None
        self._heap: Any = None
        self._aps_jobs: Any = None
        self._polls = 0
        self._pool = 0

    async def start(
        self, n: int, port: int, pool: int, state_path: str, aps_interval_s: float
    ) -> dict[str, Any]:
        from contextlib import AsyncExitStack

        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        from enkwatch.client import ApiClient
        from enkwatch.clock import SystemClock
        from enkwatch.config import PollingConfig
        from enkwatch.events import EventWriter, configure_logging
        from enkwatch.limits import RequestGate
        from enkwatch.schedule import ApschedulerWakeup, PollScheduler, make_apscheduler
        from enkwatch.state import open_store
        from enkwatch.state.base import TaskRecord
        from enkwatch.watch import Poller, TaskWatch

        configure_logging(stream=_sink(os.devnull))
        self._pool = pool
        clock = SystemClock()
        polling = PollingConfig(max_concurrency=pool, max_requests_per_second=0)
        self._stack = AsyncExitStack()
        store: Any = open_store(state_path)
        # the store's methods are coroutines in newer enkwatch, plain calls in older
        if inspect.iscoroutinefunction(store.close):
            self._stack.push_async_callback(store.close)
        else:
            self._stack.callback(store.close)
        gate = RequestGate(0, clock)
        client = await self._stack.enter_async_context(
            ApiClient(f"http://127.0.0.1:{port}", API_KEY, 10, gate, pool_size=pool, clock=clock)
        )
        poller = Poller(client, EventWriter(clock, store), clock, polling)
        now = time.time()
        heap_tasks, aps_tasks = [], []
        for tasks, prefix in ((heap_tasks, "h"), (aps_tasks, "a")):
            for i in range(n):
                key = f"{prefix}{task_id(i)}"
                record = TaskRecord(key, key, None, now, last_status="Running")
                added = store.add_task(record)
                if inspect.isawaitable(added):
                    await added
                tasks.append(
                    TaskWatch(key, key, None, {}, 1e-3, None, record)  # always due: saturation
                )

        async def counted_poll(task: TaskWatch) -> Any:
            delay = await poller.poll(task)
            self._polls += 1
            return delay

        # (a) the heap, woken by one APScheduler job (what service.py assembles)
        aps_wakeup = make_apscheduler()
        aps_wakeup.start(paused=True)
        self._stack.callback(aps_wakeup.shutdown, wait=False)
        heap = PollScheduler(
            counted_poll,
            clock,
            0,
            lambda t: None,
            self._crash,
            wakeup=lambda dispatch: ApschedulerWakeup(aps_wakeup, dispatch, clock),
        )
        self._heap = (heap, aps_wakeup)
        gc.collect()
        rss0 = rss_bytes()
        heap_add_ns = []
        for task in heap_tasks:
            t0 = time.perf_counter_ns()
            heap.add(task)
            heap_add_ns.append(time.perf_counter_ns() - t0)
        gc.collect()
        rss1 = rss_bytes()

        # (b) one APScheduler interval job per task, the same poll in each; a semaphore keeps
        # the same in-flight limit (without it the backlog lives in aiohttp's connector queue)
        aps = AsyncIOScheduler(
            event_loop=asyncio.get_running_loop(),
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        import logging

        # every skipped run ("maximum number of running instances reached") logs a warning
        logging.getLogger("apscheduler").setLevel(logging.ERROR)
        sem = asyncio.Semaphore(pool)

        async def job(task: TaskWatch) -> None:
            async with sem:
                await counted_poll(task)

        aps.start(paused=True)
        self._stack.callback(aps.shutdown, wait=False)
        self._aps_jobs = aps
        aps_add_ns = []
        for i, task in enumerate(aps_tasks):
            # first runs spread evenly over one interval, as the heap's are after a round
            first = _utc_in(aps_interval_s * (1 + i / n))
            t0 = time.perf_counter_ns()
            aps.add_job(
                job, "interval", args=(task,), seconds=aps_interval_s, start_date=first, id=task.key
            )
            aps_add_ns.append(time.perf_counter_ns() - t0)
        gc.collect()
        rss2 = rss_bytes()
        heap_add_ns.sort()
        aps_add_ns.sort()
        return {
            "heap_bytes_per_task": (rss1 - rss0) / n,
            "aps_bytes_per_task": (rss2 - rss1) / n,
            "heap_add_us": {
                "mean": sum(heap_add_ns) / n / 1e3,
                "p99": percentile(heap_add_ns, 99) / 1e3,
            },
            "aps_add_us": {
                "mean": sum(aps_add_ns) / n / 1e3,
                "p99": percentile(aps_add_ns, 99) / 1e3,
            },
        }

    def _crash(self, exc: BaseException) -> None:
        raise exc

    async def heap(self, window_s: float, warm_s: float = 0.3) -> dict[str, Any]:
        heap, wakeup = self._heap
        wakeup.resume()
        heap.max_in_flight = self._pool
        heap.dispatch()
        await asyncio.sleep(warm_s)
        window = Window(lambda: self._polls)
        await asyncio.sleep(window_s)
        out = window.close()
        heap.max_in_flight = 0
        wakeup.pause()
        await _wait_empty(lambda: bool(heap.in_flight))
        return out

    async def apscheduler(self, window_s: float, warm_s: float = 1.0) -> dict[str, Any]:
        aps = self._aps_jobs
        aps.resume()
        await asyncio.sleep(warm_s)
        window = Window(lambda: self._polls)
        await asyncio.sleep(window_s)
        out = window.close()
        aps.pause()
        # the backlog of runs waiting on the semaphore still runs to its end
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        polls_before = -1
        while polls_before != self._polls and time.monotonic() < deadline:
            polls_before = self._polls
            await asyncio.sleep(0.2)
        return out

    async def stop(self) -> dict[str, Any]:
        await self._stack.aclose()
        return {}


def _utc_in(seconds: float) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(seconds=seconds)


async def _wait_empty(busy: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while busy() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.002)


# -- event rendering: stdlib json against orjson ------------------------------------------


class RenderWorker:
    """CPU per event through enkwatch's structlog chain with each JSON renderer."""

    async def compare(self, events: int, rounds: int) -> dict[str, Any]:
        import structlog

        from enkwatch import events as ev

        body = {
            "timestamp": "2026-01-01T00:00:00.000000Z",
            "level": "info",
            "event": ev.TASK_TRANSITION,
            "task_id": task_id(1),
            "dataset": "Election2",
            "task_key": task_id(1),
            "seq": 2,
            "event_id": f"{task_id(1)}:2",
            "labels": {"team": "safety"},
            "previous_status": "Queued",
            "status": "Running",
            "terminal": False,
            "polls": 12,
            "created_at": "2025-02-28T11:07:36.872803+00:00",
            "started_at": "2025-02-28T11:07:37.853691+00:00",
            "watched_seconds": 61.25,
        }
        sink = _sink(os.devnull)

        def use_orjson() -> None:
            ev.configure_logging(stream=sink)  # enkwatch's own set-up

        def use_stdlib() -> None:
            ev.configure_logging(stream=sink)
            processors = list(structlog.get_config()["processors"])
            processors[-1] = structlog.processors.JSONRenderer()  # json.dumps
            structlog.configure(
                processors=processors, logger_factory=structlog.PrintLoggerFactory(file=sink)
            )

        totals = {"orjson": 0.0, "stdlib_json": 0.0}
        for _ in range(rounds):
            for name, setup in (("stdlib_json", use_stdlib), ("orjson", use_orjson)):
                setup()
                t0 = time.process_time()
                for _ in range(events):
                    ev.emit(body)
                totals[name] += time.process_time() - t0
        sink.close()
        per = {k: v / (events * rounds) * 1e6 for k, v in totals.items()}
        return {
            "events": events * rounds,
            "stdlib_json_us_per_event": per["stdlib_json"],
            "orjson_us_per_event": per["orjson"],
            "orjson_to_stdlib_ratio": per["orjson"] / per["stdlib_json"],
        }

    async def stop(self) -> dict[str, Any]:
        return {}


WORKERS: dict[str, Callable[[], Any]] = {
    "bare": BareWorker,
    "enkwatch": EnkwatchWorker,
    "design": DesignWorker,
    "render": RenderWorker,
}


async def serve(kind: str) -> None:
    """Answer commands until `stop` (or end of input)."""
    worker = WORKERS[kind]()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        name = command.pop("cmd")
        result = await getattr(worker, name)(**command)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        if name == "stop":
            break


def main() -> int:
    asyncio.run(serve(sys.argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
