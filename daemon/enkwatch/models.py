"""The shared vocabulary: event names, the state-URL test, and the task observation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

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


@dataclass(frozen=True, slots=True)
class Observation:
    """One successful answer about one task, parsed by its kind."""

    task_id: str
    dataset_name: str
    status: str
    created_at: str
    started_at: str | None
    data: dict[str, Any]
    # in the kind's vocabulary (else a task.unknown_status), and one of its terminal statuses
    known: bool
    terminal: bool


class TaskKind(Protocol):
    """A kind of Enkrypt job: its request, the parsing of its answer, its status words.

    Implemented once per kind in `enkwatch.kinds`; the client and the poller know only this.
    """

    name: str
    statuses: frozenset[str]
    terminal: frozenset[str]
    # terminal statuses that count as Failed (exit code 1, a warning transition)
    failed: frozenset[str]

    def path(self, task_id: str | None, dataset: str | None) -> str:
        """The request's path below the API's base URL."""
        ...

    def headers(self, task_id: str | None, dataset: str | None) -> dict[str, str]:
        """The request's identifying headers (a new dict: the client adds the key)."""
        ...

    def parse(self, payload: object) -> Observation:
        """An Observation from a decoded 200 answer; ValueError naming what is wrong."""
        ...
