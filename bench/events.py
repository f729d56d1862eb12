"""The event path alone: CPU per event, by phase, with the real writer, store and stdout thread.

`python -m bench.events` drives the daemon's own `EventWriter` with a `SqliteStore` in a
file, the `LineWriter` thread writing to a file, and the observers the service gives it
(the Prometheus metrics, the live feed of `GET /events`), with N watched tasks. Events
arrive as the benchmark's polls make them: `--rate` per second (default 800, what one poll
in ten a change makes at 70% load), each from its own coroutine, spread over time. It
prints the CPU per event of each synchronous phase (the same phases `bench.worker` times
inside the loaded benchmark), the writer thread's, the whole process's per event, the
events per commit, and with `--profile` cProfile's top functions.

Figures here are of the path in isolation (warm caches): the loaded benchmark's are
higher. Run it on a quiet machine, or read it as relative (before/after a change).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from bench.measure import task_id

# the phases `bench.worker` times in the loaded benchmark: (module, class, method, counts)
PHASES: tuple[tuple[str, str, str, bool], ...] = (
    ("enkwatch.events", "EventWriter", "_task_body", True),
    ("enkwatch.events", "EventWriter", "_publish", False),
    ("enkwatch.state.sqlite", "SqliteStore", "_stage", False),
    ("enkwatch.state.sqlite", "SqliteStore", "_flush_batch", False),
    ("enkwatch.state.sqlite", "SqliteStore", "_flush_confirmations", False),
    ("enkwatch.output", "LineWriter", "_report", False),
)


class PhaseTimer:
    """CPU of each phase of the event path, added up per name: the loop thread's own
    (time.thread_time; process_time would also count what the writer thread does meanwhile,
    which is measured on its own)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.events = 0
        self.calls: dict[str, int] = {}

    def install(self) -> Callable[[], None]:
        """Wrap every phase; returns what undoes it."""
        import importlib

        undo: list[tuple[Any, str, Any]] = []
        for module, cls_name, name, counts in PHASES:
            cls = getattr(importlib.import_module(module), cls_name)
            original = cls.__dict__.get(name)
            if original is None:
                continue
            undo.append((cls, name, original))
            setattr(cls, name, self._wrap(original, name, counts))

        def restore() -> None:
            for cls, name, original in undo:
                setattr(cls, name, original)

        return restore

    def _wrap(self, original: Any, name: str, counts: bool) -> Any:
        timer = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                spent = time.thread_time() - start
                timer.phases[name] = timer.phases.get(name, 0.0) + spent
                timer.calls[name] = timer.calls.get(name, 0) + 1
                if counts:
                    timer.events += 1

        return wrapper


async def drive(args: argparse.Namespace, state: Path, sink: TextIO) -> dict[str, Any]:
    """Emit `args.events` transitions at `args.rate` per second over `args.tasks` tasks."""
    from enkwatch import events as ev
    from enkwatch.clock import SystemClock
    from enkwatch.livefeed import EventFeed
    from enkwatch.metrics import Metrics
    from enkwatch.output import LineWriter
    from enkwatch.state.base import TaskRecord
    from enkwatch.state.sqlite import SqliteStore
    from enkwatch.watch import TaskWatch

    clock = SystemClock()
    ev.configure_logging(stream=sink)
    store = SqliteStore(str(state), clock)
    if args.commit_delay_ms is not None:
        store.commit_delay_s = args.commit_delay_ms / 1000
    out = LineWriter(sink.fileno(), clock=clock)
    out.start()
    metrics, feed = Metrics(clock), EventFeed()
    writer = ev.EventWriter(
        clock, store, (metrics.observe_event, feed.publish), out=out, secrets=["bench-key"]
    )
    now = clock.now().timestamp()
    tasks = []
    for i in range(args.tasks):
        tid = task_id(i)
        record = TaskRecord(f"dataset:{tid}", tid, None, now, last_status="Running")
        tasks.append(TaskWatch(record.task_key, tid, None, {}, 10.0, None, record))
    await store.add_tasks([t.record for t in tasks])
    rng = random.Random(1)
    commits = 0
    flush = SqliteStore.__dict__["_flush_batch"]

    def counted(self: Any) -> None:
        nonlocal commits
        commits += 1
        flush(self)

    SqliteStore._flush_batch = counted  # type: ignore[method-assign]
    timer = PhaseTimer()
    restore = timer.install()
    # CPU of the loop thread (wall time would count the sleeps between events)
    profile = cProfile.Profile(time.thread_time) if args.profile else None
    busy: set[str] = set()
    jobs: set[asyncio.Task[None]] = set()

    async def one(task: TaskWatch) -> None:
        rec = task.record
        previous = rec.last_status
        rec.last_status = "Finished" if previous == "Running" else "Running"
        try:
            await writer.task_event(
                task,
                ev.TASK_TRANSITION,
                ev.INFO,
                {
                    "previous_status": previous,
                    "status": rec.last_status,
                    "terminal": False,
                    "polls": rec.polls,
                    "created_at": "2026-01-01T00:00:00Z",
                    "started_at": "2026-01-01T00:00:01Z",
                    "watched_seconds": 12.5,
                },
            )
        finally:
            busy.discard(task.key)

    step = 1.0 / args.rate if args.rate > 0 else 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    thread0 = out.thread_cpu_s
    if profile is not None:
        profile.enable()
    next_at = time.monotonic()
    for _ in range(args.events):
        task = rng.choice(tasks)
        while task.key in busy:  # per-task order: one event of a task at a time
            task = rng.choice(tasks)
        busy.add(task.key)
        job = asyncio.ensure_future(one(task))
        jobs.add(job)
        job.add_done_callback(jobs.discard)
        if step:
            next_at += step
            delay = next_at - time.monotonic()
            await asyncio.sleep(max(0.0, delay))
        elif len(jobs) >= args.concurrency:
            await asyncio.wait(jobs, return_when=asyncio.FIRST_COMPLETED)
    while jobs:
        await asyncio.wait(jobs)
    await out.flush(10.0)
    await asyncio.sleep(0.2)  # the confirmations' timer
    if profile is not None:
        profile.disable()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    thread = out.thread_cpu_s - thread0
    restore()
    SqliteStore._flush_batch = flush  # type: ignore[method-assign]
    await out.close(5.0)
    await store.close()
    n = max(timer.events, 1)
    phases = {k: v / n * 1e6 for k, v in timer.phases.items()}
    phases["writer_thread"] = thread / n * 1e6
    return {
        "events": timer.events,
        "wall_s": wall,
        "commits": commits,
        "events_per_commit": timer.events / max(commits, 1),
        "phases_us": phases,
        "phase_calls": dict(timer.calls),
        "event_path_us": sum(phases.values()),
        "process_cpu_per_event_us": cpu / n * 1e6,
        "profile": profile,
    }


def report(result: dict[str, Any], top: int) -> str:
    lines = [
        f"events {result['events']} in {result['wall_s']:.2f} s; "
        f"{result['commits']} commits ({result['events_per_commit']:.1f} events each)",
        "CPU per event, us, by phase:",
    ]
    for name, us in sorted(result["phases_us"].items(), key=lambda kv: -kv[1]):
        calls = result["phase_calls"].get(name)
        lines.append(f"  {name:<22} {us:8.1f}" + (f"   ({calls} calls)" if calls else ""))
    lines.append(f"  {'event path (sum)':<22} {result['event_path_us']:8.1f}")
    lines.append(
        f"  {'process (all, /event)':<22} {result['process_cpu_per_event_us']:8.1f}"
        "   (the driver's loop and sleeps included)"
    )
    profile = result.get("profile")
    if profile is not None:
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats("tottime").print_stats(top)
        lines.append(buf.getvalue())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument(
        "--rate", type=float, default=800.0, help="events per second (0: as fast as possible)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="with --rate 0")
    parser.add_argument(
        "--commit-delay-ms", type=float, default=None, help="the store's commit window"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile's top functions")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(Path(tmp) / "events.jsonl", "w", encoding="utf-8") as sink,
    ):
        result = asyncio.run(drive(args, Path(tmp) / "state.db", sink))
    sys.stdout.write(report(result, args.top) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
