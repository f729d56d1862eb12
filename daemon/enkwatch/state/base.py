"""What every state backend keeps and offers: the records and three small protocols.

The mapping between a record and its columns is written here once (`TASK_FIELDS`,
`STATE_FIELDS`: the column names are the field names in every backend).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Final, Protocol

# a `meta` row per webhook sink disabled by a 410 Gone: the key names the sink, the value is
# the fingerprint of its config then (a changed config enables it again)
DISABLED_SINK_PREFIX: Final = "disabled-sink:"


class StateError(Exception):
    """The state store cannot be opened or is not ours."""


@dataclass(slots=True)
class TaskRecord:
    """What the store keeps about one task."""

    task_key: str
    task_id: str | None
    dataset: str | None
    watch_started_at: float
    last_status: str | None = None
    last_unknown_status: str | None = None
    seen_dataset: str | None = None
    seen_task_id: str | None = None
    seq: int = 0
    polls: int = 0
    outcome: str | None = None
    # wall time (epoch seconds) at which last_status was first seen, and the status in which
    # task.stalled was emitted (once per status: None again after the next transition)
    status_since: float | None = None
    stalled_status: str | None = None
    spec: dict[str, Any] | None = field(default=None)


# the columns of a task row, in this order, `spec` (JSON) last
TASK_FIELDS: Final = (
    "task_key",
    "task_id",
    "dataset",
    "watch_started_at",
    "last_status",
    "last_unknown_status",
    "seen_dataset",
    "seen_task_id",
    "seq",
    "polls",
    "outcome",
    "status_since",
    "stalled_status",
)
# what an event changes, journaled with it (WHERE task_key = ...)
STATE_FIELDS: Final = (
    "last_status",
    "last_unknown_status",
    "seen_dataset",
    "seen_task_id",
    "seq",
    "polls",
    "outcome",
    "status_since",
    "stalled_status",
)
task_values: Final = attrgetter(*TASK_FIELDS)
state_values: Final = attrgetter(*STATE_FIELDS)


# what `reset_task` clears: the task is watched again as if new (its seq goes on, so every
# event_id stays unique)
RESET_FIELDS: Final = (
    "last_status",
    "last_unknown_status",
    "outcome",
    "status_since",
    "stalled_status",
)


def record_from_row(row: Sequence[Any], spec: dict[str, Any] | None) -> TaskRecord:
    """A record from the TASK_FIELDS columns of a row (in that order) and its decoded spec."""
    record = TaskRecord(*row[: len(TASK_FIELDS)])
    record.spec = spec
    return record


def reset_record(record: TaskRecord, watch_started_at: float) -> None:
    """`forget`: the record of a task that ended, made new again (seq and seen ids kept)."""
    for name in RESET_FIELDS:
        setattr(record, name, None)
    record.polls = 0
    record.watch_started_at = watch_started_at


@dataclass(frozen=True, slots=True)
class JournaledEvent:
    """An event that was committed but whose writing was not confirmed."""

    task_key: str
    seq: int
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending delivery."""

    id: int
    sink: str
    task_key: str
    body: bytes
    created_at: float
    attempts: int
    next_attempt_at: float


class TaskState(Protocol):
    """The watch list's durable side."""

    async def load_tasks(self) -> dict[str, TaskRecord]: ...

    async def load_task(self, task_key: str) -> TaskRecord | None: ...

    async def add_task(self, record: TaskRecord) -> None: ...

    async def add_tasks(self, records: Sequence[TaskRecord]) -> None: ...

    async def set_task_spec(self, task_key: str, spec: Mapping[str, Any] | None) -> None: ...

    async def checkpoint_polls(self, polls: Iterable[tuple[str, int]]) -> None: ...

    async def status_times(self) -> dict[str, str]: ...

    async def reset_task(self, task_key: str, watch_started_at: float) -> bool: ...


class EventJournal(Protocol):
    """Every task event, committed with the state change it reports, before it is written."""

    async def record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str] = ()
    ) -> None: ...

    async def mark_written(self, task_key: str, seq: int) -> None: ...

    def confirm_written(self, task_key: str, seq: int) -> None:
        """`mark_written` from a callback: the confirmation is committed soon after."""
        ...

    async def enqueue(self, sinks: Sequence[str], event: Mapping[str, Any]) -> None: ...

    def commit_now(self) -> None:
        """Shutdown: events staged for a group commit are committed without waiting for the
        commit window (a backend without one has nothing to do)."""
        ...

    def concurrent_writers(self, count: int) -> None:
        """How many events may wait for a group commit at once (the polls that may run at
        once): a batch holding a good share of them is committed without waiting for its
        window, as no slot is free for a poll that could join it."""
        ...


class OutboxStore(Protocol):
    """What webhook delivery needs of the state."""

    async def pending_deliveries(self, sink: str, limit: int) -> list[OutboxRow]: ...

    async def outbox_heads(self, sink: str, limit: int) -> list[OutboxRow]: ...

    async def delivery_done(self, row_id: int) -> None: ...

    async def deliveries_done(self, row_ids: Sequence[int]) -> None: ...

    async def delivery_retry(self, row_id: int, attempts: int, next_attempt_at: float) -> None: ...

    async def delivery_dead(self, row_id: int) -> None: ...

    def outbox_stats(self) -> tuple[int, float | None]: ...

    async def disabled_sinks(self) -> dict[str, str]: ...

    async def disable_sink(self, sink: str, fingerprint: str) -> int: ...

    async def enable_sink(self, sink: str) -> None: ...


class Store(TaskState, EventJournal, OutboxStore, Protocol):
    """A whole backend: the three protocols, opened and closed."""

    shared: bool

    async def open(self) -> None: ...

    async def unwritten_events(self) -> list[JournaledEvent]: ...

    async def close(self) -> None: ...
