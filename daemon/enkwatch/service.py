"""Assembling the daemon: start-up, the run, reload, the admin backend, ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any, Final

import orjson

from enkwatch import __version__
from enkwatch import events as ev
from enkwatch.admin import TaskExists, build_admin_app, start_admin
from enkwatch.client import ApiClient, RequestGate
from enkwatch.clock import Clock, SystemClock
from enkwatch.config import Config, TaskConfig, load_config, validate_task_entry
from enkwatch.errors import (
    AuthError,
    ConfigError,
    EnkwatchError,
    LeaseLost,
    NotFound,
    StateUnavailable,
    UnauthorizedAnswer,
)
from enkwatch.metrics import Metrics
from enkwatch.models import FAILED, FINISHED, Observation
from enkwatch.replicas import Coordinator
from enkwatch.schedule import ApschedulerWakeup, PollScheduler, make_apscheduler
from enkwatch.sinks import Outbox, Sink
from enkwatch.state import open_store
from enkwatch.state.base import JournaledEvent, OutboxRow, StateError, Store, TaskRecord
from enkwatch.state.postgres import PgStore
from enkwatch.watch import NO_LABELS, Poller, TaskWatch

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_GAVE_UP: Final = 3
EXIT_AUTH: Final = 4
EXIT_UNREACHABLE: Final = 5

# Docker gives 10 s between SIGTERM and SIGKILL: drain in-flight polls for at most this long
MAX_DRAIN_S: Final = 5.0
# with --exit-when-done, wait this long at most for the webhook outbox to empty
OUTBOX_FLUSH_S: Final = 10.0
# poll counts (statistics; every event stores them too) are checkpointed this often, in
# chunks that each block the loop for a few milliseconds at most, even at 100,000 tasks
CHECKPOINT_EVERY_S: Final = 60.0
CHECKPOINT_CHUNK: Final = 1000
CONFIG_CHECK_EVERY_S: Final = 2.0
WATCHDOG_EVERY_S: Final = 1.0
# /healthz fails when the scheduler's watchdog job has not run for this long
STALL_LIMIT_S: Final = 15.0

REASON_SIGNAL: Final = "signal"
REASON_ALL_DONE: Final = "all_done"
REASON_AUTH: Final = "auth_failed"
REASON_CRASH: Final = "internal_error"
REASON_STOP: Final = "stop_requested"

SOURCE_CONFIG: Final = "config"
SOURCE_API: Final = "api"


def exit_code(tasks: Iterable[TaskWatch], auth_failed: bool) -> int:
    """CONTRACT §6 for a finished run: 4 > 3 > 1 > 0."""
    if auth_failed:
        return EXIT_AUTH
    tasks = list(tasks)
    if any(t.gave_up for t in tasks):
        return EXIT_GAVE_UP
    if any(t.failed for t in tasks):
        return EXIT_FAILED
    return EXIT_OK


# The collector's thresholds. Each poll allocates a few hundred short-lived containers: at
# the default (700, 10, 10) young collections ran hundreds of times a second and full ones,
# each walking the whole watch list, about once a second (40-125 ms at 10,000 tasks). The
# watch list is frozen out of the collector's sight after start-up; what stays in view and
# lives long (the heap of due times) is walked by a full collection, now every ~100 M
# allocations instead of every 5 M (a pause of 10-20 ms at 100,000 tasks).
GC_THRESHOLDS: Final = (50_000, 20, 100)


def tune_gc() -> None:
    """Tune the collector for a long-lived daemon with a large, stable watch list.

    The objects alive after start-up (the watch list, modules, the config) are frozen out
    of the collector's sight; young collections run less often. Called once, after the
    watch list is loaded.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _file_signature(path: str) -> tuple[int, int, int, int, str] | None:
    """What changes when a config file is edited or swapped (also a ConfigMap symlink swap)."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_dev, st.st_size, real)


class Service:
    """The daemon: owns the store, the HTTP sessions, the schedulers, and their lifecycle."""

    def __init__(
        self,
        config: Config,
        api_key: str,
        *,
        exit_when_done: bool = False,
        config_path: str | None = None,
        sinks: Sequence[Sink] = (),
        admin_token: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        gc_tuning: bool = True,
    ) -> None:
        self._tune_gc = gc_tuning
        self.config = config
        # the config's task entries by key. A single daemon forgets them once its watches are
        # built (at 100,000 tasks the pydantic models would be half of its memory); replicas
        # keep them, to build the watches of the partitions they gain.
        self._config_tasks: dict[str, TaskConfig] = {t.key: t for t in config.tasks}
        self._config_keys: set[str] = set(self._config_tasks)
        self._api_key = api_key
        self.exit_when_done = exit_when_done
        self.config_path = config_path
        self._sinks = list(sinks)
        self._admin_token = admin_token
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self.tasks: dict[str, TaskWatch] = {}
        self.metrics = Metrics(self.clock)
        self.auth_failed = False
        self.ready = asyncio.Event()
        self.admin_port: int | None = None
        self._stop = asyncio.Event()
        self._stop_reason = REASON_STOP
        self._crash: BaseException | None = None
        self._beat = self.clock.monotonic()
        self._config_sig = _file_signature(config_path) if config_path else None
        self.scheduler: PollScheduler | None = None
        self.store: Store | None = None
        self.outbox: Outbox | None = None
        self._gate: RequestGate | None = None
        self._poller: Poller | None = None
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.coordinator: Coordinator | None = None  # with a postgresql:// state
        self._background: set[asyncio.Task[Any]] = set()
        self._replayed: list[JournaledEvent] = []

    # -- control -------------------------------------------------------------------------

    def request_stop(self, reason: str = REASON_STOP) -> None:
        """Begin an orderly shutdown (idempotent: the first reason wins)."""
        if not self._stop.is_set():
            self._stop_reason = reason
            self._stop.set()

    def _install_signals(self) -> list[signal.Signals]:
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop, f"{REASON_SIGNAL}:{sig.name}")
                installed.append(sig)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
            installed.append(signal.SIGHUP)
        return installed

    # -- the run -------------------------------------------------------------------------

    async def run(self, install_signals: bool = True) -> int:
        """Run until stopped (or, with exit_when_done, until every task is done); exit code."""
        loop = asyncio.get_running_loop()
        async with AsyncExitStack() as stack:
            if install_signals:
                for sig in self._install_signals():
                    stack.callback(loop.remove_signal_handler, sig)
            try:
                store = open_store(
                    self.config.state.path,
                    self.clock,
                    self.replica_id,
                    self.config.state.lease_seconds,
                    on_takeover=self.metrics.takeover.observe,
                )
                await store.open()
            except StateError as err:
                raise ConfigError([f"state.path: {err}"]) from None
            self.store = store
            stack.push_async_callback(store.close)
            if store.shared and self.exit_when_done:
                raise ConfigError(
                    ["--exit-when-done: not with a shared (postgresql://) state; replicas serve"]
                )
            outbox = Outbox(
                store,
                self._sinks,
                self.clock,
                on_result=lambda s, o: self.metrics.deliveries.labels(s.id, o).inc(),
                on_dead=self._dead_letter,
                rng=self._rng,
            )
            self.outbox = outbox
            if store.shared:
                await self._register_config_tasks(store)
            else:
                self.replay(await store.unwritten_events())
                await self._mark_replayed(store)
                await self._load_tasks(store)

            polling = self.config.polling
            gate = RequestGate(polling.max_requests_per_second, self.clock)
            self._gate = gate
            client = await stack.enter_async_context(
                ApiClient(
                    self.config.api.base_url,
                    self._api_key,
                    self.config.api.timeout_seconds,
                    gate,
                    pool_size=polling.max_concurrency,
                    clock=self.clock,
                )
            )
            poller = Poller(client, store, self.clock, polling, self._rng)
            poller.observe_poll = self.metrics.observe_poll
            poller.sinks_for = outbox.sinks_for
            poller.hooks.append(self.metrics.observe_event)
            poller.hooks.append(lambda task, body: outbox.notify())
            self._poller = poller
            if isinstance(store, PgStore):
                self.coordinator = Coordinator(store, self, self.clock.monotonic)
                poller.may_poll = lambda task: store.leases.usable(task.key)
            sched = PollScheduler(
                poller.poll,
                self.clock,
                polling.max_concurrency,
                on_task_done=self._task_done,
                on_crash=self._crashed,
                paused_for=gate.pause_remaining,
            )
            self.scheduler = sched
            self.metrics.bind(
                tasks=self.tasks.values,
                gate=lambda: self._gate,
                in_flight=lambda: len(sched.in_flight),
                outbox=store.outbox_stats,
                replication=_replication_stats(store),
            )
            await outbox.start()
            stack.push_async_callback(outbox.close)
            aps = make_apscheduler()
            aps.start()
            stack.callback(aps.shutdown, wait=False)
            sched.wakeup = ApschedulerWakeup(aps, sched, self.clock)
            aps.add_job(self._checkpoint, "interval", seconds=CHECKPOINT_EVERY_S, id="checkpoint")
            aps.add_job(self._watchdog, "interval", seconds=WATCHDOG_EVERY_S, id="watchdog")
            if self.coordinator is not None and isinstance(store, PgStore):
                await self.coordinator.tick()
                every = store.leases.renew_every_s
                aps.add_job(self.coordinator.tick, "interval", seconds=every, id="leases")
                await store.listen(self.coordinator.notified)
            if self.config_path:
                aps.add_job(
                    self._check_config_file,
                    "interval",
                    seconds=CONFIG_CHECK_EVERY_S,
                    id="config-watch",
                )
            if (listen := self.config.admin.host_port) is not None:
                app = build_admin_app(self, self._admin_token)
                try:
                    runner, self.admin_port = await start_admin(app, *listen)
                except OSError as err:
                    raise ConfigError(
                        [
                            f"admin.listen: cannot listen on {self.config.admin.listen}: "
                            f"{err.strerror or err}"
                        ]
                    ) from None
                stack.push_async_callback(runner.cleanup)

            if self._tune_gc:
                tune_gc()
            self.log(ev.DAEMON_STARTED, version=__version__, tasks=len(self.tasks))
            sched.add_many(t for t in self.tasks.values() if not t.done)
            self.ready.set()
            self._check_all_done()

            await self._stop.wait()
            reason = self._stop_reason
            self.log(ev.DAEMON_STOPPING, reason=reason)
            sched.stop()
            aps.pause()
            gate.close()  # polls still waiting for the rate limit or a pause send nothing
            cancelled = await sched.drain(min(self.config.api.timeout_seconds, MAX_DRAIN_S))
            await self._checkpoint()
            if self.coordinator is not None:
                await self.coordinator.release()
            if reason == REASON_ALL_DONE:
                await outbox.wait_idle(OUTBOX_FLUSH_S)
            for job in list(self._background):
                job.cancel()
            stack.callback(self.log, ev.DAEMON_STOPPED, reason=reason, cancelled_polls=cancelled)
        if self._crash is not None:
            raise self._crash
        if reason.startswith(REASON_SIGNAL) or reason == REASON_STOP:
            return EXIT_AUTH if self.auth_failed else EXIT_OK
        return exit_code(self.tasks.values(), self.auth_failed)

    def log(self, name: str, level: str = ev.INFO, **fields: Any) -> None:
        """An event that is not about a task: written, counted, and queued for webhooks."""
        body: dict[str, Any] = {
            "timestamp": ev.rfc3339(self.clock.now()),
            "level": level,
            "event": name,
            **fields,
        }
        ev.emit(body)
        self.metrics.observe_event(None, body)
        if self.outbox is not None and self.store is not None:
            sinks = self.outbox.sinks_for(name)
            if sinks:
                self._spawn(self._enqueue(sinks, body))

    async def _enqueue(self, sinks: list[str], body: dict[str, Any]) -> None:
        assert self.store is not None and self.outbox is not None
        try:
            await self.store.enqueue(sinks, body)
        except StateUnavailable:
            return  # a daemon-level event; the store is down: it was written to stdout
        self.outbox.notify()

    def _spawn(self, coro: Any) -> None:
        job = asyncio.ensure_future(coro)
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    def replay(self, events: Iterable[JournaledEvent]) -> None:
        """Write again events that were journaled but not confirmed written (same event_id)."""
        self._replayed = list(events)
        for item in self._replayed:
            ev.emit(item.body)

    async def _mark_replayed(self, store: Store) -> None:
        for item in self._replayed:
            await store.mark_written(item.task_key, item.seq)
        self._replayed = []

    async def _load_tasks(self, store: Store) -> None:
        records = await store.load_tasks()
        now = self.clock.now().timestamp()
        new: list[TaskRecord] = []
        polling = self.config.polling
        for cfg in self.config.tasks:
            record = records.get(cfg.key)
            if record is None:
                record = TaskRecord(cfg.key, cfg.task_id, cfg.dataset, watch_started_at=now)
                new.append(record)
            self.tasks[cfg.key] = TaskWatch.from_config(cfg, polling, record, SOURCE_CONFIG)
        await store.add_tasks(new)  # one transaction for all: start-up of a large list
        # tasks added through the admin API survive restarts
        for key, record in records.items():
            if key not in self.tasks and (task := self.watch_for_record(record)) is not None:
                self.tasks[key] = task
        self._forget_config_tasks()

    def _forget_config_tasks(self) -> None:
        if self.store is not None and not self.store.shared:
            self._config_tasks = {}
            self.config = self.config.model_copy(update={"tasks": []})

    async def _register_config_tasks(self, store: Store) -> None:
        """Shared state: make sure every task of our config has its row (idempotent)."""
        now = self.clock.now().timestamp()
        await store.add_tasks(
            [TaskRecord(c.key, c.task_id, c.dataset, now) for c in self._config_tasks.values()]
        )

    def watch_for_record(self, record: TaskRecord) -> TaskWatch | None:
        """The watch of a stored task: from our config, else from its API spec; else None."""
        cfg = self._config_tasks.get(record.task_key)
        if cfg is not None:
            return TaskWatch.from_config(cfg, self.config.polling, record, SOURCE_CONFIG)
        if record.spec is None:
            return None
        try:
            cfg = validate_task_entry(record.spec)
        except ConfigError:
            return None
        return TaskWatch.from_config(cfg, self.config.polling, record, SOURCE_API)

    async def _watch_for(
        self, cfg: TaskConfig, source: str, record: TaskRecord | None
    ) -> TaskWatch:
        if record is None:
            now = self.clock.now().timestamp()
            record = TaskRecord(cfg.key, cfg.task_id, cfg.dataset, watch_started_at=now)
            assert self.store is not None
            await self.store.add_task(record)
        return TaskWatch.from_config(cfg, self.config.polling, record, source)

    def adopt(self, task: TaskWatch) -> None:
        """Start watching a task (polled at once unless done)."""
        self._add(task)

    def drop(self, task: TaskWatch) -> None:
        """Stop watching a task here."""
        self._drop(task)

    # -- callbacks from the scheduler ------------------------------------------------------

    def _task_done(self, task: TaskWatch) -> None:
        self._check_all_done()

    def _check_all_done(self) -> None:
        if not self.exit_when_done or self._stop.is_set():
            return
        if all(t.done for t in self.tasks.values()):
            tasks = self.tasks.values()
            self.log(
                ev.DAEMON_ALL_DONE,
                finished=sum(1 for t in tasks if t.record.outcome == FINISHED),
                failed=sum(1 for t in tasks if t.record.outcome == FAILED),
                gave_up=sum(1 for t in tasks if t.gave_up),
            )
            self.request_stop(REASON_ALL_DONE)

    def _crashed(self, exc: BaseException) -> None:
        if isinstance(exc, LeaseLost | StateUnavailable) and self.coordinator is not None:
            # shared state: this replica may not (or could not) write for the task; nothing
            # was emitted; the task comes back, reloaded from the database, if still ours
            self.coordinator.task_lost(exc.task_key or "")
            return
        if isinstance(exc, AuthError):
            if not self.auth_failed:
                self.auth_failed = True
                self.log(
                    ev.API_AUTH_FAILED, ev.CRITICAL, http_status=exc.http_status, hint=ev.AUTH_HINT
                )
            self.request_stop(REASON_AUTH)
            return
        if self._crash is None:
            self._crash = exc
        self.request_stop(REASON_CRASH)

    def _dead_letter(self, sink: Sink, row: OutboxRow, error: str) -> None:
        event = orjson_event(row.body)
        self.log(
            ev.SINK_DELIVERY_FAILED,
            ev.ERROR,
            sink=sink.id,
            task_key=row.task_key or None,
            failed_event=event.get("event"),
            failed_event_id=event.get("event_id"),
            attempts=row.attempts + 1,
            error=error,
        )

    # -- periodic jobs ---------------------------------------------------------------------

    async def _checkpoint(self) -> None:
        if self.store is None:
            return
        counts = [(t.key, t.record.polls) for t in self.tasks.values()]
        for start in range(0, len(counts), CHECKPOINT_CHUNK):
            # poll counts are statistics: if the store is down, the next checkpoint has them
            with contextlib.suppress(StateUnavailable):
                await self.store.checkpoint_polls(counts[start : start + CHECKPOINT_CHUNK])
            await asyncio.sleep(0)  # let due polls start between chunks

    async def _watchdog(self) -> None:
        self._beat = self.clock.monotonic()

    async def _check_config_file(self) -> None:
        if self.config_path is None:
            return
        sig = _file_signature(self.config_path)
        if sig is not None and sig != self._config_sig:
            self._config_sig = sig
            await self.reload()

    # -- reload ----------------------------------------------------------------------------

    def _spawn_reload(self) -> None:
        self._spawn(self.reload())

    async def reload(self) -> None:
        """Re-read the config file and apply the difference; the old config stays on errors."""
        if self.config_path is None or self._stop.is_set():
            return
        self._config_sig = _file_signature(self.config_path)
        try:
            new = load_config(self.config_path)
        except ConfigError as err:
            self.metrics.reloads.labels("failed").inc()
            self.log(ev.CONFIG_RELOAD_FAILED, ev.ERROR, errors=err.problems)
            return
        self.metrics.reloads.labels("ok").inc()
        await self._apply(new)

    async def _apply(self, new: Config) -> None:
        old = self.config
        new_tasks = {t.key: t for t in new.tasks}
        old_keys = self._config_keys
        restart_required = [
            section
            for section in ("api", "state", "admin", "sinks")
            if getattr(old, section) != getattr(new, section)
        ]
        if new.polling != old.polling:
            self._apply_polling(old, new, new_tasks)
        self.config = new
        self._config_tasks = new_tasks
        self._config_keys = set(new_tasks)
        added, removed, changed = [], [], []
        assert self.store is not None
        records = await self.store.load_tasks()
        if self.store.shared and new_tasks.keys() - old_keys:
            await self._register_config_tasks(self.store)  # rows for the new ones, at once
        for key, cfg in new_tasks.items():
            current = self.tasks.get(key)
            if current is None:
                if self.store.shared:
                    if self.coordinator is not None:
                        self.coordinator.notified(key)
                else:
                    self._add(await self._watch_for(cfg, SOURCE_CONFIG, records.get(key)))
                added.append(key)
            elif key not in old_keys or self._differs(current, cfg, new):
                self._update(current, cfg, new)
                current.source = SOURCE_CONFIG
                changed.append(key)
        for key in old_keys - new_tasks.keys():
            task = self.tasks.get(key)
            if task is not None and task.source == SOURCE_CONFIG:
                self._drop(task)
                removed.append(key)
        self._forget_config_tasks()
        self.log(
            ev.CONFIG_RELOADED,
            added=sorted(added),
            removed=sorted(removed),
            changed=sorted(changed),
            restart_required=restart_required,
        )
        self._check_all_done()

    @staticmethod
    def _differs(task: TaskWatch, cfg: TaskConfig, config: Config) -> bool:
        return (
            task.task_id != cfg.task_id
            or task.dataset != cfg.dataset
            or task.labels != cfg.labels
            or task.interval_s != (cfg.interval_seconds or config.polling.interval_seconds)
            or task.deadline_s != cfg.deadline_seconds
        )

    def _apply_polling(self, old: Config, new: Config, new_tasks: dict[str, TaskConfig]) -> None:
        for task in self.tasks.values():
            cfg = new_tasks.get(task.key)
            own = cfg.interval_seconds if cfg is not None else None
            if own is None and task.interval_s == old.polling.interval_seconds:
                task.interval_s = new.polling.interval_seconds
        if self.scheduler is not None:
            self.scheduler.max_in_flight = new.polling.max_concurrency
        if self._poller is not None:
            self._poller.polling = new.polling
        if self._gate is not None:
            self._gate.set_rate(new.polling.max_requests_per_second)

    def _update(self, task: TaskWatch, cfg: TaskConfig, config: Config) -> None:
        task.task_id = cfg.task_id
        task.dataset = cfg.dataset
        task.labels = dict(cfg.labels) if cfg.labels else NO_LABELS
        task.interval_s = cfg.interval_seconds or config.polling.interval_seconds
        task.deadline_s = cfg.deadline_seconds

    def _add(self, task: TaskWatch) -> None:
        self.tasks[task.key] = task
        if not task.done and self.scheduler is not None and not self._stop.is_set():
            self.scheduler.add(task)

    def _drop(self, task: TaskWatch) -> None:
        self.tasks.pop(task.key, None)
        if self.scheduler is not None:
            self.scheduler.remove(task)

    # -- the admin backend -----------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        stalled = self.clock.monotonic() - self._beat
        if self.ready.is_set() and stalled > STALL_LIMIT_S:
            return False, f"the scheduler has not run for {stalled:.0f} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if self.auth_failed:
            return False, "the API rejected the key"
        if self._stop.is_set():
            return False, "shutting down"
        if not self.ready.is_set():
            return False, "starting"
        return True, "ok"

    def metrics_body(self) -> bytes:
        return self.metrics.render()

    async def list_tasks(self) -> list[dict[str, Any]]:
        if self.store is None or not self.store.shared:
            return [self._describe(t) for t in self.tasks.values()]
        # shared state: the whole shared watch list; live details for the tasks polled here
        records = await self.store.load_tasks()
        out = []
        for key, record in sorted(records.items()):
            local = self.tasks.get(key)
            task = local or self.watch_for_record(record)
            if task is None:
                continue
            item = self._describe(task)
            item["polled_here"] = local is not None
            out.append(item)
        return out

    def _describe(self, task: TaskWatch) -> dict[str, Any]:
        rec = task.record
        next_poll = None
        if task.next_due is not None:
            delta = task.next_due - self.clock.monotonic()
            next_poll = ev.rfc3339(self.clock.now() + timedelta(seconds=delta))
        return {
            "task_key": task.key,
            "task_id": task.task_id if task.task_id is not None else rec.seen_task_id,
            "dataset": task.dataset if task.dataset is not None else rec.seen_dataset,
            "labels": task.labels,
            "source": task.source,
            "status": rec.last_status,
            "unknown_status": rec.last_unknown_status,
            "outcome": rec.outcome,
            "polls": rec.polls,
            "consecutive_failures": task.failures,
            "last_error": task.last_error,
            "next_poll_at": next_poll,
            "interval_seconds": task.interval_s,
            "deadline_seconds": task.deadline_s,
            "seq": rec.seq,
        }

    async def add_task(self, entry: object) -> dict[str, Any]:
        cfg = validate_task_entry(entry)
        assert self.store is not None
        records = await self.store.load_tasks()
        if cfg.key in self.tasks or (self.store.shared and cfg.key in records):
            raise TaskExists(f"the task {cfg.key} is already watched")
        spec = cfg.model_dump(mode="json", exclude_none=True)
        task = await self._watch_for(cfg, SOURCE_API, records.get(cfg.key))
        await self.store.set_task_spec(cfg.key, spec)
        task.record.spec = spec
        if not self.store.shared:
            self._add(task)
        elif self.coordinator is not None:
            self.coordinator.notified(cfg.key)
        return self._describe(task)

    async def remove_task(self, task_key: str) -> bool:
        assert self.store is not None
        task = self.tasks.get(task_key)
        if self.store.shared:
            if task is None and task_key not in await self.store.load_tasks():
                return False
            await self.store.set_task_spec(task_key, None)
            if task is not None:
                self._drop(task)
            return True
        if task is None:
            return False
        self._drop(task)
        if task.source == SOURCE_API:
            await self.store.set_task_spec(task_key, None)
        self._check_all_done()
        return True


def _replication_stats(store: Store) -> Any:
    if not isinstance(store, PgStore):
        return None
    return lambda: {
        **store.leases.stats(),
        "fenced": store.fenced,
        "conflicts": store.conflicts,
        "commits": store.commits + store.leases.commits,
    }


def orjson_event(body: bytes) -> Mapping[str, Any]:
    """A journaled event body, or an empty mapping if it is not an object."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


async def fetch_status(
    config: Config, api_key: str, task_id: str | None, dataset: str | None
) -> Observation:
    """One request for `status`: an Observation or a typed error."""
    gate = RequestGate(0)
    async with ApiClient(
        config.api.base_url, api_key, config.api.timeout_seconds, gate, 1
    ) as client:
        return await client.get_task(task_id, dataset)


def status_exit_code(err: EnkwatchError) -> int:
    """CONTRACT §6 for `status`."""
    if isinstance(err, AuthError | UnauthorizedAnswer):
        return EXIT_AUTH
    if isinstance(err, NotFound):
        return EXIT_GAVE_UP
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    return EXIT_UNREACHABLE


__all__ = ["Service", "exit_code", "fetch_status", "status_exit_code"]
