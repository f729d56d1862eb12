"""The shared vocabulary: event names, the state-URL test, and the task observation."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

# event names (CONTRACT §5), defined once: events.py, config.py and the stores use these
DAEMON_STARTED: Final = "daemon.started"
TASK_TRANSITION: Final = "task.transition"
TASK_POLL_FAILED: Final = "task.poll_failed"
TASK_UNKNOWN_STATUS: Final = "task.unknown_status"
TASK_GAVE_UP: Final = "task.gave_up"
API_AUTH_FAILED: Final = "api.auth_failed"
CONFIG_RELOADED: Final = "config.reloaded"
CONFIG_RELOAD_FAILED: Final = "config.reload_failed"
DAEMON_ALL_DONE: Final = "daemon.all_done"
DAEMON_STOPPING: Final = "daemon.stopping"
DAEMON_STOPPED: Final = "daemon.stopped"
SINK_DELIVERY_FAILED: Final = "sink.delivery_failed"
STATE_UNAVAILABLE: Final = "state.unavailable"
STATE_RECOVERED: Final = "state.recovered"

# the events a webhook can select
WEBHOOK_EVENTS: Final = frozenset(
    {
        TASK_TRANSITION,
        TASK_POLL_FAILED,
        TASK_UNKNOWN_STATUS,
        TASK_GAVE_UP,
        API_AUTH_FAILED,
        CONFIG_RELOADED,
        CONFIG_RELOAD_FAILED,
        DAEMON_STARTED,
        DAEMON_ALL_DONE,
        DAEMON_STOPPING,
        DAEMON_STOPPED,
        SINK_DELIVERY_FAILED,
    }
)


def is_postgres_url(path: str) -> bool:
    """True for a `postgresql://` (or `postgres://`) state path: replicas share it."""
    return path.startswith(("postgresql://", "postgres://"))


QUEUED: Final = "Queued"
RUNNING: Final = "Running"
FINISHED: Final = "Finished"
FAILED: Final = "Failed"

KNOWN_STATUSES: Final = frozenset({QUEUED, RUNNING, FINISHED, FAILED})
TERMINAL_STATUSES: Final = frozenset({FINISHED, FAILED})

REQUIRED_FIELDS: Final = ("dataset_name", "created_at", "status", "task_id")

# the one string object of each known status: 100,000 watched tasks then share four strings
# instead of holding a copy each, as every parsed answer would give them
_CANONICAL: Final[dict[str, str]] = {s: s for s in KNOWN_STATUSES}


def is_terminal(status: str | None) -> bool:
    """True for Finished and Failed."""
    return status in TERMINAL_STATUSES


@dataclass(frozen=True, slots=True)
class Observation:
    """One successful answer about one task."""

    task_id: str
    dataset_name: str
    status: str
    created_at: str
    started_at: str | None
    data: dict[str, Any]

    @property
    def known(self) -> bool:
        return self.status in KNOWN_STATUSES

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def normalize_timestamp(value: object) -> str | None:
    """An ISO 8601 date-time string as given, or None when empty or malformed."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return value


def parse_observation(payload: object) -> Observation:
    """Parse a decoded JSON body; raise ValueError naming what is wrong."""
    if not isinstance(payload, dict):
        raise ValueError(f"body is a JSON {type(payload).__name__}, not an object")
    if "error" in payload:
        raise ValueError(f"error: {str(payload['error'])[:200]}")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise ValueError("'data' is missing or not an object")
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise ValueError(f"'data' lacks required field(s): {', '.join(missing)}")
    for field in REQUIRED_FIELDS:
        if not isinstance(data[field], str):
            raise ValueError(f"data.{field} is not a string")
    status: str = data["status"]
    if not status:
        raise ValueError("data.status is empty")
    return Observation(
        task_id=data["task_id"],
        dataset_name=data["dataset_name"],
        status=_CANONICAL.get(status, status),
        created_at=data["created_at"],
        started_at=normalize_timestamp(data.get("started_at")),
        data=data,
    )
