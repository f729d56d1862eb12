"""The one event writer: build -> journal -> render -> metrics -> outbox, in that order, once."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.clock import FakeClock
from enkwatch.events import EventWriter
from enkwatch.kinds import DATASET
from enkwatch.state.base import TaskRecord


class Journal:
    """Records what the writer asks of the state, and when (against the log)."""

    def __init__(self, steps: list[str], logs: list[Any]) -> None:
        self.steps = steps
        self.logs = logs
        self.events: list[tuple[str, Sequence[str]]] = []

    async def record_event(
        self, record: TaskRecord, event: Mapping[str, Any], sinks: Sequence[str] = ()
    ) -> None:
        assert self.logs == []  # journaled before it is written out
        self.steps.append("journal")
        self.events.append((event["event_id"], list(sinks)))

    async def mark_written(self, task_key: str, seq: int) -> None:
        self.confirm_written(task_key, seq)

    def confirm_written(self, task_key: str, seq: int) -> None:
        self.steps.append(f"written {task_key}:{seq}")

    async def enqueue(self, sinks: Sequence[str], event: Mapping[str, Any]) -> None:
        self.steps.append("enqueue")


class Task:
    def __init__(self) -> None:
        self.key = "t1"
        self.task_id: str | None = "t1"
        self.dataset: str | None = None
        self.labels = {"team": "safety"}
        self.record = TaskRecord("t1", "t1", None, 0.0, seen_dataset="Election2")
        self.kind = DATASET


async def test_a_task_event_is_journaled_rendered_counted_and_queued_in_order() -> None:
    steps: list[str] = []
    with capture_logs() as logs:
        journal = Journal(steps, logs)
        writer = EventWriter(
            FakeClock(),
            journal,
            observers=[lambda body: steps.append(f"metrics {body['event']}")],
            sinks_for=lambda event: ["hook"],
            notify=lambda sinks, key: steps.append("notify"),
        )
        task = Task()
        await writer.task_event(task, ev.TASK_TRANSITION, ev.INFO, {"status": "Queued"})
    assert steps == ["journal", "written t1:1", f"metrics {ev.TASK_TRANSITION}", "notify"]
    assert journal.events == [("t1:1", ["hook"])]
    [line] = logs
    assert line["event"] == ev.TASK_TRANSITION
    assert line["seq"] == 1 and line["event_id"] == "t1:1" and task.record.seq == 1
    assert line["dataset"] == "Election2"  # the last value the API returned
    assert line["labels"] == {"team": "safety"}
    assert line["timestamp"] == "2026-01-01T00:00:00.000000Z"  # from the clock


async def test_a_daemon_event_is_rendered_counted_and_not_journaled() -> None:
    steps: list[str] = []
    with capture_logs() as logs:
        writer = EventWriter(
            FakeClock(),
            Journal(steps, []),
            observers=[lambda body: steps.append("metrics")],
            sinks_for=lambda event: (),
        )
        writer.daemon_event(ev.DAEMON_STARTED, version="x", tasks=0)
    assert steps == ["metrics"]
    assert [e["event"] for e in logs] == [ev.DAEMON_STARTED]


async def test_replayed_events_keep_their_body() -> None:
    from enkwatch.state.base import JournaledEvent

    body = {"event": ev.TASK_TRANSITION, "level": "info", "event_id": "t1:3", "seq": 3}
    with capture_logs() as logs:
        await EventWriter(FakeClock()).replay([JournaledEvent("t1", 3, body)])
    assert logs[0]["event_id"] == "t1:3"
