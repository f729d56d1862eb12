"""Assembly only: each component starts in an AsyncExitStack and registers its cleanup;
`run()` serves until stopped, tears down in reverse, returns an `Outcome` for cli.py."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import uuid
from collections.abc import Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass
from typing import Any, Final

from enkwatch import __version__
from enkwatch import events as ev
from enkwatch.admin import AdminView, serve_admin
from enkwatch.client import ApiClient
from enkwatch.clock import Clock, SystemClock
from enkwatch.config import Config
from enkwatch.delivery import Deliveries, open_deliveries
from enkwatch.discovery import Discoverer
from enkwatch.errors import ConfigError
from enkwatch.events import EventWriter
from enkwatch.health import WATCHDOG_EVERY_S, Health, Outcome, StopReason, tune_gc
from enkwatch.limits import RequestGate
from enkwatch.livefeed import EventFeed
from enkwatch.metrics import Metrics, StateGauges
from enkwatch.output import Lines
from enkwatch.ownership import Owner, choose_owner
from enkwatch.schedule import PollScheduler, StallTimer, Timers, follow_polling
from enkwatch.sinks import Sink, sink_secrets
from enkwatch.state import open_store
from enkwatch.state.base import StateError, Store
from enkwatch.watch import LOST, AuthRejected, Poller, PollResult, TaskWatch
from enkwatch.watchlist import WatchList

MAX_DRAIN_S: Final = 5.0  # Docker gives 10 s between SIGTERM and SIGKILL: drain polls in 5
OUTBOX_FLUSH_S: Final = 10.0  # --exit-when-done: the longest wait for the outbox to empty
CHECKPOINT_EVERY_S: Final = 60.0  # poll counts (statistics: every event stores them too)
CONFIG_CHECK_EVERY_S: Final = 2.0
STDOUT_FLUSH_S: Final = 1.5  # at the end, the longest wait for lines of a stalled reader


@dataclass(frozen=True, slots=True)
class Running:
    """The assembled pieces of a running service (tests and the benchmark look at them)."""

    store: Store
    owner: Owner
    writer: EventWriter
    scheduler: PollScheduler
    watchlist: WatchList
    gate: RequestGate
    outbox: Deliveries
    timers: Timers


class Service:
    """The daemon's assembly and lifecycle."""

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
        self.config = config
        self._api_key = api_key
        self.exit_when_done = exit_when_done
        self.config_path = config_path
        self._sinks = list(sinks)
        self._admin_token = admin_token
        self.clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._tune_gc = gc_tuning
        self.metrics = Metrics(self.clock, replicas=config.state.shared)
        self.feed = EventFeed()  # the admin app's live event stream (GET /events)
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.health = Health(self.clock)
        self.ready = self.health.ready
        self.admin_port: int | None = None
        self.running: Running | None = None
        self._stop = asyncio.Event()
        self._reason = StopReason.STOP_REQUESTED
        self._reason_text = StopReason.STOP_REQUESTED.value
        self._crash: BaseException | None = None
        self._reloads: set[asyncio.Task[None]] = set()

    def request_stop(
        self, reason: StopReason = StopReason.STOP_REQUESTED, text: str | None = None
    ) -> None:
        """Begin an orderly shutdown (idempotent: the first reason wins)."""
        if not self._stop.is_set():
            self._reason, self._reason_text = reason, text or reason.value
            self.health.stopping = True
            self._stop.set()

    async def run(self, install_signals: bool = True) -> Outcome:
        """Run until stopped (or, with exit_when_done, until every task is done)."""
        async with AsyncExitStack() as stack:
            if install_signals:
                self._install_signals(stack)
            parts = await self._assemble(stack)
            await self._serve(stack, parts)
        if self._crash is not None:
            raise self._crash
        counts = parts.watchlist.outcomes() if self._reason == StopReason.ALL_DONE else {}
        problem = self._reason_text if self._reason == StopReason.STDOUT_UNUSABLE else None
        return Outcome(self._reason, self.health.auth_failed, **counts, problem=problem)

    def _install_signals(self, stack: AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        handlers: list[tuple[signal.Signals, Any, tuple[Any, ...]]] = [
            (signal.SIGTERM, self.request_stop, (StopReason.SIGNAL, "signal:SIGTERM")),
            (signal.SIGINT, self.request_stop, (StopReason.SIGNAL, "signal:SIGINT")),
        ]
        if hasattr(signal, "SIGHUP"):
            handlers.append((signal.SIGHUP, self._reload_soon, ()))
        for sig, handler, args in handlers:
            with suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler, *args)
                stack.callback(loop.remove_signal_handler, sig)

    def _reload_soon(self) -> None:
        if self.running is not None:
            # kept until done (a bug in it is reported by asyncio, as before, never hidden)
            job = asyncio.ensure_future(self.running.watchlist.reload())
            self._reloads.add(job)
            job.add_done_callback(self._reloads.discard)

    async def _open_store(self, stack: AsyncExitStack) -> Store:
        state = self.config.state
        try:
            store = open_store(
                state.path, self.clock, self.replica_id, state.lease_seconds,
                on_takeover=self.metrics.observe_takeover,
            )  # fmt: skip
            await store.open()
        except StateError as err:
            raise ConfigError([f"state.path: {err}"]) from None
        stack.push_async_callback(store.close)
        if state.shared and self.exit_when_done:
            raise ConfigError(
                ["--exit-when-done: not with a shared (postgresql://) state; replicas serve"]
            )
        return store

    def _open_stdout(self, stack: AsyncExitStack) -> Lines:
        # after the store, so closed before it: the last confirmations are committed
        unusable = StopReason.STDOUT_UNUSABLE
        out = ev.open_lines(self.clock, lambda err: self.request_stop(unusable, str(err)))
        stack.push_async_callback(out.close, STDOUT_FLUSH_S)
        self.health.stdout_stalled_s = out.stalled_s
        self.metrics.watch_stdout(out)
        return out

    async def _assemble(self, stack: AsyncExitStack) -> Running:
        store = await self._open_store(stack)
        out = self._open_stdout(stack)
        outbox = open_deliveries(
            store, self.config.state.path, self._sinks, self.clock,
            lambda sink, outcome, n: self.metrics.deliveries.labels(sink, outcome).inc(n),
            lambda f: writer.delivery_failed(f), lambda f: writer.sink_disabled(f),
            self.metrics.delivery_restarts.inc, self.config.sinks.delivery == "inline",
            rng=self._rng,
        )  # fmt: skip
        writer = EventWriter(
            self.clock, store, (self.metrics.observe_event, self.feed.publish),
            outbox.sinks_for, outbox.notify,
            out=out, secrets=[self._api_key, self._admin_token, *sink_secrets(self._sinks)],
        )  # fmt: skip
        owner = choose_owner(store, writer, self.clock, outbox.notify)
        polling = self.config.polling
        gate = RequestGate(polling.max_requests_per_second, self.clock)
        client = await stack.enter_async_context(
            ApiClient(
                self.config.api.base_url, self._api_key, self.config.api.timeout_seconds, gate,
                pool_size=polling.max_concurrency, clock=self.clock,
            )
        )  # fmt: skip
        poller = Poller(
            client, writer, self.clock, polling, self._rng,
            may_poll=owner.may_poll, observe_poll=self.metrics.observe_poll,
        )  # fmt: skip
        timers = Timers(self.clock, lambda _: self.metrics.clock_steps.inc())
        timers.start()
        stack.callback(timers.shutdown)
        sched = PollScheduler(
            poller.poll, self.clock, polling.max_concurrency,
            on_task_done=lambda task: self._check_all_done(watchlist),
            on_crash=self._crashed, paused_for=gate.pause_remaining,
            on_end=lambda task, result: self._poll_ended(owner, writer, task, result),
            wakeup=timers.wakeup, expire=poller.expire,
            stalls=StallTimer(poller, self.clock, timers.stall_wakeup),
        )  # fmt: skip
        watchlist = WatchList(
            self.config, store, owner, sched, writer, self.clock, self.config_path,
            on_change=lambda: self._check_all_done(watchlist), on_sinks=outbox.reconfigure,
            on_polling=lambda new: follow_polling(new.polling, sched, poller, gate),
        )  # fmt: skip
        await owner.load(watchlist)
        # a sole owner's list let go of the task entries (~640 B each): not kept here either
        self.config = watchlist.config
        self.metrics.registry.register(StateGauges(
            self.clock, lambda: watchlist.tasks.values(), gate,
            lambda: len(sched.in_flight), outbox.stats, owner.stats,
        ))  # fmt: skip
        await outbox.start()
        stack.push_async_callback(outbox.close)
        self.running = Running(store, owner, writer, sched, watchlist, gate, outbox, timers)
        await self._start_jobs(stack, timers, owner, watchlist)
        if self.config.discover:  # sweeps start now; their first request comes after this
            self._discover(stack, client, self.running)
        return self.running

    def _discover(self, stack: AsyncExitStack, client: ApiClient, parts: Running) -> None:
        owner, writer = parts.owner, parts.writer
        finder = Discoverer(self.config, client, parts.watchlist, writer, owner.may_poll, self._rng)
        finder.on_auth_failed = lambda s: self._poll_ended(owner, writer, None, AuthRejected(s))
        finder.observe = self.metrics.observe_discovery
        stack.push_async_callback(finder.start(parts.timers))

    async def _start_jobs(
        self, stack: AsyncExitStack, timers: Timers, owner: Owner, watchlist: WatchList
    ) -> None:
        timers.every(CHECKPOINT_EVERY_S, watchlist.checkpoint, "checkpoint")
        timers.every(WATCHDOG_EVERY_S, self.health.watchdog, "watchdog")
        await owner.start(timers)
        if self.config_path:
            timers.every(CONFIG_CHECK_EVERY_S, watchlist.check_config_file, "config-watch")
        if (listen := self.config.admin.host_port) is not None:
            h = self.health
            view = AdminView(h.health, h.readiness, self.metrics.render, watchlist)
            self.admin_port = await serve_admin(
                stack, view, self._admin_token, self.feed, str(self.config.admin.listen), listen,
                self.clock,
            )  # fmt: skip

    async def _serve(self, stack: AsyncExitStack, parts: Running) -> None:
        if self._tune_gc:
            tune_gc()
        writer, sched, watchlist = parts.writer, parts.scheduler, parts.watchlist
        writer.daemon_event(ev.DAEMON_STARTED, version=__version__, tasks=len(watchlist.tasks))
        watchlist.start_polling()
        self.ready.set()
        self._check_all_done(watchlist)
        await self._stop.wait()
        reason = self._reason_text
        writer.daemon_event(ev.DAEMON_STOPPING, reason=reason)
        sched.stop()
        parts.timers.pause()  # no housekeeping job starts during the drain
        writer.release()  # polls wait neither for a stalled reader nor a commit window
        watchlist.stopped = True
        parts.gate.close()  # polls still waiting for the rate limit or a pause send nothing
        cancelled = await sched.drain(min(self.config.api.timeout_seconds, MAX_DRAIN_S))
        await watchlist.checkpoint()
        await parts.owner.stop()
        if self._reason == StopReason.ALL_DONE:
            await parts.outbox.wait_idle(OUTBOX_FLUSH_S)
        writer.cancel_pending()
        stopped: dict[str, Any] = {"reason": reason, "cancelled_polls": cancelled}
        stack.callback(writer.daemon_event, ev.DAEMON_STOPPED, **stopped)

    def _check_all_done(self, watchlist: WatchList) -> None:
        if not self.exit_when_done or self._stop.is_set():
            return
        if watchlist.all_done():
            assert self.running is not None
            self.running.writer.daemon_event(ev.DAEMON_ALL_DONE, ev.INFO, **watchlist.outcomes())
            self.request_stop(StopReason.ALL_DONE)

    def _poll_ended(
        self, owner: Owner, writer: EventWriter, task: TaskWatch | None, result: PollResult
    ) -> None:
        if result is LOST and task is not None:
            owner.lost(task.key)
        elif isinstance(result, AuthRejected):
            if not self.health.auth_failed:
                self.health.auth_failed = True
                writer.daemon_event(
                    ev.API_AUTH_FAILED, ev.CRITICAL,
                    http_status=result.http_status, hint=ev.AUTH_HINT,
                )  # fmt: skip
            self.request_stop(StopReason.AUTH_FAILED)

    def _crashed(self, exc: BaseException) -> None:
        if self._crash is None:
            self._crash = exc
        self.request_stop(StopReason.CRASH)
