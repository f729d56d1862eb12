"""The events of CONTRACT §5: their vocabulary, the structlog set-up, and the one writer."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
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
    CONFIG_RELOAD_FAILED,
    CONFIG_RELOADED,
    DAEMON_ALL_DONE,
    DAEMON_STARTED,
    DAEMON_STOPPED,
    DAEMON_STOPPING,
    SINK_DELIVERY_FAILED,
    STATE_RECOVERED,
    STATE_UNAVAILABLE,
    TASK_GAVE_UP,
    TASK_POLL_FAILED,
    TASK_TRANSITION,
    TASK_UNKNOWN_STATUS,
)
from enkwatch.state.base import EventJournal, JournaledEvent, TaskRecord

# levels
INFO: Final = "info"
WARNING: Final = "warning"
ERROR: Final = "error"
CRITICAL: Final = "critical"

# `reason` values of task.gave_up
GAVE_UP_DEADLINE: Final = "deadline_exceeded"
GAVE_UP_NOT_FOUND: Final = "not_found"

AUTH_HINT: Final = (
    "the API rejected the key: check ENKRYPTAI_API_KEY (or the file named by api.api_key_file)"
)

_LEVELS: Final = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def level_number(name: str) -> int:
    """`"warning"` -> 30; raises ValueError for an unknown level."""
    try:
        return _LEVELS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {name!r}; use one of {', '.join(_LEVELS)}") from None


def rfc3339(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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


def configure_logging(
    log_format: str = "json", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog once, in the CLI: JSON (or console) lines on stdout, flushed each."""
    out = stream or sys.stdout
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _add_timestamp,
    ]
    processors: list[Processor]
    if log_format == "console":
        processors = [
            *shared,
            structlog.dev.ConsoleRenderer(colors=out.isatty(), sort_keys=False),
        ]
        factory: Any = structlog.PrintLoggerFactory(file=out)
    else:
        processors = [*shared, _order_keys, structlog.processors.JSONRenderer(_orjson_dumps)]
        buffer = getattr(out, "buffer", None)
        factory = (
            structlog.BytesLoggerFactory(file=buffer)
            if buffer is not None
            else structlog.PrintLoggerFactory(file=out)
        )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_number(level)),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    # libraries log through the standard library: to stderr, warnings and up, never stdout
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(sys.stderr)]
    root.setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def emit(event_dict: Mapping[str, Any]) -> None:
    """Write one event (a dict with `event` and `level`) through structlog."""
    fields: MutableMapping[str, Any] = dict(event_dict)
    name = fields.pop("event")
    level = fields.pop("level", INFO)
    structlog.get_logger("enkwatch").log(level_number(level), name, **fields)


class WatchedTask(Protocol):
    """What an event about a task carries of it (the poller's TaskWatch)."""

    key: str
    task_id: str | None
    dataset: str | None
    labels: dict[str, str]
    record: TaskRecord


class EventWriter:
    """The one way an event is written, for tasks and the daemon alike.

    In this order, once: build the body -> journal it (task events: with the task's new
    state, and its webhook deliveries, in one transaction) -> render it on stdout -> count
    it in the metrics -> wake the outbox. Daemon events are not journaled; their webhook
    deliveries are queued after they were written.
    """

    def __init__(
        self,
        clock: Clock,
        journal: EventJournal | None = None,
        observe: Callable[[Mapping[str, Any]], None] | None = None,
        sinks_for: Callable[[str], Sequence[str]] | None = None,
        notify: Callable[[], None] | None = None,
    ) -> None:
        self._clock = clock
        self._journal = journal
        self._observe = observe
        self._sinks_for = sinks_for or _no_sinks
        self._notify = notify
        self._background: set[asyncio.Task[None]] = set()

    async def task_event(
        self, task: WatchedTask, name: str, level: str, fields: Mapping[str, Any]
    ) -> None:
        """An event about a task: its seq moves on; journaled before it is written out.

        Raises what the journal raises (LeaseLost, StateUnavailable): then nothing was written.
        """
        rec = task.record
        rec.seq += 1
        body: dict[str, Any] = {
            "timestamp": rfc3339(self._clock.now()),
            "level": level,
            "event": name,
            "task_id": task.task_id if task.task_id is not None else rec.seen_task_id,
            "dataset": task.dataset if task.dataset is not None else rec.seen_dataset,
            "task_key": task.key,
            "seq": rec.seq,
            "event_id": f"{task.key}:{rec.seq}",
        }
        if task.labels:
            body["labels"] = task.labels
        body.update(fields)
        sinks = self._sinks_for(name)
        if self._journal is not None:
            await self._journal.record_event(rec, body, sinks)
        emit(body)
        if self._journal is not None:
            await self._journal.mark_written(task.key, rec.seq)
        if self._observe is not None:
            self._observe(body)
        if sinks and self._notify is not None:
            self._notify()

    def daemon_event(self, name: str, level: str = INFO, **fields: Any) -> None:
        """An event that is not about a task: written, counted, and queued for webhooks."""
        body: dict[str, Any] = {
            "timestamp": rfc3339(self._clock.now()),
            "level": level,
            "event": name,
            **fields,
        }
        emit(body)
        if self._observe is not None:
            self._observe(body)
        sinks = self._sinks_for(name)
        if sinks and self._journal is not None:
            job = asyncio.ensure_future(self._enqueue(self._journal, sinks, body))
            self._background.add(job)
            job.add_done_callback(self._background.discard)

    async def _enqueue(
        self, journal: EventJournal, sinks: Sequence[str], body: Mapping[str, Any]
    ) -> None:
        try:
            await journal.enqueue(sinks, body)
        except StateUnavailable:
            return  # a daemon-level event; the store is down: it was written to stdout
        if self._notify is not None:
            self._notify()

    def replay(self, events: Iterable[JournaledEvent]) -> None:
        """Write again events that were journaled but not confirmed written (same event_id)."""
        for item in events:
            emit(item.body)

    def cancel_pending(self) -> None:
        """Shutdown: drop webhook deliveries of daemon events not yet stored."""
        for job in list(self._background):
            job.cancel()


def _no_sinks(name: str) -> Sequence[str]:
    return ()


__all__ = [
    "API_AUTH_FAILED",
    "CONFIG_RELOADED",
    "CONFIG_RELOAD_FAILED",
    "CRITICAL",
    "DAEMON_ALL_DONE",
    "DAEMON_STARTED",
    "DAEMON_STOPPED",
    "DAEMON_STOPPING",
    "ERROR",
    "ERR_CONNECTION",
    "ERR_HTTP_STATUS",
    "ERR_INVALID_RESPONSE",
    "ERR_RATE_LIMITED",
    "ERR_TIMEOUT",
    "INFO",
    "SINK_DELIVERY_FAILED",
    "STATE_RECOVERED",
    "STATE_UNAVAILABLE",
    "TASK_GAVE_UP",
    "TASK_POLL_FAILED",
    "TASK_TRANSITION",
    "TASK_UNKNOWN_STATUS",
    "WARNING",
    "EventWriter",
    "configure_logging",
    "emit",
    "level_number",
    "rfc3339",
]
