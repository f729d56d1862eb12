"""The event vocabulary of CONTRACT §5 (names defined once) and the structlog set-up."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from enkwatch.errors import (
    ERR_CONNECTION,
    ERR_HTTP_STATUS,
    ERR_INVALID_RESPONSE,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
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


def log(name: str, level: str = INFO, **fields: Any) -> None:
    """Write one event that is not about a task (daemon.*, config.*, api.*)."""
    emit({"event": name, "level": level, **fields})


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
    "configure_logging",
    "emit",
    "level_number",
    "rfc3339",
]
