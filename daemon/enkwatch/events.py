"""The events of CONTRACT §5: their vocabulary, the structlog set-up, and the one writer."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Protocol, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from enkwatch.clock import Clock
from enkwatch.errors import (
    ERR_CONNECTION,
    ERR_HTTP_STATUS,
    ERR_INVALID_RESPONSE,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    StateUnavailable,
)
from enkwatch.models import (
    API_AUTH_FAILED,
    AUTH_HINT,
    CONFIG_RELOAD_FAILED,
    CONFIG_RELOADED,
    DAEMON_ALL_DONE,
    DAEMON_STARTED,
    DAEMON_STOPPED,
    DAEMON_STOPPING,
    DISCOVERY_FAILED,
    SINK_DELIVERY_FAILED,
    SINK_DISABLED,
    STATE_RECOVERED,
    STATE_UNAVAILABLE,
    TASK_DISCOVERED,
    TASK_GAVE_UP,
    TASK_POLL_FAILED,
    TASK_STALLED,
    TASK_TRANSITION,
    TASK_UNKNOWN_STATUS,
    TaskKind,
)
from enkwatch.output import DirectLines, Lines, LineWriter, StdoutUnusable
from enkwatch.state.base import EventJournal, JournaledEvent, TaskRecord

# levels
INFO: Final = "info"
WARNING: Final = "warning"
ERROR: Final = "error"
CRITICAL: Final = "critical"

# `reason` values of task.gave_up
GAVE_UP_DEADLINE: Final = "deadline_exceeded"
GAVE_UP_NOT_FOUND: Final = "not_found"

_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_LEVEL_NAMES: Final = {number: name for name, number in _LEVELS.items()}

# what a secret found in an event's field is replaced with
REDACTED: Final = "[redacted]"
# secrets shorter than this are not searched for (they would mangle ordinary words)
MIN_SECRET_LEN: Final = 4
# sink.* events: a sink's own failures, never delivered to that sink nor reported again
SINK_EVENT_PREFIX: Final = "sink."


def level_number(name: str) -> int:
    """`"warning"` -> 30; raises ValueError for an unknown level."""
    try:
        return _LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}; use one of {', '.join(_LEVELS)}") from None


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a `Z`."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # "+00:00" -> "Z" (no naive copy of the moment made first)
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def _add_timestamp(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # journaled task events carry the time they happened; keep it when replayed
    if "timestamp" not in event_dict:
        event_dict["timestamp"] = rfc3339(datetime.now(UTC))
    return event_dict


def _order_keys(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    # timestamp, level, event first: easier to read, same content
    head = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    head.update(event_dict)
    return head


def _orjson_dumps(obj: Any, **_: Any) -> bytes:
    return orjson.dumps(obj, default=str)


class _Output:
    """Where configure_logging sends the lines (the stream of the process's stdout), and
    the structlog configuration it made (what `render` recognizes)."""

    stream: TextIO | None = None
    processors: Any = None
    # the processors of the JSON format as configured (a copy: a test's capture changes them)
    json_chain: list[Processor] | None = None
    wrapper: object = None
    factory: object = None
    logger: Any = None
    min_level = 0


def configure_logging(
    log_format: str = "json", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog once, in the CLI: JSON (or console) lines for `stream` (stdout).

    structlog renders and returns the line (`ReturnLoggerFactory`); the writer of the
    lines is the caller's (`EventWriter` hands it to a `Lines`: the daemon's writer thread,
    or the stream itself). The renderer is the last processor; any that returns str or
    bytes fits.
    """
    out = stream or sys.stdout
    _Output.stream = out
    # no merge_contextvars: nothing binds context variables (every field is the event's)
    shared: list[Processor] = [structlog.processors.add_log_level, _add_timestamp]
    processors: list[Processor]
    if log_format == "console":
        from enkwatch.console import ConsoleRenderer, use_colour  # rich: only when asked

        renderer = ConsoleRenderer(colour=use_colour(out), verbose=level.lower() == "debug")
        processors = [*shared, renderer]
    else:
        processors = [*shared, _order_keys, structlog.processors.JSONRenderer(_orjson_dumps)]
    factory = structlog.ReturnLoggerFactory()
    wrapper = structlog.make_filtering_bound_logger(level_number(level))
    structlog.configure(
        processors=processors,
        wrapper_class=wrapper,
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    _Output.processors = structlog.get_config()["processors"]
    _Output.json_chain = list(processors) if log_format != "console" else None
    _Output.wrapper, _Output.factory = wrapper, factory
    _Output.logger, _Output.min_level = factory(), level_number(level)
    # libraries log through the standard library: to stderr, warnings and up, never stdout
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(sys.stderr)]
    root.setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def output_fd() -> int | None:
    """The file descriptor of the configured stdout, flushed; None when it has none (tests)."""
    stream = _Output.stream or sys.stdout
    try:
        stream.flush()
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def open_lines(clock: Clock, on_unusable: Callable[[StdoutUnusable], None]) -> Lines:
    """The daemon's stdout: a writer thread on its file descriptor (DirectLines if none)."""
    fd = output_fd()
    if fd is None:
        return direct_lines()
    writer = LineWriter(fd, on_unusable=on_unusable, clock=clock)
    writer.start()
    return writer


def direct_lines() -> Lines:
    """The configured stream itself as the lines' writer (blocking: not for the daemon)."""
    stream: Any = _Output.stream or sys.stdout
    binary: Any = getattr(stream, "buffer", None) or _TextAsBinary(stream)
    return DirectLines(binary)


class _TextAsBinary:
    """A text stream (StringIO, a capture) taking bytes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return self._stream.write(data.decode("utf-8", "replace"))

    def flush(self) -> None:
        self._stream.flush()


def render(event_dict: Mapping[str, Any]) -> bytes | None:
    """One event (a dict with `event` and `level`) through structlog: its line with the
    newline, or None when its level is filtered out (or a test captures it).

    Under the configuration of `configure_logging` (a test's capture_logs included: it
    changes the processors in place) the event goes straight through structlog's processor
    chain, as the bound logger would send it, without making a bound logger per event;
    under any other configuration, through `structlog.get_logger()`. The JSON format's
    chain, unchanged, is done in one step (`_json_line`: the same bytes).
    """
    name = event_dict["event"]
    number = level_number(event_dict.get("level", INFO))
    config = structlog.get_config()
    processors = config["processors"]
    line: Any
    if (
        processors is _Output.processors
        and config["wrapper_class"] is _Output.wrapper
        and config["logger_factory"] is _Output.factory
    ):
        if number < _Output.min_level:
            return None
        if processors == _Output.json_chain:
            return _json_line(event_dict, number)
        fields = dict(event_dict)
        del fields["event"]
        fields.pop("level", None)
        fields["event"] = name
        method, logger = _LEVEL_NAMES[number], _Output.logger
        line = fields
        try:
            for processor in processors:
                line = processor(logger, method, line)
        except structlog.DropEvent:
            return None
        if not isinstance(line, str | bytes | bytearray):
            return None  # not a renderer last: nothing to write
    else:
        fields = {k: v for k, v in event_dict.items() if k not in ("event", "level")}
        line = structlog.get_logger("enkwatch").log(number, name, **fields)
    if line is None:
        return None
    if isinstance(line, str):
        return line.encode("utf-8", "replace") + b"\n"
    return bytes(line) + b"\n"


def _json_line(event_dict: Mapping[str, Any], number: int) -> bytes:
    """What the JSON format's processors make of an event, with its newline: `level` as the
    level's name, a `timestamp` if it has none, timestamp, level and event first, the other
    fields in their order, through orjson."""
    line = {"timestamp": None, "level": None, "event": None, **event_dict}
    line["level"] = _LEVEL_NAMES[number]
    if "timestamp" not in event_dict:
        line["timestamp"] = rfc3339(datetime.now(UTC))
    return orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE)


def emit(event_dict: Mapping[str, Any]) -> None:
    """Write one event at once to the configured stream (the commands that only print)."""
    line = render(event_dict)
    if line is not None:
        direct_lines().write_nowait(line)


def secret_needles(secrets: Iterable[str]) -> tuple[bytes, ...]:
    """How each secret reads inside JSON (escaped as orjson escapes it): what `redacted`
    looks for in an event's serialization."""
    return tuple(orjson.dumps(secret)[1:-1] for secret in secrets)


def redacted(
    body: dict[str, Any], secrets: Sequence[str], needles: Sequence[bytes]
) -> dict[str, Any]:
    """`scrub(body, secrets)`, with a fast path: JSON escapes character by character, so a
    string holding a secret serializes to bytes holding the secret's escaped form; when
    none is found (nearly always) no string holds one and the body is returned as is."""
    try:
        raw = orjson.dumps(body, default=str)
    except (TypeError, orjson.JSONEncodeError):
        return dict(scrub(body, secrets))
    if any(needle in raw for needle in needles):
        return dict(scrub(body, secrets))
    return body


def scrub(value: Any, secrets: Sequence[str]) -> Any:
    """`value` with every secret in its strings (also in lists and dicts) replaced."""
    if isinstance(value, str):
        for secret in secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {k: scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, secrets) for v in value]
    return value


class WatchedTask(Protocol):
    """What an event about a task carries of it (the poller's TaskWatch)."""

    key: str
    task_id: str | None
    dataset: str | None
    labels: dict[str, str]
    record: TaskRecord
    kind: TaskKind


class EventWriter:
    """The one way an event is written, for tasks and the daemon alike.

    In this order, once: build the body (secrets redacted) -> journal it (task events: with
    the task's new state, and its webhook deliveries, in one transaction, committed with
    those of other polls of the moment) -> render it and hand the line to `out` -> the
    observers (metrics, the live stream of GET /events) -> wake the outbox. A task event
    is confirmed in the journal once its line was written (`out` calls back): one that
    never reached the reader is written again after a restart. Daemon events are not
    journaled; their webhook deliveries are queued after they were handed over.
    """

    def __init__(
        self,
        clock: Clock,
        journal: EventJournal | None = None,
        observers: Sequence[Callable[[Mapping[str, Any]], None]] = (),
        sinks_for: Callable[[Mapping[str, Any]], Sequence[str]] | None = None,
        notify: Callable[[Sequence[str], str], None] | None = None,
        *,
        out: Lines | None = None,
        secrets: Iterable[str | None] = (),
    ) -> None:
        self._clock = clock
        self._journal = journal
        # who sees each event once it was written (metrics, the live stream of GET /events)
        self._observers = tuple(observers)
        self._sinks_for = sinks_for or _no_sinks
        self._notify = notify
        self.out = out or direct_lines()
        self._secrets = tuple({s for s in secrets if s and len(s) >= MIN_SECRET_LEN})
        self._needles = secret_needles(self._secrets)
        self._background: set[asyncio.Task[None]] = set()

    async def task_event(
        self, task: WatchedTask, name: str, level: str, fields: Mapping[str, Any]
    ) -> None:
        """An event about a task: its seq moves on; journaled before it is written out.

        Raises what the journal raises (LeaseLost, StateUnavailable): then nothing was written.
        """
        body, sinks = self._task_body(task, name, level, fields)
        if self._journal is not None:
            await self._journal.record_event(task.record, body, sinks)
        if not self.out.has_room():
            await self.out.wait_for_room()
        self._publish(body, sinks, (task.key, task.record.seq))

    def _task_body(
        self, task: WatchedTask, name: str, level: str, fields: Mapping[str, Any]
    ) -> tuple[dict[str, Any], Sequence[str]]:
        rec = task.record
        rec.seq += 1
        body: dict[str, Any] = {
            "timestamp": rfc3339(self._clock.now()),
            "level": level,
            "event": name,
            **task.kind.identity(
                task.task_id if task.task_id is not None else rec.seen_task_id,
                task.dataset if task.dataset is not None else rec.seen_dataset,
            ),
            "kind": task.kind.name,
            "task_key": task.key,
            "seq": rec.seq,
            "event_id": f"{task.key}:{rec.seq}",
        }
        if task.labels:
            body["labels"] = task.labels
        body.update(fields)
        if self._secrets:
            body = redacted(body, self._secrets, self._needles)
        return body, self._sinks_for(body)

    def _publish(
        self,
        body: Mapping[str, Any],
        sinks: Sequence[str],
        confirm: tuple[str, int] | None = None,
        count: bool = True,
    ) -> None:
        """Render and hand over the line (confirmed once written), count, wake the outbox."""
        line = render(body)
        journal = self._journal
        done = (
            functools.partial(journal.confirm_written, *confirm)
            if confirm is not None and journal is not None
            else None
        )
        if line is None:
            if done is not None:
                done()  # filtered out by the level: nothing to wait for
        else:
            # unusable: the service stops on it; the journaled event is written after a restart
            with contextlib.suppress(StdoutUnusable):
                self.out.write_nowait(line, done)
        if count:
            for observe in self._observers:
                observe(body)
        if confirm is not None and sinks and self._notify is not None:
            self._notify(sinks, confirm[0])

    def daemon_event(self, name: str, level: str = INFO, **fields: Any) -> None:
        """An event that is not about a task: written, counted, and queued for webhooks.

        A sink.* event is never queued for the sink it is about.
        """
        body: dict[str, Any] = {
            "timestamp": rfc3339(self._clock.now()),
            "level": level,
            "event": name,
            **fields,
        }
        if self._secrets:
            body = redacted(body, self._secrets, self._needles)
        self._publish(body, ())
        sinks = self._sinks_for(body)
        if name.startswith(SINK_EVENT_PREFIX):
            sinks = [s for s in sinks if s != fields.get("sink")]
        if sinks and self._journal is not None:
            job = asyncio.ensure_future(self._enqueue(self._journal, sinks, body))
            self._background.add(job)
            job.add_done_callback(self._background.discard)

    def delivery_failed(self, fields: Mapping[str, Any]) -> None:
        """A webhook delivery given up: `sink.delivery_failed`, unless what failed was itself
        a sink.* event (then only the metric counts it: a storm is impossible)."""
        failed = fields.get("failed_event")
        if isinstance(failed, str) and failed.startswith(SINK_EVENT_PREFIX):
            return
        self.daemon_event(SINK_DELIVERY_FAILED, ERROR, **fields)

    def add_secrets(self, secrets: Iterable[str | None]) -> None:
        """More values to redact (a reload's new sink secrets); none is ever forgotten."""
        fresh = {s for s in secrets if s and len(s) >= MIN_SECRET_LEN}
        self._secrets = tuple(set(self._secrets) | fresh)
        self._needles = secret_needles(self._secrets)

    def sink_disabled(self, fields: Mapping[str, Any]) -> None:
        """A sink whose receiver answered 410 Gone: `sink.disabled`, a warning (never queued
        for that sink)."""
        self.daemon_event(SINK_DISABLED, WARNING, **fields)

    async def _enqueue(
        self, journal: EventJournal, sinks: Sequence[str], body: Mapping[str, Any]
    ) -> None:
        try:
            await journal.enqueue(sinks, body)
        except StateUnavailable:
            return  # a daemon-level event; the store is down: it was written to stdout
        if self._notify is not None:
            self._notify(sinks, "")  # not about a task: its rows queue under the key ""

    async def replay(self, events: Iterable[JournaledEvent]) -> None:
        """Write again events that were journaled but not confirmed written (same event_id);
        each is confirmed once its line was written."""
        for item in events:
            if not self.out.has_room():
                await self.out.wait_for_room()
            self._publish(item.body, (), (item.task_key, item.seq), count=False)

    def release(self) -> None:
        """Shutdown: writers stop waiting for room on stdout, and staged events are
        committed at once (no commit window): the drain of the polls is quick."""
        self.out.release()
        if self._journal is not None:
            self._journal.commit_now()

    def concurrent_writers(self, count: int) -> None:
        """How many task events may be under way at once (the polls that may run at once):
        the journal sizes its group commits on it."""
        if self._journal is not None:
            self._journal.concurrent_writers(count)

    def cancel_pending(self) -> None:
        """Shutdown: drop webhook deliveries of daemon events not yet stored."""
        for job in list(self._background):
            job.cancel()


def _no_sinks(event: Mapping[str, Any]) -> Sequence[str]:
    return ()


__all__ = [
    "API_AUTH_FAILED",
    "AUTH_HINT",
    "CONFIG_RELOADED",
    "CONFIG_RELOAD_FAILED",
    "CRITICAL",
    "DAEMON_ALL_DONE",
    "DAEMON_STARTED",
    "DAEMON_STOPPED",
    "DAEMON_STOPPING",
    "DISCOVERY_FAILED",
    "ERROR",
    "ERR_CONNECTION",
    "ERR_HTTP_STATUS",
    "ERR_INVALID_RESPONSE",
    "ERR_RATE_LIMITED",
    "ERR_TIMEOUT",
    "INFO",
    "SINK_DELIVERY_FAILED",
    "SINK_DISABLED",
    "STATE_RECOVERED",
    "STATE_UNAVAILABLE",
    "TASK_DISCOVERED",
    "TASK_GAVE_UP",
    "TASK_POLL_FAILED",
    "TASK_STALLED",
    "TASK_TRANSITION",
    "TASK_UNKNOWN_STATUS",
    "WARNING",
    "EventWriter",
    "configure_logging",
    "direct_lines",
    "emit",
    "level_number",
    "open_lines",
    "output_fd",
    "redacted",
    "render",
    "rfc3339",
    "scrub",
    "secret_needles",
]
