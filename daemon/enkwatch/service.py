"""Assembling the daemon: start-up, the run, and ordered shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
from collections.abc import Iterable
from contextlib import AsyncExitStack
from typing import Final

from enkwatch import __version__
from enkwatch import events as ev
from enkwatch.client import ApiClient, RequestGate
from enkwatch.clock import Clock, SystemClock
from enkwatch.config import Config
from enkwatch.errors import AuthError, ConfigError, EnkwatchError, NotFound, UnauthorizedAnswer
from enkwatch.models import FAILED, FINISHED, Observation
from enkwatch.schedule import ApschedulerWakeup, PollScheduler, make_apscheduler
from enkwatch.store import StateError, Store, TaskRecord, open_store
from enkwatch.watch import Poller, TaskWatch

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_GAVE_UP: Final = 3
EXIT_AUTH: Final = 4
EXIT_UNREACHABLE: Final = 5

# Docker gives 10 s between SIGTERM and SIGKILL: drain in-flight polls for at most this long
MAX_DRAIN_S: Final = 5.0
CHECKPOINT_EVERY_S: Final = 10.0

REASON_SIGNAL: Final = "signal"
REASON_ALL_DONE: Final = "all_done"
REASON_AUTH: Final = "auth_failed"
REASON_CRASH: Final = "internal_error"
REASON_STOP: Final = "stop_requested"


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


class Service:
    """The daemon: owns the store, the HTTP session, the schedulers, and their lifecycle."""

    def __init__(
        self,
        config: Config,
        api_key: str,
        *,
        exit_when_done: bool = False,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self._api_key = api_key
        self.exit_when_done = exit_when_done
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self.tasks: dict[str, TaskWatch] = {}
        self.auth_failed = False
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._stop_reason = REASON_STOP
        self._crash: BaseException | None = None
        self.scheduler: PollScheduler | None = None
        self.store: Store | None = None

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
                store = open_store(self.config.state.path)
            except StateError as err:
                raise ConfigError([f"state.path: {err}"]) from None
            self.store = store
            stack.callback(store.close)
            self._replay(store)
            self._load_tasks(store)

            polling = self.config.polling
            gate = RequestGate(polling.max_requests_per_second, self.clock)
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
            sched = PollScheduler(
                poller.poll,
                self.clock,
                polling.max_concurrency,
                on_task_done=self._task_done,
                on_crash=self._crashed,
                paused_for=gate.pause_remaining,
            )
            self.scheduler = sched
            aps = make_apscheduler()
            aps.start()
            stack.callback(aps.shutdown, wait=False)
            sched.wakeup = ApschedulerWakeup(aps, sched, self.clock)
            aps.add_job(
                self._checkpoint, "interval", seconds=CHECKPOINT_EVERY_S, id="enkwatch-checkpoint"
            )

            ev.log(ev.DAEMON_STARTED, version=__version__, tasks=len(self.tasks))
            for task in self.tasks.values():
                if not task.done:
                    sched.add(task)
            self.ready.set()
            self._check_all_done()

            await self._stop.wait()
            reason = self._stop_reason
            ev.log(ev.DAEMON_STOPPING, reason=reason)
            sched.stop()
            aps.pause()
            cancelled = await sched.drain(min(self.config.api.timeout_seconds, MAX_DRAIN_S))
            self._checkpoint_now()
            stack.push_async_callback(self._log_stopped, reason, cancelled)
        if self._crash is not None:
            raise self._crash
        if reason.startswith(REASON_SIGNAL) or reason == REASON_STOP:
            return EXIT_AUTH if self.auth_failed else EXIT_OK
        return exit_code(self.tasks.values(), self.auth_failed)

    async def _log_stopped(self, reason: str, cancelled: int) -> None:
        ev.log(ev.DAEMON_STOPPED, reason=reason, cancelled_polls=cancelled)

    def _replay(self, store: Store) -> None:
        """Write again every event that was journaled but not confirmed written."""
        for item in store.unwritten_events():
            ev.emit(item.body)
            store.mark_written(item.task_key, item.seq)

    def _load_tasks(self, store: Store) -> None:
        records = store.load_tasks()
        now = self.clock.now().timestamp()
        for cfg in self.config.tasks:
            record = records.get(cfg.key)
            if record is None:
                record = TaskRecord(cfg.key, cfg.task_id, cfg.dataset, watch_started_at=now)
                store.add_task(record)
            self.tasks[cfg.key] = TaskWatch.from_config(cfg, self.config.polling, record)

    # -- callbacks from the scheduler ------------------------------------------------------

    def _task_done(self, task: TaskWatch) -> None:
        self._check_all_done()

    def _check_all_done(self) -> None:
        if not self.exit_when_done or self._stop.is_set():
            return
        if all(t.done for t in self.tasks.values()):
            tasks = self.tasks.values()
            ev.log(
                ev.DAEMON_ALL_DONE,
                finished=sum(1 for t in tasks if t.record.outcome == FINISHED),
                failed=sum(1 for t in tasks if t.record.outcome == FAILED),
                gave_up=sum(1 for t in tasks if t.gave_up),
            )
            self.request_stop(REASON_ALL_DONE)

    def _crashed(self, exc: BaseException) -> None:
        if isinstance(exc, AuthError):
            if not self.auth_failed:
                self.auth_failed = True
                ev.log(
                    ev.API_AUTH_FAILED,
                    ev.CRITICAL,
                    http_status=exc.http_status,
                    hint=ev.AUTH_HINT,
                )
            self.request_stop(REASON_AUTH)
            return
        if self._crash is None:
            self._crash = exc
        self.request_stop(REASON_CRASH)

    async def _checkpoint(self) -> None:
        self._checkpoint_now()

    def _checkpoint_now(self) -> None:
        if self.store is not None:
            self.store.checkpoint_polls((t.key, t.record.polls) for t in self.tasks.values())


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
