"""Metrics: counters after polls and events, the gauges read at scrape time, bounded labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from enkwatch import events as ev
from enkwatch.clock import FakeClock
from enkwatch.config import PollingConfig, validate_task_entry
from enkwatch.limits import RequestGate
from enkwatch.metrics import Metrics, StateGauges
from enkwatch.state.base import TaskRecord
from enkwatch.watch import TaskWatch

TASK_ID = "data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668"


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def task(key: str, status: str | None = None, failures: int = 0) -> TaskWatch:
    record = TaskRecord(key, key, None, watch_started_at=0.0)
    record.last_status = status
    watch = TaskWatch.from_config(validate_task_entry({"task_id": key}), PollingConfig(), record)
    watch.failures = failures
    return watch


def transition(previous: str | None, status: str, **extra: object) -> dict[str, object]:
    return {
        "event": ev.TASK_TRANSITION,
        "previous_status": previous,
        "status": status,
        "task_id": TASK_ID,
        "dataset": "Election2",
        "task_key": TASK_ID,
        "event_id": f"{TASK_ID}:1",
        "url": "http://127.0.0.1:9/datasets/get-task",
        **extra,
    }


def test_polls_are_counted_by_outcome_with_their_latency() -> None:
    metrics = Metrics(FakeClock())
    metrics.observe_poll("dataset", "ok", 0.02)
    metrics.observe_poll("dataset", "ok", 0.03)
    metrics.observe_poll("dataset", "http_status", 0.5)
    assert value(metrics, "enkwatch_polls_total", kind="dataset", outcome="ok") == 2
    assert value(metrics, "enkwatch_polls_total", kind="dataset", outcome="http_status") == 1
    assert value(metrics, "enkwatch_poll_duration_seconds_count") == 3
    assert value(metrics, "enkwatch_poll_duration_seconds_bucket", le="0.025") == 1


def test_events_transitions_reloads_and_time_to_terminal() -> None:
    metrics = Metrics(FakeClock())
    metrics.observe_event(transition(None, "Queued"))
    metrics.observe_event(
        transition(
            "Queued",
            "Finished",
            terminal=True,
            created_at="2026-01-01T10:00:00Z",
            timestamp="2026-01-01T10:02:00.000000Z",
        )
    )
    metrics.observe_event({"event": ev.CONFIG_RELOADED})
    metrics.observe_event({"event": ev.CONFIG_RELOAD_FAILED})
    metrics.observe_event({"event": ev.TASK_POLL_FAILED, "task_id": TASK_ID})
    assert value(metrics, "enkwatch_events_total", event=ev.TASK_TRANSITION) == 2
    assert value(metrics, "enkwatch_events_total", event=ev.TASK_POLL_FAILED) == 1
    assert (
        value(
            metrics,
            "enkwatch_transitions_total",
            kind="dataset",
            from_status="none",
            to_status="Queued",
        )
        == 1
    )
    assert (
        value(
            metrics,
            "enkwatch_transitions_total",
            kind="dataset",
            from_status="Queued",
            to_status="Finished",
        )
        == 1
    )
    assert value(metrics, "enkwatch_config_reloads_total", result="ok") == 1
    assert value(metrics, "enkwatch_config_reloads_total", result="failed") == 1
    assert value(metrics, "enkwatch_task_time_to_terminal_seconds_sum", status="Finished") == 120
    # a terminal event without a usable created_at is counted, not timed
    metrics.observe_event(transition("Running", "Failed", terminal=True, created_at="?"))
    assert value(metrics, "enkwatch_task_time_to_terminal_seconds_count", status="Failed") is None


def test_the_gauges_are_read_from_the_live_state_at_scrape_time() -> None:
    clock = FakeClock()
    tasks = [task("a", "Running"), task("b", "Running", failures=2), task("c", failures=5)]
    tasks[0].status_since = clock.now().timestamp() - 30
    tasks[0].record.stalled_status = "Running"  # task.stalled was emitted
    done = task("d", "Finished")
    done.record.outcome = "Finished"
    tasks.append(done)
    replication: dict[str, float] | None = None
    metrics = Metrics(clock)
    metrics.registry.register(
        StateGauges(
            clock,
            lambda: tasks,
            RequestGate(0, clock),
            lambda: 3,
            lambda: (4, 12.5, 1),
            lambda: replication,
        )
    )
    assert value(metrics, "enkwatch_tasks", kind="dataset", status="Running") == 2
    assert value(metrics, "enkwatch_tasks", kind="dataset", status="none") == 1
    assert value(metrics, "enkwatch_tasks", kind="dataset", status="Finished") == 1
    assert (
        value(metrics, "enkwatch_tasks", kind="dataset", status="Failed") == 0
    )  # every known status shown
    assert value(metrics, "enkwatch_task_status_age_seconds_max", status="Running") is not None
    assert value(metrics, "enkwatch_task_status_age_seconds_max", status="Finished") is None
    assert value(metrics, "enkwatch_tasks_failing") == 2
    assert value(metrics, "enkwatch_consecutive_failures_max") == 5
    assert value(metrics, "enkwatch_polls_in_flight") == 3
    assert value(metrics, "enkwatch_outbox_pending") == 4
    assert value(metrics, "enkwatch_outbox_oldest_age_seconds") == 12.5
    assert value(metrics, "enkwatch_webhook_sinks_disabled") == 1
    assert value(metrics, "enkwatch_tasks_stalled", kind="dataset") == 1
    assert value(metrics, "enkwatch_retry_after_remaining_seconds") == 0
    assert value(metrics, "enkwatch_partitions_owned") is None  # a sole owner: no replica metrics

    tasks.append(task("e", "Queued"))  # read at the next scrape, not copied at registration
    assert value(metrics, "enkwatch_tasks", kind="dataset", status="Queued") == 1
    replication = {
        "partitions_owned": 32,
        "leases_lost": 1,
        "fenced": 2,
        "conflicts": 0,
        "commits": 9,
    }
    assert value(metrics, "enkwatch_partitions_owned") == 32
    assert value(metrics, "enkwatch_fenced_transitions_total") == 2


def test_no_task_id_dataset_or_url_in_any_label() -> None:
    clock = FakeClock()
    metrics = Metrics(clock)
    metrics.registry.register(
        StateGauges(
            clock,
            lambda: [task(TASK_ID, "Running", failures=1)],
            RequestGate(0, clock),
            lambda: 0,
            lambda: (0, None, 0),
            lambda: None,
        )
    )
    metrics.observe_poll("dataset", "connection", 0.1)
    metrics.observe_event(transition(None, "Queued"))
    metrics.observe_event(transition("Queued", "Finished", terminal=True))
    metrics.deliveries.labels("pager", "delivered").inc()
    text = metrics.render().decode()
    assert TASK_ID not in text and "Election2" not in text and "127.0.0.1" not in text
    values = {
        v
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        for v in sample.labels.values()
    }
    assert values  # there are labels, and none of them is a task's or a peer's
    assert not any("://" in v or v.startswith("data-generation-") for v in values)


def test_discovery_is_counted_by_kind() -> None:
    metrics = Metrics(FakeClock())
    metrics.observe_discovery("redteam", "pages", 1)
    metrics.observe_discovery("redteam", "pages", 1)
    metrics.observe_discovery("redteam", "jobs_found", 230)
    metrics.observe_discovery("dataset", "sweeps")
    assert value(metrics, "enkwatch_discovery_pages_total", kind="redteam") == 2
    assert value(metrics, "enkwatch_discovery_jobs_found_total", kind="redteam") == 230
    assert value(metrics, "enkwatch_discovery_sweeps_total", kind="dataset") == 1
    assert value(metrics, "enkwatch_discovery_sweeps_total", kind="redteam") is None
