"""The lean event path gives the same results as the plain one: redaction's fast path, the
cached logger, the live feed's lazy messages."""

from __future__ import annotations

import io
from typing import Any

import orjson
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.livefeed import EventFeed, sse_message

SECRETS = ["sk-plain-secret", 'quo"ted\\back', "new\nline\ttab", "ünïcødé-key", "\x01ctl-key"]


def body_with(value: Any) -> dict[str, Any]:
    return {
        "timestamp": "2026-01-01T00:00:00.000000Z",
        "level": "info",
        "event": "task.transition",
        "seq": 3,
        "terminal": False,
        "detail": value,
        "labels": {"team": "safety"},
    }


@pytest.mark.parametrize("secret", SECRETS)
@pytest.mark.parametrize(
    "place",
    [
        lambda s: f"before {s} after",
        lambda s: [1, {"deep": [f"x{s}"]}],
        lambda s: {"k": (f"{s}", "other")},
        lambda s: s,
    ],
)
def test_redaction_finds_a_secret_wherever_scrub_does(secret: str, place: Any) -> None:
    needles = ev.secret_needles(SECRETS)
    body = body_with(place(secret))
    assert ev.redacted(body, SECRETS, needles) == ev.scrub(body, SECRETS)
    assert secret not in orjson.dumps(ev.redacted(body, SECRETS, needles)).decode()


def test_a_body_without_secrets_is_returned_as_is() -> None:
    body = body_with('nothing to hide: sk-plain-secre, quo\\"ted')
    assert ev.redacted(body, SECRETS, ev.secret_needles(SECRETS)) is body


def test_a_body_orjson_cannot_serialize_is_scrubbed_the_slow_way() -> None:
    body = body_with({1: "sk-plain-secret"})  # a non-str key
    assert ev.redacted(body, SECRETS, ev.secret_needles(SECRETS)) == ev.scrub(body, SECRETS)


def test_rfc3339_is_utc_with_microseconds_and_a_z() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    moment = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=UTC)
    assert ev.rfc3339(moment) == "2026-03-04T05:06:07.000089Z"
    east = moment.astimezone(timezone(timedelta(hours=2)))
    assert ev.rfc3339(east) == "2026-03-04T05:06:07.000089Z"


def test_render_follows_every_reconfiguration() -> None:
    stream = io.StringIO()
    ev.configure_logging(stream=stream)
    body = body_with("x")
    line = ev.render(body)
    assert line is not None and orjson.loads(line)["event"] == "task.transition"
    assert list(orjson.loads(line))[:3] == ["timestamp", "level", "event"]
    with capture_logs() as logs:  # a capture in between: taken by the capture
        assert ev.render(body) is None
    assert logs[0]["event"] == "task.transition" and logs[0]["log_level"] == "info"
    assert "level" not in logs[0] or logs[0]["level"] == "info"
    assert ev.render(body) == line  # the JSON renderer again
    ev.configure_logging(stream=stream, level="warning")
    assert ev.render(body) is None  # filtered out by the new level
    warning = ev.render({**body, "level": "warning"})
    assert warning is not None and orjson.loads(warning)["level"] == "warning"
    ev.configure_logging("console", stream=stream)
    console = ev.render(body)
    assert console is not None and not console.startswith(b"{")
    ev.configure_logging(stream=stream)
    structlog.reset_defaults()


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text() | st.datetimes(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
_FIELDS = st.dictionaries(st.text(), _VALUES, max_size=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    before=_FIELDS,
    after=_FIELDS,
    level=st.sampled_from([None, "info", "INFO", "Warning", "error", "critical"]),
    timestamp=st.none() | st.text(max_size=30),
)
def test_the_json_line_is_the_processor_chain_s_line(
    monkeypatch: pytest.MonkeyPatch,
    before: dict[str, Any],
    after: dict[str, Any],
    level: str | None,
    timestamp: str | None,
) -> None:
    """The JSON format's chain done in one step makes the same bytes as structlog's
    processors (a timestamp given: the chain would take its own now)."""
    ev.configure_logging(stream=io.StringIO())
    # the writer always gives a valid level (an invalid one raises before either path)
    fields = {k: v for k, v in before.items() if k != "level"}
    body: dict[str, Any] = {**fields, "event": "task.transition", "timestamp": timestamp}
    if level is not None:
        body["level"] = level
    body.update({k: v for k, v in after.items() if k not in ("event", "level", "timestamp")})
    fast = ev.render(body)
    with monkeypatch.context() as patch:
        patch.setattr(ev._Output, "json_chain", None)  # through the processors
        slow = ev.render(body)
    assert fast == slow
    structlog.reset_defaults()


def test_the_json_line_without_a_timestamp_gets_one_first() -> None:
    ev.configure_logging(stream=io.StringIO())
    line = ev.render({"a": 1, "event": "daemon.started", "level": "WARNING", "b": 2})
    assert line is not None and line.endswith(b"}\n")
    loaded = orjson.loads(line)
    assert list(loaded) == ["timestamp", "level", "event", "a", "b"]
    assert loaded["level"] == "warning" and loaded["timestamp"].endswith("Z")
    structlog.reset_defaults()


def test_the_feed_makes_a_message_only_when_one_is_wanted() -> None:
    feed = EventFeed(ring_size=2)
    first = {"event": "task.transition", "event_id": "t:1", "seq": 1}
    feed.publish(first)
    assert feed._ring[0][2] == orjson.dumps(first)  # nobody reads: only its JSON is kept
    reader = feed.connect()
    assert reader is not None
    second = {"event": "task.transition", "event_id": "t:2", "seq": 2}
    feed.publish(second)
    expected = sse_message(orjson.dumps(second), "t:2")
    assert reader.queue.get_nowait() == expected
    assert feed.since("t:1") == [expected]
    assert list(feed) == [sse_message(orjson.dumps(first), "t:1"), expected]
    feed.publish({"event": "daemon.started"})  # the ring forgets t:1 and its position
    assert feed.since("t:1") is None
    assert len(feed._positions) == 1
