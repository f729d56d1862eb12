"""The shared vocabulary: event names, the state-URL test, and the task observation."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Final, Protocol

# a status (or created_at) string from the API is cut to this many characters in events
# and in the state (the last one marked with ELLIPSIS), after its control characters go
MAX_STATUS_CHARS: Final = 64
ELLIPSIS: Final = "\u2026"

# event names (CONTRACT §5), defined once: events.py, config.py and the stores use these
DAEMON_STARTED: Final = "daemon.started"
TASK_TRANSITION: Final = "task.transition"
TASK_POLL_FAILED: Final = "task.poll_failed"
TASK_UNKNOWN_STATUS: Final = "task.unknown_status"
TASK_GAVE_UP: Final = "task.gave_up"
TASK_STALLED: Final = "task.stalled"
API_AUTH_FAILED: Final = "api.auth_failed"
CONFIG_RELOADED: Final = "config.reloaded"
CONFIG_RELOAD_FAILED: Final = "config.reload_failed"
DAEMON_ALL_DONE: Final = "daemon.all_done"
DAEMON_STOPPING: Final = "daemon.stopping"
DAEMON_STOPPED: Final = "daemon.stopped"
SINK_DELIVERY_FAILED: Final = "sink.delivery_failed"
SINK_DISABLED: Final = "sink.disabled"
STATE_UNAVAILABLE: Final = "state.unavailable"
STATE_RECOVERED: Final = "state.recovered"
TASK_DISCOVERED: Final = "task.discovered"
DISCOVERY_FAILED: Final = "discovery.failed"

# the `hint` of api.auth_failed
AUTH_HINT: Final = (
    "the API rejected the key: check ENKRYPTAI_API_KEY (or the file named by api.api_key_file)"
)

# the events a webhook can select
WEBHOOK_EVENTS: Final = frozenset(
    {
        TASK_TRANSITION,
        TASK_POLL_FAILED,
        TASK_UNKNOWN_STATUS,
        TASK_GAVE_UP,
        TASK_STALLED,
        API_AUTH_FAILED,
        CONFIG_RELOADED,
        CONFIG_RELOAD_FAILED,
        DAEMON_STARTED,
        DAEMON_ALL_DONE,
        DAEMON_STOPPING,
        DAEMON_STOPPED,
        SINK_DELIVERY_FAILED,
        SINK_DISABLED,
        TASK_DISCOVERED,
        DISCOVERY_FAILED,
    }
)


def is_postgres_url(path: str) -> bool:
    """True for a `postgresql://` (or `postgres://`) state path: replicas share it."""
    return path.startswith(("postgresql://", "postgres://"))


def clean_text(text: str, limit: int = MAX_STATUS_CHARS) -> str:
    """`text` without control or format characters (Unicode category C*: CR/LF, ESC, NUL,
    bidi overrides...), cut to `limit` characters (the last one then an ellipsis)."""
    if text.isprintable() and len(text) <= limit:
        return text  # the usual case: nothing to do, the same object
    kept = "".join(c for c in text if not unicodedata.category(c).startswith("C"))
    return kept if len(kept) <= limit else kept[: limit - 1] + ELLIPSIS


@dataclass(frozen=True, slots=True)
class Observation:
    """One successful answer about one task, parsed by its kind."""

    # the job's id (a run's run_id) and its name (a dataset's name, a test's test_name)
    task_id: str
    dataset_name: str | None
    status: str
    created_at: str | None
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

    # `task_id` is the job's id (a run's run_id), `dataset` its name (a test's test_name)
    def path(self, task_id: str | None, dataset: str | None) -> str:
        """The request's path below the API's base URL."""
        ...

    def headers(self, task_id: str | None, dataset: str | None) -> dict[str, str]:
        """The request's identifying headers (a new dict: the client adds the key)."""
        ...

    def identity(self, task_id: str | None, name: str | None) -> dict[str, Any]:
        """The identifying fields of a task event (`task_id`, `dataset`, the kind's own)."""
        ...

    def parse(self, payload: object, task_id: str | None, dataset: str | None) -> Observation:
        """An Observation from a decoded 200 answer to the request for `task_id` (else
        `dataset`); ValueError naming what is wrong, also when it is about another job."""
        ...


@dataclass(frozen=True, slots=True)
class ListedJob:
    """One job named by a list page: its id and/or name, its status, its fields for `match`."""

    task_id: str | None
    name: str | None
    status: str
    fields: dict[str, str]
    # the item as the API gave it (a redteam item is also an Observation of the job)
    observation: Observation | None = None


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of a list call; `has_next` False also for an answer without pagination."""

    items: list[ListedJob]
    has_next: bool
    total_count: int | None


class Lister(Protocol):
    """A kind with a list call (`dataset`, `redteam`; a run has none)."""

    name: str
    list_path: str
    # the keys `discover[].match` may name
    match_fields: frozenset[str]

    def parse_list(self, payload: object, status: str) -> ListPage:
        """The page of a decoded 200 list answer for the status filter `status`."""
        ...
