"""Webhook sinks: signed POSTs delivered at least once, in order per task, from an outbox.

The outbox lives in the state database and is written in the same transaction as the event
(see `Store.record_event`), so an event that was emitted is delivered even if the process is
killed right after. Each sink is drained by one loop, in rounds: the head of each task's
queue (its oldest pending delivery; the rows behind it are not read) is sent, several tasks
at once, and the rows delivered in the round are deleted by one statement before the next
round reads the heads again. A failure is retried with exponential backoff and blocks only
the later deliveries of the same task, and a delivery older than the sink's
`max_age_seconds` is dead-lettered with a `sink.delivery_failed` event. An idle loop waits
to be woken (a new row, a reload; on PostgreSQL also the lease loop while rows wait, such
as those of a partition taken over), never on a timer. A paused loop sleeps until its pause
ends, and one whose heads all wait for a retry until the soonest is due (at most RECHECK_S):
a new row wakes neither, unless it is of a task with no head waiting (it may be due now).

An event's rows for several sinks hold the same bytes: it is parsed once, and rendered
once per format for the sinks that share one (caches by body and format, of at most 4,096
entries and 4 MiB each, so that big events cannot make them hold hundreds of MB).

Every POST carries the Standard Webhooks headers (`webhook-id`, `webhook-timestamp`,
`webhook-signature` with one `v1,<base64>` per active secret) and, for `secret_env`, the
deprecated `X-Enkwatch-Signature`. What a receiver answers steers its sink alone: a 410
Gone disables it (remembered in the state until its config changes), a 429/502/503/504
pauses it (for `Retry-After` when given), a redirect is a failure and is not followed.
The body is rendered by the sink's format (`formats`) at delivery time, from the journaled
event: secrets and routing keys are never stored with it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import random
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import aiohttp
import orjson

from enkwatch import __version__
from enkwatch.bodies import read_prefix
from enkwatch.client import parse_retry_after
from enkwatch.clock import Clock
from enkwatch.config import SecretSource, SinksConfig, WebhookConfig, read_key_file
from enkwatch.errors import ConfigError, StateUnavailable
from enkwatch.formats import Format, FormatError, JsonFormat, Payload, build_format, message_id
from enkwatch.state.base import OutboxRow, OutboxStore

SIGNATURE_HEADER: Final = "X-Enkwatch-Signature"  # deprecated: Standard Webhooks replace it
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
WEBHOOK_ID: Final = "webhook-id"
WEBHOOK_TIMESTAMP: Final = "webhook-timestamp"
WEBHOOK_SIGNATURE: Final = "webhook-signature"
SECRET_PREFIX: Final = "whsec_"
# the Standard Webhooks spec asks for secrets of 24 to 64 random bytes
SECRET_MIN_BYTES: Final = 24
SECRET_MAX_BYTES: Final = 64
MAX_PARALLEL_PER_SINK: Final = 8
# the most queue heads (tasks) one round of a sink reads and sends, the soonest due first
HEADS_PER_ROUND: Final = 1000
RETRY_BASE_S: Final = 1.0
RETRY_MAX_S: Final = 300.0
# the longest a sink waits before it looks again while it has pending rows (a retry not yet
# due, a pause) or while the state is down; an idle sink waits to be woken, never on a timer
RECHECK_S: Final = 5.0
# a busy sink starts a round at most this often: the rows of several polls go in one round
# (one read of the heads, one delete), for at most this much more latency
ROUND_EVERY_S: Final = 0.01
# events parsed and payloads rendered, remembered for the other sinks of the same event: at
# most this many of each, and this many bytes of each (big events, a template's big bodies)
RENDER_CACHE_MAX: Final = 4096
RENDER_CACHE_MAX_BYTES: Final = 4 * 1024 * 1024
USER_AGENT: Final = f"enkwatch/{__version__}"
# the most of a receiver's answer ever read (decoded); more closes the connection instead
MAX_ANSWER_READ_BYTES: Final = 1024
GONE: Final = 410
# answers that ask the sender to slow down: the whole sink pauses
SLOW_DOWN: Final = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Sink:
    """A configured webhook: its filters, its format, its secrets resolved."""

    id: str
    url: str
    secret: bytes | None  # `secret_env`: signs X-Enkwatch-Signature (and webhook-signature)
    events: frozenset[str]
    timeout_s: float
    max_age_s: float
    signing_keys: tuple[bytes, ...] = ()  # every active Standard Webhooks key
    statuses: frozenset[str] = frozenset()  # casefolded; empty: any
    kinds: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()
    format: Format = field(default_factory=JsonFormat)
    fingerprint: str = ""  # of its config: a disabled sink whose config changed is enabled
    # the secrets and routing key as written (whsec_...): redacted wherever they would show
    secret_texts: tuple[str, ...] = ()
    # what it was built from (its format is built again from them in the delivery process)
    hook: WebhookConfig | None = field(default=None, compare=False)
    routing_key: str | None = field(default=None, compare=False)

    def wants(self, event: Mapping[str, Any]) -> bool:
        """True when this sink takes the event: every filter passes and the format sends it."""
        if "*" not in self.events and event.get("event") not in self.events:
            return False
        if event.get("task_key"):
            # the task filters; an event not about a task is selected by its name alone
            status = event.get("status")
            if self.statuses and status is not None and str(status).casefold() not in self.statuses:
                return False
            if self.kinds and (event.get("kind") or "dataset") not in self.kinds:
                return False
            if self.labels:
                labels = event.get("labels") or {}
                if any(labels.get(k) != v for k, v in self.labels):
                    return False
        return self.format.accepts(event)


def sink_id(cfg: WebhookConfig) -> str:
    """A stable name for a sink that does not reveal its URL (URLs often embed tokens)."""
    if cfg.name:
        return cfg.name
    return "webhook-" + hashlib.sha256(cfg.url.encode()).hexdigest()[:10]


def fingerprint(cfg: WebhookConfig) -> str:
    """A digest of a sink's config (names of variables and files, never their values)."""
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:16]


def _read_source(src: SecretSource, where: str, environ: Mapping[str, str]) -> str:
    """The text of a variable or a file; ConfigError naming it (never its value)."""
    if src.env is not None:
        value = environ.get(src.env, "").strip()
        if not value:
            raise ConfigError([f"{where}.env: the variable {src.env} is not set"])
        return value
    assert src.file is not None
    # a regular file of at most 64 KiB (not a FIFO, a device): as the API key file
    return read_key_file(src.file, f"{where}.file")


def signing_key(secret: str) -> bytes:
    """The key of a `whsec_<base64>` secret; ValueError saying what is wrong (not the value)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a secret must be written {SECRET_PREFIX}<base64>")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"a secret must be written {SECRET_PREFIX}<base64>: not base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(
            f"a secret must hold {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes, not {len(key)}"
        )
    return key


def _legacy_key(secret: bytes) -> bytes:
    # a `secret_env` written whsec_...: the key it stands for; any other: its own bytes
    with contextlib.suppress(ValueError):
        return signing_key(secret.decode())
    return secret


def _build_sink(i: int, hook: WebhookConfig, environ: Mapping[str, str]) -> Sink:
    where = f"sinks.webhooks[{i}]"
    problems: list[str] = []
    secret: bytes | None = None
    if hook.secret_env is not None:
        value = environ.get(hook.secret_env, "")
        if not value:
            problems.append(f"{where}.secret_env: the variable {hook.secret_env} is not set")
        secret = value.encode()
    keys = [_legacy_key(secret)] if secret else []
    texts: list[str] = []
    for j, src in enumerate(hook.secrets):
        try:
            for word in _read_source(src, f"{where}.secrets[{j}]", environ).split():
                texts.append(word)
                keys.append(signing_key(word))
        except ConfigError as err:
            problems += err.problems
        except ValueError as err:
            origin = f"the variable {src.env}" if src.env else f"the file {src.file}"
            problems.append(f"{where}.secrets[{j}]: {origin}: {err} (the value was not shown)")
    routing_key = None
    if hook.routing_key is not None:
        try:
            routing_key = _read_source(hook.routing_key, f"{where}.routing_key", environ)
            texts.append(routing_key)
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return Sink(
        id=sink_id(hook),
        url=hook.url,
        secret=secret,
        events=frozenset(hook.events),
        timeout_s=hook.timeout_seconds,
        max_age_s=hook.max_age_seconds,
        signing_keys=tuple(dict.fromkeys(keys)),
        statuses=frozenset(s.casefold() for s in hook.statuses),
        kinds=frozenset(hook.kinds),
        labels=tuple(sorted(hook.labels.items())),
        format=build_format(hook, routing_key),
        fingerprint=fingerprint(hook),
        secret_texts=tuple(texts),
        hook=hook,
        routing_key=routing_key,
    )


def build_sinks(config: SinksConfig, environ: Mapping[str, str]) -> list[Sink]:
    """Resolve each webhook's secrets and routing key; ConfigError naming all that is missing."""
    problems = []
    sinks = []
    for i, hook in enumerate(config.webhooks):
        try:
            sinks.append(_build_sink(i, hook, environ))
        except ConfigError as err:
            problems += err.problems
    if problems:
        raise ConfigError(problems)
    return sinks


def sink_secrets(sinks: Sequence[Sink]) -> list[str]:
    """The sinks' secrets and routing keys, as text (redacted wherever they would show)."""
    legacy = [s.secret.decode("utf-8", "replace") for s in sinks if s.secret]
    return legacy + [text for s in sinks for text in s.secret_texts]


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """`t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">` (X-Enkwatch-Signature, deprecated)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def standard_signature(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` per key, space-separated."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


@dataclass(frozen=True, slots=True)
class _Lane:
    """What every delivery of one sink reuses, built once per config of the sink."""

    sink: Sink
    timeout: aiohttp.ClientTimeout

    @classmethod
    def of(cls, sink: Sink) -> _Lane:
        return cls(sink, aiohttp.ClientTimeout(total=sink.timeout_s))

    def headers(
        self, content_type: str, body: bytes, msg_id: str, timestamp: int
    ) -> dict[str, str]:
        """The headers of one POST: Standard Webhooks (and the deprecated signature)."""
        stamp = str(timestamp)
        headers = {
            "User-Agent": USER_AGENT,
            "Content-Type": content_type,
            IDEMPOTENCY_HEADER: msg_id,
            WEBHOOK_ID: msg_id,
            WEBHOOK_TIMESTAMP: stamp,
        }
        sink = self.sink
        if sink.signing_keys:
            # hmac.digest: OpenSSL's one-shot HMAC, several times cheaper than hmac.new
            signed = f"{msg_id}.{stamp}.".encode() + body
            headers[WEBHOOK_SIGNATURE] = " ".join(
                "v1," + base64.b64encode(hmac.digest(key, signed, "sha256")).decode()
                for key in sink.signing_keys
            )
        if sink.secret is not None:
            mac = hmac.digest(sink.secret, f"{stamp}.".encode() + body, "sha256").hex()
            headers[SIGNATURE_HEADER] = f"t={stamp},v1={mac}"
        return headers


K = TypeVar("K")
V = TypeVar("V")


class _Cache(Generic[K, V]):
    """Values remembered by key, the oldest forgotten first: at most RENDER_CACHE_MAX of
    them and RENDER_CACHE_MAX_BYTES of them, as `size` counts an entry (stored beside it)."""

    __slots__ = ("_size", "bytes", "entries")

    def __init__(self, size: Callable[[K, V], int]) -> None:
        self.entries: dict[K, tuple[V, int]] = {}
        self.bytes = 0
        self._size = size

    def put(self, key: K, value: V) -> None:
        cost = self._size(key, value)
        if cost > RENDER_CACHE_MAX_BYTES:
            return  # bigger than the whole budget: rendered again for each sink instead
        entries = self.entries
        while entries and (
            len(entries) >= RENDER_CACHE_MAX or self.bytes + cost > RENDER_CACHE_MAX_BYTES
        ):
            # the oldest: its event went to every sink long ago
            self.bytes -= entries.pop(next(iter(entries)))[1]
        entries[key] = (value, cost)
        self.bytes += cost


def _parsed_size(body: bytes, parsed: tuple[dict[str, Any], str] | None) -> int:
    # the journaled bytes, and the parsed event, whose strings hold about as many
    return 2 * len(body)


def _rendered_size(key: tuple[bytes, Hashable], rendered: Payload | str) -> int:
    # the journaled bytes, and the payload's (the json format sends those same bytes)
    if isinstance(rendered, str):  # why the event cannot be rendered
        return len(key[0]) + len(rendered)
    return len(key[0]) + (0 if rendered.body is key[0] else len(rendered.body))


def encode_event(body: Mapping[str, Any]) -> bytes:
    """The exact bytes journaled for an event (the `json` format's body)."""
    return orjson.dumps(dict(body))


@dataclass(frozen=True, slots=True)
class _Answer:
    """How one POST went: `error` is None for a 2xx."""

    error: str | None
    status: int | None = None
    retry_after_s: float | None = None


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
        on_disabled: Callable[[Sink, int, int], None] = lambda s, status, dropped: None,
    ) -> None:
        self._retry_base_s = retry_base_s
        self._store = store
        self.sinks = list(sinks)
        # the current config of each sink, by id: a reload swaps it under its worker
        self._by_id = {s.id: s for s in self.sinks}
        self._clock = clock
        self._on_result = on_result
        self._on_dead = on_dead
        self._on_disabled = on_disabled
        self._rng = rng or random.Random()
        self._wake = {s.id: asyncio.Event() for s in self.sinks}
        self._session: aiohttp.ClientSession | None = None
        self._workers: dict[str, asyncio.Task[None]] = {}
        # the workers of removed sinks, stopping (a round ending: what went is deleted)
        self._stopping: set[asyncio.Task[None]] = set()
        # held by a sink's worker while it runs: one worker per sink id at a time
        self._running: dict[str, asyncio.Lock] = {}
        self.idle = {s.id: asyncio.Event() for s in self.sinks}
        self.disabled: set[str] = set()
        # wall-clock time before which a sink sends nothing (it asked us to slow down)
        self._paused_until: dict[str, float] = {}
        # the sinks asleep with pending rows that cannot go yet: the tasks whose heads wait
        # for a retry (a new row of another task may be due now), None while paused
        self._asleep: dict[str, frozenset[str] | None] = {}
        self._lanes: dict[str, _Lane] = {}
        # per sink, the config a receiver answered 410 Gone to in the round under way: the
        # sink sends nothing more, and is disabled once that round's deliveries in flight
        # ended (what went is not counted as dropped)
        self._gone: dict[str, Sink] = {}
        # an event's rows of several sinks hold the same bytes: parsed (and rendered per
        # format) once for all of them
        self._parsed: _Cache[bytes, tuple[dict[str, Any], str] | None] = _Cache(_parsed_size)
        self._rendered: _Cache[tuple[bytes, Hashable], Payload | str] = _Cache(_rendered_size)

    def sinks_for(self, event: Mapping[str, Any]) -> list[str]:
        """The ids of the sinks that take this event."""
        return [s.id for s in self.sinks if s.id not in self.disabled and s.wants(event)]

    def stats(self) -> tuple[int, float | None, int]:
        """Pending deliveries, the age of the oldest, and how many sinks are disabled."""
        return (*self._store.outbox_stats(), len(self.disabled))

    def notify(self, sinks: Iterable[str] | None = None, task_key: str | None = None) -> None:
        """Look again now (a reload, the lease loop, a drain), or, with `sinks` and
        `task_key`, new rows of that task were written for those sinks: a sink whose rows
        cannot go before a pause ends, or before the head of that task's queue waiting for
        its retry, sleeps on. A running sink woken is not idle until it has read its queue
        again and found it empty."""
        for sink_id in self._wake if sinks is None else sinks:
            wake = self._wake.get(sink_id)
            if wake is None:
                continue
            if task_key is not None and sink_id in self._asleep:
                waiting = self._asleep[sink_id]
                if waiting is None or task_key in waiting:
                    continue
            wake.set()
            worker = self._workers.get(sink_id)
            if worker is not None and not worker.done():
                self.idle[sink_id].clear()

    async def start(self) -> None:
        await self._start_workers(self.sinks)

    async def _start_workers(self, sinks: Sequence[Sink]) -> None:
        if not sinks:
            return
        await self._load_disabled(sinks)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(),
                # no shared cap: each sink has its own MAX_PARALLEL_PER_SINK deliveries at
                # once, so a hanging receiver holds its own connections, never another's
                connector=aiohttp.TCPConnector(limit=0),
                # the answer is never looked at (at most 1 KiB is read, for keep-alive): no
                # Accept headers, nothing to decompress
                skip_auto_headers=("Accept", "Accept-Encoding"),
                auto_decompress=False,
            )
        for sink in sinks:
            self._wake.setdefault(sink.id, asyncio.Event())
            self.idle.setdefault(sink.id, asyncio.Event())
            if sink.id in self.disabled:
                self.idle[sink.id].set()
            elif (worker := self._workers.get(sink.id)) is None or worker.done():
                self._workers[sink.id] = asyncio.ensure_future(self._drain(sink.id))

    async def reconfigure(self, sinks: Sequence[Sink]) -> None:
        """A reload: new sinks start, removed ones stop (their rows wait in the outbox), and
        a changed one keeps its worker with its new config: filters, format, URL and secrets
        apply to every row not sent yet, also in the round under way (the POSTs in flight
        end with the old config); a disabled sink whose config changed is enabled again."""
        old = self._by_id
        self.sinks = list(sinks)
        self._by_id = {s.id: s for s in self.sinks}
        for sink_id in old.keys() - self._by_id.keys():
            worker = self._workers.pop(sink_id, None)
            if worker is not None and not worker.done():
                worker.cancel()  # a POST under way is cut: its row stays pending
                self._stopping.add(worker)
                worker.add_done_callback(self._stopping.discard)
            self.disabled.discard(sink_id)
            self._gone.pop(sink_id, None)
            if (idle := self.idle.pop(sink_id, None)) is not None:
                idle.set()  # it sends nothing more: a drain under way does not wait for it
            self._wake.pop(sink_id, None)
        changed = [s for s in self.sinks if s.id in old and old[s.id].fingerprint != s.fingerprint]
        for sink in changed:
            self._paused_until.pop(sink.id, None)
            self._gone.pop(sink.id, None)  # a 410 to the old config: the new one is tried
            if sink.id in self.disabled:
                self.disabled.discard(sink.id)
                with contextlib.suppress(StateUnavailable):
                    await self._store.enable_sink(sink.id)
        await self._start_workers(self.sinks)
        self.notify()

    async def _load_disabled(self, sinks: Sequence[Sink]) -> None:
        try:
            marks = await self._store.disabled_sinks()
        except StateUnavailable:
            return  # the shared state is down: a disabled sink answers 410 again
        for sink in sinks:
            mark = marks.get(sink.id)
            if mark is None:
                continue
            if mark == sink.fingerprint:
                self.disabled.add(sink.id)
            else:
                # its config changed since the 410: try it again
                with contextlib.suppress(StateUnavailable):
                    await self._store.enable_sink(sink.id)

    async def close(self) -> None:
        workers = [*self._workers.values(), *self._stopping]
        for worker in workers:
            worker.cancel()
        # the workers' CancelledError are results here; our own cancellation still propagates
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers = {}
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
                    # a sink removed by a reload meanwhile has no idle event any more
                    if (idle := self.idle.get(sink.id)) is not None:
                        await idle.wait()
        except TimeoutError:
            return False
        return True

    async def _drain(self, sink_id: str) -> None:
        wake = self._wake[sink_id]
        idle = self.idle[sink_id]
        # a sink removed and added again (two reloads) while its old worker ends its round:
        # the new one starts once the old one deleted what went, or it would send it again
        async with self._running.setdefault(sink_id, asyncio.Lock()):
            await self._rounds(sink_id, wake, idle)

    async def _rounds(self, sink_id: str, wake: asyncio.Event, idle: asyncio.Event) -> None:
        """Round after round, until the sink is removed or disabled."""
        loop = asyncio.get_running_loop()
        last_round = float("-inf")
        while sink_id not in self.disabled and (sink := self._by_id.get(sink_id)) is not None:
            if (early := last_round + ROUND_EVERY_S - loop.time()) > 0:
                await asyncio.sleep(early)
            wake.clear()
            try:
                heads = await self._store.outbox_heads(sink.id, HEADS_PER_ROUND)
            except StateUnavailable:
                # the shared state is down: the rows wait there; look again a little later
                await self._sleep_or_wake(wake, RECHECK_S)
                continue
            if not heads:
                if not wake.is_set():  # nothing was announced since this read began
                    idle.set()
                    await wake.wait()  # new rows (notify), a reload, or the lease loop
                continue
            idle.clear()
            now = self._now()
            if (paused_s := self._paused_until.get(sink_id, 0.0) - now) > 0:
                # nothing goes before the pause ends: new rows do not wake it, a reload does
                await self._sleep(sink_id, wake, paused_s, None)
                continue
            due = [r for r in heads if r.next_attempt_at <= now]
            if due:
                last_round = loop.time()
                if not await self._round(sink, due):
                    # the state refused a write (a full disk): what went stays pending and
                    # goes again, later, not every round
                    await self._sleep_or_wake(wake, RECHECK_S)
                continue
            # every head waits for its retry: a new row of one of these tasks queues behind
            # its head and does not wake the sink, a row of another task may be due now
            soonest = min(r.next_attempt_at for r in heads)
            waiting = frozenset(r.task_key for r in heads)
            await self._sleep(sink_id, wake, min(RECHECK_S, max(0.01, soonest - now)), waiting)
        idle.set()

    def _now(self) -> float:
        return self._clock.now().timestamp()

    def _paused(self, sink_id: str) -> bool:
        until = self._paused_until.get(sink_id)
        if until is None:
            return False
        if until > self._now():
            return True
        del self._paused_until[sink_id]  # over: the next rows do not ask the clock
        return False

    def _lane(self, sink: Sink) -> _Lane:
        lane = self._lanes.get(sink.id)
        if lane is None or lane.sink is not sink:  # new, or its config was reloaded
            lane = self._lanes[sink.id] = _Lane.of(sink)
        return lane

    async def _sleep(
        self, sink_id: str, wake: asyncio.Event, seconds: float, waiting: frozenset[str] | None
    ) -> None:
        """Sleep with pending rows that cannot go yet, woken by a new row only if it may be
        due now: of a task not in `waiting` (None: no new row can go, a pause)."""
        self._asleep[sink_id] = waiting
        try:
            await self._sleep_or_wake(wake, seconds)
        finally:
            self._asleep.pop(sink_id, None)

    async def _sleep_or_wake(self, wake: asyncio.Event, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await wake.wait()
        except TimeoutError:
            pass

    async def _round(self, sink: Sink, due: Sequence[OutboxRow]) -> bool:
        """Send the due heads, MAX_PARALLEL_PER_SINK at once, then delete the rows delivered
        (or filtered out) with one statement: a task's next row is read only after that.
        Each row goes with the sink's config when it is sent (a reload mid-round applies to
        the rows not yet sent). False when the state refused a write (those rows stay
        pending)."""
        done: list[tuple[int, str]] = []
        rows = iter(due)
        refused = False
        sink_id = sink.id
        lane = self._lane(sink)

        async def sender() -> None:
            nonlocal refused, lane
            for row in rows:
                if sink_id in self.disabled or (
                    sink_id in self._paused_until and self._paused(sink_id)
                ):
                    return  # another delivery was told to stop or slow down: the rest wait
                current = self._by_id.get(sink_id)
                if current is None:
                    return  # removed by a reload: the rest wait in the outbox
                if current is not lane.sink:
                    lane = self._lane(current)  # reloaded: its new config from this row on
                try:
                    outcome = await self._deliver(lane, row)
                except StateUnavailable:
                    # delivered or not, the row stays pending (at least once)
                    refused = True
                    continue
                if outcome is not None:
                    done.append((row.id, outcome))

        try:
            await asyncio.gather(*(sender() for _ in range(min(MAX_PARALLEL_PER_SINK, len(due)))))
        finally:
            # also when stopped (a reload, shutdown) mid-round: what was delivered is deleted
            deleted = await self._done(sink, done)
            gone = self._gone.pop(sink_id, None)
            if gone is not None and not await self._disable(gone):
                refused = True
        return deleted and not refused

    async def _disable(self, sink: Sink) -> bool:
        """Remember a sink whose receiver answered 410 Gone, dropping its pending rows: once
        its round ended, so that what that round delivered is not counted as dropped. False
        when the state refused it: the sink goes on, disabled once the state takes writes."""
        try:
            dropped = await self._store.disable_sink(sink.id, sink.fingerprint)
        except StateUnavailable:
            self.disabled.discard(sink.id)
            return False
        self._on_result(sink, "disabled")
        self._on_disabled(sink, GONE, dropped)
        return True

    async def _done(self, sink: Sink, done: list[tuple[int, str]]) -> bool:
        """Delete the rows that went (and count them); `done` is emptied. False when the
        state refused it."""
        batch = done[:]
        del done[: len(batch)]
        if not batch:
            return True
        try:
            await self._store.deliveries_done([row_id for row_id, _ in batch])
        except StateUnavailable:
            return False  # they stay pending and go again (at least once)
        for _, outcome in batch:
            self._on_result(sink, outcome)
        return True

    def _event_of(self, body: bytes) -> tuple[dict[str, Any], str] | None:
        """The journaled event and its message id (None: not an event), parsed once."""
        parsed_events = self._parsed.entries
        if body in parsed_events:
            return parsed_events[body][0]
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            event = None
        parsed = (event, message_id(event, body)) if isinstance(event, dict) else None
        self._parsed.put(body, parsed)
        return parsed

    def _payload(
        self, fmt: Format, event: dict[str, Any], body: bytes, msg_id: str
    ) -> Payload | str:
        """The payload of a format (or why it cannot be made), rendered once per event."""
        key = fmt.cache_key
        if key is None:
            return self._render(fmt, event, body, msg_id)
        known = self._rendered.entries.get((body, key))
        if known is not None:
            return known[0]
        rendered = self._render(fmt, event, body, msg_id)
        if isinstance(rendered, Payload) and rendered.body is not body:
            # kept at its size: orjson's bytes keep their whole buffer (4 KiB for 550 B),
            # which made the cache's byte bound several times too small
            rendered = Payload(bytes(memoryview(rendered.body)), rendered.content_type)
        self._rendered.put((body, key), rendered)
        return rendered

    @staticmethod
    def _render(fmt: Format, event: dict[str, Any], body: bytes, msg_id: str) -> Payload | str:
        try:
            return fmt.render(event, body, msg_id)
        except FormatError as err:
            return str(err)

    async def _deliver(self, lane: _Lane, row: OutboxRow) -> str | None:
        """Send one row; the outcome when the row is to be deleted, None when it was settled
        here (a retry, a dead letter, the sink disabled) or left for later (a pause)."""
        sink = lane.sink
        parsed = self._event_of(row.body)
        if parsed is None or not sink.wants(parsed[0]):
            # the sink's filters changed since the row was queued (a reload): not sent
            return "filtered"
        event, msg_id = parsed
        payload = self._payload(sink.format, event, row.body, msg_id)
        if isinstance(payload, str):
            # rendering is deterministic: retrying would fail the same way
            await self._store.delivery_dead(row.id)
            self._on_result(sink, "dead_lettered")
            self._on_dead(sink, row, payload)
            return None
        answer = await self._post(lane, payload, msg_id, int(self._clock.now().timestamp()))
        if answer.error is None:
            return "delivered"
        await self._settle(sink, row, answer)
        return None

    async def _settle(self, sink: Sink, row: OutboxRow, answer: _Answer) -> None:
        """A failed POST: the sink disabled (410), or the row retried later or dead-lettered."""
        if answer.status == GONE:
            if sink.id not in self.disabled:
                # nothing more is sent; disabled (its rows dropped) once the round ended
                self.disabled.add(sink.id)
                self._gone[sink.id] = sink
            return
        now = self._clock.now().timestamp()
        if now - row.created_at >= sink.max_age_s:
            await self._store.delivery_dead(row.id)
            self._on_result(sink, "dead_lettered")
            self._on_dead(sink, row, answer.error or "")
            return
        attempts = row.attempts + 1
        ceiling = min(RETRY_MAX_S, self._retry_base_s * 2.0 ** min(attempts, 20))
        delay = max(ceiling / 10, self._rng.uniform(0, ceiling))
        if answer.status in SLOW_DOWN:
            # the receiver asked the sender to slow down: the whole sink waits
            if answer.retry_after_s is not None:
                delay = max(answer.retry_after_s, ceiling / 10)
            until = now + delay
            self._paused_until[sink.id] = max(self._paused_until.get(sink.id, 0.0), until)
        await self._store.delivery_retry(row.id, attempts, now + delay)
        self._on_result(sink, "failed")

    async def _post(self, lane: _Lane, payload: Payload, msg_id: str, timestamp: int) -> _Answer:
        """How the receiver answered; an error is a short reason (never the URL)."""
        assert self._session is not None
        body = payload.body
        headers = lane.headers(payload.content_type, body, msg_id, timestamp)
        try:
            async with self._session.post(
                lane.sink.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=lane.timeout,
            ) as resp:
                # only the status matters: a short answer is read (keep-alive), never a long one
                await read_prefix(resp, MAX_ANSWER_READ_BYTES)
                if 200 <= resp.status < 300:
                    return _Answer(None, resp.status)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"), self._clock.now())
                return _Answer(f"HTTP {resp.status}", resp.status, retry_after)
        except TimeoutError:
            return _Answer("timeout")
        except aiohttp.ClientError as err:
            return _Answer(f"connection: {type(err).__name__}")


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


def disabled_fields(sink: Sink, http_status: int, dropped: int) -> dict[str, Any]:
    """The fields of the sink.disabled event of a sink whose receiver answered 410 Gone."""
    return {
        "sink": sink.id,
        "http_status": http_status,
        "dropped_deliveries": dropped,
        "hint": "the receiver answered 410 Gone; change this sink's config to enable it again",
    }
