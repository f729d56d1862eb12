"""Prometheus metrics (the official client, a registry per service); no label holds a secret."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from enkwatch import events as ev
from enkwatch.clock import Clock
from enkwatch.kinds import KINDS
from enkwatch.limits import RequestGate
from enkwatch.output import Lines
from enkwatch.watch import TaskWatch

# no `_created` series: a counter's creation time is noise on a dashboard (and doubles the
# series); prometheus_client's switch is process-wide, as its PROMETHEUS_DISABLE_CREATED_SERIES
disable_created_metrics()  # type: ignore[no-untyped-call]

_RELOAD_RESULTS: Final = {ev.CONFIG_RELOADED: "ok", ev.CONFIG_RELOAD_FAILED: "failed"}
_LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TERMINAL_BUCKETS: Final = (60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400, 259200)


DISCOVERY_COUNTERS: Final[dict[str, str]] = {
    "sweeps": "Discovery sweeps that read every page of their entry, by kind of job.",
    "failed_sweeps": "Discovery sweeps that failed (then retried with backoff), by kind.",
    "pages": "List pages requested by discovery, by kind of job.",
    "jobs_found": "Matching jobs named by the list pages of successful sweeps, by kind.",
    "jobs_added": "Jobs discovery added to the watch list (new ones), by kind of job.",
}


def _discovery_counters(registry: CollectorRegistry) -> dict[str, Counter]:
    return {
        what: Counter(f"enkwatch_discovery_{what}", doc, ["kind"], registry=registry)
        for what, doc in DISCOVERY_COUNTERS.items()
    }


class Metrics:
    """Every metric of the daemon; the service feeds it, `/metrics` renders it."""

    def __init__(self, clock: Clock, replicas: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.polls = Counter(
            "enkwatch_polls",
            "Polls (requests) by kind of job and outcome: ok or the error kind.",
            ["kind", "outcome"],
            registry=r,
        )
        self.poll_latency = Histogram(
            "enkwatch_poll_duration_seconds",
            "Time from sending a request to its classified answer.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.transitions = Counter(
            "enkwatch_transitions",
            "Status transitions emitted, by kind of job, previous and new status.",
            ["kind", "from_status", "to_status"],
            registry=r,
        )
        self.events = Counter("enkwatch_events", "Events emitted, by name.", ["event"], registry=r)
        self.time_to_terminal = Histogram(
            "enkwatch_task_time_to_terminal_seconds",
            "From a task's created_at to the poll that saw it Finished or Failed.",
            ["status"],
            buckets=_TERMINAL_BUCKETS,
            registry=r,
        )
        self.deliveries = Counter(
            "enkwatch_webhook_deliveries",
            "Webhook deliveries by sink and outcome "
            "(delivered, failed, dead_lettered, filtered, disabled).",
            ["sink", "outcome"],
            registry=r,
        )
        restarts = "Times the webhook delivery process ended unasked and was started again."
        self.delivery_restarts = Counter("enkwatch_delivery_process_restarts", restarts, registry=r)
        self.reloads = Counter(
            "enkwatch_config_reloads",
            "Config reloads by result (ok, failed).",
            ["result"],
            registry=r,
        )
        self.clock_steps = Counter(
            "enkwatch_wall_clock_steps",
            "Steps of the wall clock (NTP, a VM resumed) after which every scheduled job was "
            "re-based on the new wall time.",
            registry=r,
        )
        # replicas only: a single daemon shows no replica metric
        self.takeover = _takeover_histogram(r) if replicas else None
        self._poll_children: dict[tuple[str, str], Any] = {}
        self._event_children: dict[str, Any] = {}
        self._transition_children: dict[tuple[str, str, str], Any] = {}
        # discovery (`discover:` entries), by kind of job: what `observe_discovery` counts
        self.discovery = _discovery_counters(r)

    def observe_takeover(self, seconds: float) -> None:
        if self.takeover is not None:
            self.takeover.observe(seconds)

    def observe_poll(self, kind: str, outcome: str, seconds: float) -> None:
        # a poll's hot path: the labelled child is looked up once per outcome, then cached
        child = self._poll_children.get((kind, outcome))
        if child is None:
            child = self._poll_children[kind, outcome] = self.polls.labels(kind, outcome)
        child.inc()
        self.poll_latency.observe(seconds)

    def observe_discovery(self, kind: str, what: str, count: int = 1) -> None:
        """A discovery count: `what` is one of DISCOVERY_COUNTERS."""
        self.discovery[what].labels(kind).inc(count)

    def observe_event(self, body: Mapping[str, Any]) -> None:
        # an event's hot path: each labelled child is looked up once, then cached (the
        # label values are event names and the kinds' statuses: a few dozen)
        name = body.get("event", "")
        child = self._event_children.get(name)
        if child is None:
            child = self._event_children[name] = self.events.labels(name)
        child.inc()
        if name in _RELOAD_RESULTS:
            self.reloads.labels(_RELOAD_RESULTS[name]).inc()
        if name != ev.TASK_TRANSITION:
            return
        labels = (
            body.get("kind") or "dataset",
            body.get("previous_status") or "none",
            body.get("status") or "none",
        )
        child = self._transition_children.get(labels)
        if child is None:
            child = self._transition_children[labels] = self.transitions.labels(*labels)
        child.inc()
        if body.get("terminal"):
            created = _parse_time(body.get("created_at"))
            seen = _parse_time(body.get("timestamp"))
            if created is not None and seen is not None:
                self.time_to_terminal.labels(labels[2]).observe(
                    max(0.0, (seen - created).total_seconds())
                )

    def watch_stdout(self, out: Lines) -> None:
        """The stdout writer's gauges (a stalled reader shows here and on /healthz)."""
        self.registry.register(_StdoutGauges(out))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StdoutGauges(Collector):
    """The stdout writer, read at scrape time."""

    def __init__(self, out: Lines) -> None:
        self._out = out

    def collect(self) -> Iterator[Metric]:
        out = self._out
        yield GaugeMetricFamily(
            "enkwatch_stdout_stalled_seconds",
            "How long event lines have waited with no write to stdout getting through "
            "(0 when none waits).",
            value=out.stalled_s(),
        )
        yield GaugeMetricFamily(
            "enkwatch_stdout_queued_bytes",
            "Bytes of event lines queued for the stdout reader.",
            value=out.queued_bytes,
        )
        yield CounterMetricFamily(
            "enkwatch_stdout_dropped_lines",
            "Daemon event lines dropped because the stdout reader stalled (task events are "
            "never dropped: they wait, and are written again after a restart).",
            value=out.dropped,
        )


def _takeover_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "enkwatch_partition_takeover_seconds",
        "Replicas: from a partition's last renewal by a replica that died or froze to "
        "its claim by this one (the lease plus the time it lay unclaimed).",
        buckets=(5, 10, 15, 20, 25, 30, 45, 60, 120),
        registry=registry,
    )


class StateGauges(Collector):
    """Gauges read from the live state at scrape time (cheap: one pass over the tasks).

    Registered into the service's registry once the pieces it reads exist.
    """

    def __init__(
        self,
        clock: Clock,
        tasks: Callable[[], Iterable[TaskWatch]],
        gate: RequestGate,
        in_flight: Callable[[], int],
        outbox: Callable[[], tuple[int, float | None, int]],
        replication: Callable[[], dict[str, float] | None],
    ) -> None:
        self._clock = clock
        self.tasks = tasks
        self._gate = gate
        self.in_flight = in_flight
        self.outbox = outbox
        self.replication = replication

    def collect(self) -> Iterator[Metric]:
        return self._families(self.tasks())

    def describe(self) -> Iterator[Metric]:
        """The families, for their names when registered: without a pass over the tasks
        (prometheus_client would call collect, 0.07 s at start-up with 100,000 tasks)."""
        return self._families(())

    def _families(self, tasks: Iterable[TaskWatch]) -> Iterator[Metric]:
        yield from self._task_gauges(tasks)
        yield GaugeMetricFamily(
            "enkwatch_polls_in_flight", "Requests in flight now.", value=self.in_flight()
        )
        yield from self._gate_metrics()
        yield from self._replica_metrics()
        pending, oldest, disabled = self.outbox()
        yield GaugeMetricFamily(
            "enkwatch_webhook_sinks_disabled",
            "Webhook sinks disabled because their receiver answered 410 Gone (until their "
            "config changes).",
            value=disabled,
        )
        yield GaugeMetricFamily(
            "enkwatch_outbox_pending", "Webhook deliveries waiting in the outbox.", value=pending
        )
        yield GaugeMetricFamily(
            "enkwatch_outbox_oldest_age_seconds",
            "Age of the oldest undelivered webhook delivery (0 when none).",
            value=oldest or 0.0,
        )

    def _task_gauges(self, watched: Iterable[TaskWatch]) -> Iterator[Metric]:
        by_status: Tally[tuple[str, str]] = Tally()
        stalled: Tally[str] = Tally()
        age_by_status: dict[str, float] = {}
        failing = 0
        worst = 0
        now = self._clock.now().timestamp()
        for task in watched:
            label = _status_label(task)
            by_status[task.kind.name, label] += 1
            if not task.done:
                since = task.record.status_since or task.record.watch_started_at
                age_by_status[label] = max(age_by_status.get(label, 0.0), now - since)
                if task.record.stalled_status is not None:
                    stalled[task.kind.name] += 1
            if task.failures:
                failing += 1
                worst = max(worst, task.failures)
        tasks = GaugeMetricFamily(
            "enkwatch_tasks",
            "Watched tasks by kind of job and current status.",
            labels=["kind", "status"],
        )
        for kind in KINDS.values():
            for status in (*sorted(kind.statuses), "unknown", "none", "gave_up"):
                tasks.add_metric([kind.name, status], by_status.get((kind.name, status), 0))
        yield tasks
        age = GaugeMetricFamily(
            "enkwatch_task_status_age_seconds_max",
            "The longest time any watched, non-terminal task has been in its current status.",
            labels=["status"],
        )
        for status, seconds in sorted(age_by_status.items()):
            age.add_metric([status], seconds)
        yield age
        yield GaugeMetricFamily(
            "enkwatch_tasks_failing", "Tasks whose last poll failed.", value=failing
        )
        stalls = GaugeMetricFamily(
            "enkwatch_tasks_stalled",
            "Tasks stalled now (task.stalled was emitted for their current status), by kind.",
            labels=["kind"],
        )
        for kind_name in sorted(KINDS.keys() | stalled.keys()):
            stalls.add_metric([kind_name], stalled.get(kind_name, 0))
        yield stalls
        yield GaugeMetricFamily(
            "enkwatch_consecutive_failures_max",
            "The longest run of consecutive failed polls of any task.",
            value=worst,
        )

    def _gate_metrics(self) -> Iterator[Metric]:
        gate = self._gate
        waits = CounterMetricFamily(
            "enkwatch_rate_limit_waits",
            "Requests that waited for the requests-per-second limit.",
            value=gate.limit_waits if gate else 0,
        )
        yield waits
        yield CounterMetricFamily(
            "enkwatch_rate_limit_wait_seconds",
            "Time requests spent waiting for the rate limit or a Retry-After pause.",
            value=gate.wait_seconds if gate else 0.0,
        )
        yield CounterMetricFamily(
            "enkwatch_retry_after_pauses",
            "Retry-After answers that paused every task.",
            value=gate.pauses if gate else 0,
        )
        yield GaugeMetricFamily(
            "enkwatch_retry_after_remaining_seconds",
            "Seconds left in the current Retry-After pause.",
            value=gate.pause_remaining() if gate else 0.0,
        )

    def _replica_metrics(self) -> Iterator[Metric]:
        stats = self.replication()
        if stats is not None:
            yield GaugeMetricFamily(
                "enkwatch_partitions_owned",
                "Replicas: partitions (shares of the watch list) this replica holds.",
                value=stats["partitions_owned"],
            )
            for name, key, doc in (
                ("enkwatch_leases_lost", "leases_lost", "Partitions lost or shed."),
                (
                    "enkwatch_fenced_transitions",
                    "fenced",
                    "Events refused because this replica no longer held the lease.",
                ),
                (
                    "enkwatch_conflicting_transitions",
                    "conflicts",
                    "Events refused because another writer had moved the task's seq.",
                ),
                ("enkwatch_state_commits", "commits", "Database transactions committed."),
            ):
                yield CounterMetricFamily(name, f"Replicas: {doc}", value=stats[key])


def _status_label(task: TaskWatch) -> str:
    if task.gave_up:
        return "gave_up"
    if task.record.last_unknown_status is not None:
        return "unknown"
    return task.record.last_status or "none"


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
