"""Webhook sinks: signed JSON POSTs delivered at least once, in order per task, from an outbox.

The outbox lives in the state database and is written in the same transaction as the event
(see `Store.record_event`), so an event that was emitted is delivered even if the process is
killed right after. Each sink is drained by one loop: the oldest pending delivery of every
task is sent (several tasks at once), a failure is retried with exponential backoff and
blocks only the later deliveries of the same task, and a delivery older than the sink's
`max_age_seconds` is dead-lettered with a `sink.delivery_failed` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import orjson

from enkwatch import __version__
from enkwatch.bodies import read_prefix
from enkwatch.clock import Clock
from enkwatch.config import SinksConfig, WebhookConfig
from enkwatch.errors import ConfigError, StateUnavailable
from enkwatch.state.base import OutboxRow, OutboxStore

SIGNATURE_HEADER: Final = "X-Enkwatch-Signature"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
MAX_PARALLEL_PER_SINK: Final = 8
RETRY_BASE_S: Final = 1.0
RETRY_MAX_S: Final = 300.0
IDLE_RECHECK_S: Final = 5.0
# the most of a receiver's answer ever read (decoded); more closes the connection instead
MAX_ANSWER_READ_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class Sink:
    """A configured webhook, its secret resolved."""

    id: str
    url: str
    secret: bytes | None
    events: frozenset[str]
    timeout_s: float
    max_age_s: float

    def wants(self, event: str) -> bool:
        return "*" in self.events or event in self.events


def sink_id(cfg: WebhookConfig) -> str:
    """A stable name for a sink that does not reveal its URL (URLs often embed tokens)."""
    if cfg.name:
        return cfg.name
    return "webhook-" + hashlib.sha256(cfg.url.encode()).hexdigest()[:10]


def build_sinks(config: SinksConfig, environ: Mapping[str, str]) -> list[Sink]:
    """Resolve each webhook's secret from the environment; ConfigError naming what is missing."""
    problems = []
    sinks = []
    for i, hook in enumerate(config.webhooks):
        secret: bytes | None = None
        if hook.secret_env is not None:
            value = environ.get(hook.secret_env, "")
            if not value:
                problems.append(
                    f"sinks.webhooks[{i}].secret_env: the variable {hook.secret_env} is not set"
                )
            secret = value.encode()
        sinks.append(
            Sink(
                id=sink_id(hook),
                url=hook.url,
                secret=secret,
                events=frozenset(hook.events),
                timeout_s=hook.timeout_seconds,
                max_age_s=hook.max_age_seconds,
            )
        )
    if problems:
        raise ConfigError(problems)
    return sinks


def sink_secrets(sinks: Sequence[Sink]) -> list[str]:
    """The sinks' secrets, as text (redacted wherever they would show)."""
    return [s.secret.decode("utf-8", "replace") for s in sinks if s.secret]


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """`t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">`."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class Outbox:
    """Drains the outbox of every sink until stopped."""

    def __init__(
        self,
        store: OutboxStore,
        sinks: Sequence[Sink],
        clock: Clock,
        on_result: Callable[[Sink, str], None] = lambda s, o: None,
        on_dead: Callable[[Sink, OutboxRow, str], None] = lambda s, r, e: None,
        rng: random.Random | None = None,
        retry_base_s: float = RETRY_BASE_S,
    ) -> None:
        self._retry_base_s = retry_base_s
        self._store = store
        self.sinks = list(sinks)
        self._clock = clock
        self._on_result = on_result
        self._on_dead = on_dead
        self._rng = rng or random.Random()
        self._wake = {s.id: asyncio.Event() for s in self.sinks}
        self._session: aiohttp.ClientSession | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.idle = {s.id: asyncio.Event() for s in self.sinks}

    def sinks_for(self, event: str) -> list[str]:
        """The ids of the sinks that take this event."""
        return [s.id for s in self.sinks if s.wants(event)]

    def notify(self) -> None:
        """New rows were written: look again now."""
        for wake in self._wake.values():
            wake.set()

    async def start(self) -> None:
        if not self.sinks:
            return
        self._session = aiohttp.ClientSession(
            headers={"User-Agent": f"enkwatch/{__version__}", "Content-Type": "application/json"},
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._workers = [asyncio.ensure_future(self._drain(s)) for s in self.sinks]

    async def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        # the workers' CancelledError are results here; our own cancellation still propagates
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no sink has a pending delivery (True) or the timeout passes (False)."""
        if not self.sinks:
            return True
        self.notify()
        try:
            async with asyncio.timeout(timeout_s):
                for sink in self.sinks:
                    await self.idle[sink.id].wait()
        except TimeoutError:
            return False
        return True

    async def _drain(self, sink: Sink) -> None:
        wake = self._wake[sink.id]
        idle = self.idle[sink.id]
        while True:
            wake.clear()
            try:
                rows = await self._store.pending_deliveries(sink.id, limit=1000)
            except StateUnavailable:
                # the shared state is down: the rows wait there; look again a little later
                await self._sleep_or_wake(wake, IDLE_RECHECK_S)
                continue
            if not rows:
                idle.set()
                await self._sleep_or_wake(wake, IDLE_RECHECK_S)
                continue
            idle.clear()
            now = self._clock.now().timestamp()
            heads: dict[str, OutboxRow] = {}
            for row in rows:
                heads.setdefault(row.task_key, row)
            due = [r for r in heads.values() if r.next_attempt_at <= now]
            if due:
                sem = asyncio.Semaphore(MAX_PARALLEL_PER_SINK)
                await asyncio.gather(*(self._deliver_one(sink, row, sem) for row in due))
                continue
            soonest = min(r.next_attempt_at for r in heads.values())
            await self._sleep_or_wake(wake, min(IDLE_RECHECK_S, max(0.01, soonest - now)))

    async def _sleep_or_wake(self, wake: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await wake.wait()
        except TimeoutError:
            pass

    async def _deliver_one(self, sink: Sink, row: OutboxRow, sem: asyncio.Semaphore) -> None:
        # the state is down: delivered or not, the row stays pending and goes again (at least once)
        with contextlib.suppress(StateUnavailable):
            await self._deliver(sink, row, sem)

    async def _deliver(self, sink: Sink, row: OutboxRow, sem: asyncio.Semaphore) -> None:
        async with sem:
            error = await self._post(sink, row)
        if error is None:
            await self._store.delivery_done(row.id)
            self._on_result(sink, "delivered")
            return
        now = self._clock.now().timestamp()
        if now - row.created_at >= sink.max_age_s:
            await self._store.delivery_dead(row.id)
            self._on_result(sink, "dead_lettered")
            self._on_dead(sink, row, error)
            return
        attempts = row.attempts + 1
        ceiling = min(RETRY_MAX_S, self._retry_base_s * 2.0 ** min(attempts, 20))
        delay = max(ceiling / 10, self._rng.uniform(0, ceiling))
        await self._store.delivery_retry(row.id, attempts, now + delay)
        self._on_result(sink, "failed")

    async def _post(self, sink: Sink, row: OutboxRow) -> str | None:
        """None when the receiver answered 2xx; else a short reason (never the URL)."""
        assert self._session is not None
        headers = {}
        event_id = _event_id(row.body)
        if event_id is not None:
            headers[IDEMPOTENCY_HEADER] = event_id
        if sink.secret is not None:
            headers[SIGNATURE_HEADER] = signature(
                sink.secret, int(self._clock.now().timestamp()), row.body
            )
        try:
            async with self._session.post(
                sink.url,
                data=row.body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=sink.timeout_s),
            ) as resp:
                # only the status matters: a short answer is read (keep-alive), never a long one
                await read_prefix(resp, MAX_ANSWER_READ_BYTES)
                if 200 <= resp.status < 300:
                    return None
                return f"HTTP {resp.status}"
        except TimeoutError:
            return "timeout"
        except aiohttp.ClientError as err:
            return f"connection: {type(err).__name__}"


def dead_letter_fields(sink: Sink, row: OutboxRow, error: str) -> dict[str, Any]:
    """The fields of the sink.delivery_failed event of a delivery given up."""
    try:
        event = orjson.loads(row.body)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        event = {}
    return {
        "sink": sink.id,
        "task_key": row.task_key or None,
        "failed_event": event.get("event"),
        "failed_event_id": event.get("event_id"),
        "attempts": row.attempts + 1,
        "error": error,
    }


def _event_id(body: bytes) -> str | None:
    try:
        value = orjson.loads(body).get("event_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None
