"""The human console format: the line of every event, colour rules, the end-of-run table."""

from __future__ import annotations

import io
import re
from datetime import UTC
from typing import Any

import pytest
import structlog

from enkwatch import events as ev
from enkwatch.clock import SystemClock
from enkwatch.console import (
    ConsoleRenderer,
    TaskSummary,
    duration,
    plain,
    print_summary,
    short_task_id,
    use_colour,
)

TASK_ID = "data-generation-e2e00004-0000-4000-8000-000000000004"
STAMP = "2026-11-28T13:07:40.123456Z"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# what must never reach a person: Python's reprs and the machine's long fields
REPRS = ("None", "True", "False", "{'", "['", "':")


def task_fields(**extra: Any) -> dict[str, Any]:
    return {
        "timestamp": STAMP,
        "task_id": TASK_ID,
        "dataset": "FinanceQA",
        "task_key": TASK_ID,
        "seq": 3,
        "event_id": f"{TASK_ID}:3",
        **extra,
    }


# one realistic event of every name the daemon writes (events.py), with its fields
EXAMPLES: dict[str, dict[str, Any]] = {
    ev.DAEMON_STARTED: {"version": "0.4.0", "tasks": 3},
    ev.TASK_TRANSITION: task_fields(
        labels={"team": "safety"},
        previous_status="Running",
        status="Failed",
        terminal=True,
        polls=5,
        created_at="2026-11-28T13:07:30.000000+00:00",
        started_at=None,
        watched_seconds=4.4,
    ),
    ev.TASK_POLL_FAILED: task_fields(
        error="http_status",
        http_status=503,
        detail="HTTP 503",
        attempt=2,
        retry_in_seconds=1.25,
    ),
    ev.TASK_UNKNOWN_STATUS: task_fields(status="Paused"),
    ev.TASK_GAVE_UP: task_fields(
        reason="deadline_exceeded", last_status=None, polls=1, watched_seconds=7300.0
    ),
    ev.TASK_STALLED: task_fields(
        status="Queued", stalled_seconds=3725.5, polls=124, watched_seconds=3730.0
    ),
    ev.SINK_DISABLED: {
        "sink": "ops",
        "http_status": 410,
        "dropped_deliveries": 3,
        "hint": "the receiver answered 410 Gone; change this sink's config to enable it again",
    },
    ev.TASK_DISCOVERED: task_fields(kind="redteam", source="discovered", labels={"team": "a"}),
    ev.DISCOVERY_FAILED: {
        "discover": 0,
        "kind": "redteam",
        "error": "rate_limited",
        "http_status": 429,
        "detail": "HTTP 429",
        "attempt": 1,
        "retry_in_seconds": 1.0,
    },
    ev.API_AUTH_FAILED: {"http_status": 401, "hint": ev.AUTH_HINT},
    ev.CONFIG_RELOADED: {
        "added": ["a", "b"],
        "removed": [],
        "changed": ["c"],
        "restart_required": ["api"],
    },
    ev.CONFIG_RELOAD_FAILED: {"errors": ["tasks[0].interval_seconds: must be greater than 0"]},
    ev.DAEMON_ALL_DONE: {"finished": 2, "failed": 1, "gave_up": 0},
    ev.DAEMON_STOPPING: {"reason": "signal:SIGTERM"},
    ev.DAEMON_STOPPED: {"reason": "all_done", "cancelled_polls": 0},
    ev.SINK_DELIVERY_FAILED: {
        "sink": "ops",
        "task_key": TASK_ID,
        "failed_event": "task.transition",
        "failed_event_id": f"{TASK_ID}:3",
        "attempts": 12,
        "error": "HTTP 500",
    },
    ev.STATE_UNAVAILABLE: {
        "error": "the state database is unavailable: ConnectionError",
        "retry_in_seconds": 5.0,
    },
    ev.STATE_RECOVERED: {},
    "simulator.listening": {
        "host": "127.0.0.1",
        "port": 8080,
        "url": "http://127.0.0.1:8080",
        "tasks": 4,
    },
}
LEVEL_OF = {ev.TASK_TRANSITION: ev.WARNING, ev.API_AUTH_FAILED: ev.CRITICAL}


def event_names() -> set[str]:
    """Every event name events.py defines (a new one must get an example above)."""
    return {
        value
        for name, value in vars(ev).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z]+\.[a-z_]+", value)
    }


def render(name: str, verbose: bool = False, colour: bool = False, **fields: Any) -> str:
    renderer = ConsoleRenderer(colour=colour, verbose=verbose, tz=UTC)
    body = {"timestamp": STAMP, "level": LEVEL_OF.get(name, ev.INFO), "event": name, **fields}
    line = renderer(None, "info", body)
    assert isinstance(line, str)
    return line


def test_every_event_name_has_an_example() -> None:
    assert event_names() <= EXAMPLES.keys()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_event_is_one_short_plain_line(name: str) -> None:
    line = render(name, **EXAMPLES[name])
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("13:07:40  ")
    for repr_ in REPRS:
        assert repr_ not in line, (repr_, line)
    # the long fields are for --log-level debug
    assert "event_id" not in line and "seq=" not in line and "created_at" not in line
    assert TASK_ID not in line  # shortened
    assert len(line) < 160, line


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_debug_shows_the_long_fields(name: str) -> None:
    fields = EXAMPLES[name]
    line = render(name, verbose=True, **fields)
    assert line.startswith("13:07:40.123  ")
    if "event_id" in fields:
        assert f"event_id={TASK_ID}:3" in line and "seq=3" in line
        assert TASK_ID in line  # in full
    for repr_ in REPRS:
        assert repr_ not in line, (repr_, line)


def test_the_transition_line_of_the_issue() -> None:
    line = render(ev.TASK_TRANSITION, **EXAMPLES[ev.TASK_TRANSITION])
    assert line == (
        "13:07:40  FAILED    FinanceQA  data-generation-…0004  Running -> Failed  "
        "5 polls, 4.4 s  team=safety"
    )


@pytest.mark.parametrize(
    ("name", "fields", "expected"),
    [
        (
            ev.TASK_TRANSITION,
            {"previous_status": None, "status": "Queued", "polls": 1, "watched_seconds": 0.2},
            "QUEUED    FinanceQA  data-generation-…0004  first seen Queued  1 poll, 0.2 s",
        ),
        (
            ev.TASK_POLL_FAILED,
            {"error": "http_status", "http_status": 503, "detail": "HTTP 503", "attempt": 2},
            "RETRY     FinanceQA  data-generation-…0004  HTTP 503  (attempt 2)",
        ),
        (
            ev.TASK_POLL_FAILED,
            {
                "error": "rate_limited",
                "http_status": 429,
                "detail": "HTTP 429",
                "retry_in_seconds": 90,
            },
            "RETRY     FinanceQA  data-generation-…0004  rate limited (HTTP 429)  "
            "(retry in 1 min 30 s)",
        ),
        (
            ev.TASK_POLL_FAILED,
            {"error": "connection", "http_status": None, "detail": "connection refused"},
            "RETRY     FinanceQA  data-generation-…0004  connection: connection refused",
        ),
        (
            ev.TASK_GAVE_UP,
            {"reason": "not_found", "last_status": None, "polls": 3, "watched_seconds": 0.4},
            "GAVE UP   FinanceQA  data-generation-…0004  not found (last status -)  3 polls, 0.4 s",
        ),
    ],
)
def test_task_lines(name: str, fields: dict[str, Any], expected: str) -> None:
    line = render(name, **task_fields(**fields))
    assert line == f"13:07:40  {expected}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (ev.DAEMON_STARTED, "START     enkwatch 0.4.0, watching 3 tasks"),
        (ev.DAEMON_ALL_DONE, "ALL DONE  2 finished, 1 failed, 0 gave up"),
        (ev.DAEMON_STOPPING, "STOPPING  signal:SIGTERM"),
        (ev.DAEMON_STOPPED, "STOPPED   all done"),
        (ev.CONFIG_RELOADED, "RELOADED  added a, b; changed c; restart to apply api"),
        (ev.STATE_RECOVERED, "STATE     the state database answers again"),
    ],
)
def test_daemon_lines(name: str, expected: str) -> None:
    assert render(name, **EXAMPLES[name]) == f"13:07:40  {expected}"


def test_a_dataset_only_task_before_its_first_answer_is_named_by_its_dataset() -> None:
    line = render(ev.TASK_POLL_FAILED, **task_fields(task_id=None, error="timeout"))
    assert "FinanceQA  timeout" in line


def test_an_event_it_does_not_know_is_shown_with_its_fields_in_plain_words() -> None:
    line = render("task.wedged", **task_fields(status="Queued", wedged_seconds=600.0, x=None))
    assert line.startswith("13:07:40  INFO      FinanceQA  data-generation-…0004  task.wedged")
    assert "status=Queued wedged_seconds=600 x=-" in line


def test_a_multi_line_detail_stays_on_one_line_and_is_cut() -> None:
    detail = "bad\nanswer " + "x" * 500
    line = render(ev.TASK_POLL_FAILED, **task_fields(error="invalid_response", detail=detail))
    assert "\n" not in line and "…" in line and len(line) < 200


def test_colour_by_outcome() -> None:
    finished = render(ev.TASK_TRANSITION, colour=True, **task_fields(status="Finished"))
    failed = render(ev.TASK_TRANSITION, colour=True, **task_fields(status="Failed"))
    assert "\x1b[" in finished and "\x1b[" in failed
    assert "32m" in finished  # green
    assert "31m" in failed  # red
    assert ANSI.sub("", failed) == render(ev.TASK_TRANSITION, **task_fields(status="Failed"))


@pytest.mark.parametrize(
    ("isatty", "environ", "expected"),
    [
        (True, {}, True),
        (False, {}, False),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": ""}, True),  # no-color.org: set and not empty
        (True, {"TERM": "dumb"}, False),
        (False, {"FORCE_COLOR": "1"}, True),
        (True, {"FORCE_COLOR": "1", "NO_COLOR": "1"}, False),
    ],
)
def test_when_to_colour(isatty: bool, environ: dict[str, str], expected: bool) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return isatty

    assert use_colour(Stream(), environ) is expected


def test_plain_words() -> None:
    assert plain(None) == "-"
    assert plain(True) == "yes"
    assert plain({"team": "safety", "tier": "1"}) == "team=safety tier=1"
    assert plain(["a", "b"]) == "a, b"
    assert plain(4.0) == "4"
    assert duration(4.44) == "4.4 s"
    assert duration(42) == "42 s"
    assert duration(192) == "3 min 12 s"
    assert duration(7500) == "2 h 05 min"
    assert duration(3 * 86400 + 7200) == "3 d 02 h"
    assert short_task_id("short-id") == "short-id"
    assert short_task_id(TASK_ID) == "data-generation-…0004"


def test_the_summary_table() -> None:
    out = io.StringIO()
    print_summary(
        [
            TaskSummary(TASK_ID, "FinanceQA", "Failed", 5, 4.4),
            TaskSummary("dataset:Election2", "Election2", "Finished", 3, 12.0),
            TaskSummary("data-generation-x", None, None, 3, 0.4, gave_up="not_found"),
            TaskSummary("slow", "Slow", "Running", 9, 7300.0, gave_up="deadline_exceeded"),
        ],
        out,
        environ={},
    )
    text = out.getvalue()
    assert "\x1b" not in text  # not a terminal
    for word in ("task", "dataset", "final status", "polls", "watched", "gave up"):
        assert word in text
    rows = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "Failed" in rows[TASK_ID] and "4.4 s" in rows[TASK_ID]
    assert "Finished" in rows["dataset:Election2"]
    assert "not found" in rows["data-generation-x"]
    assert "deadline exceeded" in rows["slow"] and "2 h 01 min" in rows["slow"]
    for repr_ in REPRS:
        assert repr_ not in text


def test_configure_logging_renders_the_console_format() -> None:
    out = io.StringIO()
    try:
        ev.configure_logging("console", "info", stream=out)
        ev.EventWriter(SystemClock()).daemon_event(ev.DAEMON_STARTED, version="9", tasks=1)
        ev.emit({"event": ev.TASK_TRANSITION, "level": ev.INFO, **task_fields(status="Queued")})
    finally:
        structlog.reset_defaults()
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("START     enkwatch 9, watching 1 task")
    assert "QUEUED    FinanceQA" in lines[1]
