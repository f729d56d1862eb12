"""Payload formats and templates: each checked against what its receiver documents it needs."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from hypothesis import given, settings
from hypothesis import strategies as st

from enkwatch.config import WebhookConfig, parse_config
from enkwatch.errors import ConfigError
from enkwatch.formats import (
    CLOUDEVENTS_TYPE,
    FormatError,
    build_format,
    message_id,
    pagerduty_action,
)
from enkwatch.templates import SAMPLE_EVENT, TemplateProblem, compile_template

FAILED = {
    "timestamp": "2026-01-01T10:00:00.123456Z",
    "level": "warning",
    "event": "task.transition",
    "task_id": "data-generation-1",
    "dataset": "Election2",
    "task_key": "data-generation-1",
    "seq": 7,
    "event_id": "data-generation-1:7",
    "labels": {"team": "safety"},
    "previous_status": "Running",
    "status": "Failed",
    "terminal": True,
    "polls": 3,
}
FINISHED = FAILED | {"status": "Finished", "level": "info", "seq": 8, "event_id": "x:8"}
GAVE_UP = {
    "timestamp": "2026-01-01T10:00:00.000000Z",
    "level": "error",
    "event": "task.gave_up",
    "task_key": "dataset:Other",
    "dataset": "Other",
    "task_id": None,
    "seq": 2,
    "event_id": "dataset:Other:2",
    "reason": "deadline_exceeded",
    "last_status": "Running",
}
STARTED = {"timestamp": "2026-01-01T10:00:00.5Z", "level": "info", "event": "daemon.started"}


def hook(**kw: Any) -> WebhookConfig:
    return WebhookConfig.model_validate({"url": "https://receiver.example/x", **kw})


def render(fmt_cfg: WebhookConfig, event: dict[str, Any], key: str | None = None) -> Any:
    raw = orjson.dumps(event)
    payload = build_format(fmt_cfg, key).render(event, raw, message_id(event, raw))
    return payload


def test_json_is_the_journaled_event_byte_for_byte() -> None:
    raw = orjson.dumps(FAILED)
    payload = build_format(hook()).render(FAILED, raw, "id")
    assert payload.body is raw and payload.content_type == "application/json"


def test_message_ids_are_event_ids_else_a_stable_digest() -> None:
    assert message_id(FAILED, orjson.dumps(FAILED)) == "data-generation-1:7"
    raw = orjson.dumps(STARTED)
    first = message_id(STARTED, raw)
    assert first == message_id(STARTED, raw) and first.startswith("daemon.started:")
    other = STARTED | {"timestamp": "2026-01-01T10:00:00.6Z"}
    assert message_id(other, orjson.dumps(other)) != first


def test_cloudevents_structured_mode_parses_with_the_sdk() -> None:
    payload = render(hook(format="cloudevents", source="urn:enkwatch:prod"), FAILED)
    assert payload.content_type == CLOUDEVENTS_TYPE
    message = HTTPMessage(headers={"content-type": payload.content_type}, body=payload.body)
    event = from_http_event(message)
    assert event.get_id() == "data-generation-1:7"
    assert event.get_source() == "urn:enkwatch:prod"
    assert event.get_type() == "enkwatch.task.transition"
    assert event.get_subject() == "data-generation-1"
    assert event.get_time() is not None and event.get_time().year == 2026
    assert event.get_data() == FAILED
    assert event.get_extension("sequence") == "00000000000000000007"
    # the sequence sorts as the number does
    later = render(hook(format="cloudevents"), FAILED | {"seq": 10})
    seqs = [json.loads(p.body)["sequence"] for p in (payload, later)]
    assert seqs == sorted(seqs)


def test_cloudevents_of_an_event_not_about_a_task() -> None:
    payload = render(hook(format="cloudevents"), STARTED)
    event = from_http_event(HTTPMessage({"content-type": CLOUDEVENTS_TYPE}, payload.body))
    assert event.get_type() == "enkwatch.daemon.started"
    assert event.get_subject() is None and event.get_id().startswith("daemon.started:")


def test_slack_has_a_text_fallback_and_blocks_and_escapes_mrkdwn() -> None:
    body = json.loads(render(hook(format="slack"), FAILED | {"task_key": "<!channel> & co"}).body)
    assert body["text"].startswith("&lt;!channel&gt; &amp; co")
    assert "Running → Failed" in body["text"]
    [section, context] = body["blocks"]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert context["type"] == "context" and context["elements"][0]["type"] == "mrkdwn"
    assert "label team: safety" in context["elements"][0]["text"]


def test_teams_is_a_workflows_message_with_an_adaptive_card() -> None:
    body = json.loads(render(hook(format="teams"), GAVE_UP).body)
    assert body["type"] == "message"
    [attachment] = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = attachment["content"]
    assert card["type"] == "AdaptiveCard" and card["version"] == "1.4"
    assert card["body"][0]["type"] == "TextBlock" and "gave up" in card["body"][0]["text"]
    assert card["body"][0]["color"] == "Attention"
    facts = {f["title"]: f["value"] for f in card["body"][1]["facts"]}
    assert facts["reason"] == "deadline_exceeded"


def test_pagerduty_triggers_on_failures_and_resolves_on_finished() -> None:
    cfg = hook(format="pagerduty", routing_key={"env": "PD_KEY"})
    fmt = build_format(cfg, "R0UTINGKEY")
    trigger = json.loads(render(cfg, FAILED, "R0UTINGKEY").body)
    # Events API v2: routing_key, event_action, payload.summary/source/severity
    assert trigger["routing_key"] == "R0UTINGKEY"
    assert trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == "data-generation-1"
    assert trigger["payload"]["severity"] in {"critical", "error", "warning", "info"}
    assert trigger["payload"]["source"] == "enkwatch"
    assert 0 < len(trigger["payload"]["summary"]) <= 1024
    assert trigger["payload"]["custom_details"] == FAILED
    gave_up = json.loads(render(cfg, GAVE_UP, "R0UTINGKEY").body)
    assert gave_up["event_action"] == "trigger" and gave_up["dedup_key"] == "dataset:Other"
    resolve = json.loads(render(cfg, FINISHED, "R0UTINGKEY").body)
    assert resolve == {
        "routing_key": "R0UTINGKEY",
        "event_action": "resolve",
        "dedup_key": "data-generation-1",
    }
    # anything else is not sent to PagerDuty at all
    running = FAILED | {"status": "Running", "terminal": False}
    for event in (running, STARTED, FAILED | {"event": "task.poll_failed"}):
        assert pagerduty_action(event) is None or not fmt.accepts(event)
        assert not fmt.accepts(event)
    with pytest.raises(FormatError):
        fmt.render(STARTED, orjson.dumps(STARTED), "x")


# -- templates ------------------------------------------------------------------------------


def test_a_template_renders_json_whatever_the_values_hold() -> None:
    text = (
        '{"text": "{{ task_key }} is {{ status }} ({{ labels.team }})",'
        ' "seq": {{ seq }}, "labels": {{ labels | json }}, "all": {{ payload | json }}}'
    )
    cfg = hook(format="template", template=text)
    tricky = FAILED | {"task_key": 'a"b\\c\n{{ 7*7 }}</script>'}
    body = json.loads(render(cfg, tricky).body)
    assert body["text"] == 'a"b\\c\n{{ 7*7 }}</script> is Failed (safety)'
    assert body["seq"] == 7 and body["labels"] == {"team": "safety"}
    assert body["all"] == tricky
    # absent fields are null, not errors
    assert json.loads(render(cfg, STARTED).body)["seq"] is None


def test_a_template_is_sandboxed() -> None:
    cfg = hook(format="template", template='{"x": "{{ payload.__class__.__mro__ }}"}')
    assert json.loads(render(cfg, FAILED).body) == {"x": "null"}
    # a call the sandbox refuses is a config error at load, not a surprise at delivery
    bad = '{"x": "{{ payload.__class__.__subclasses__() }}"}'
    with pytest.raises(ConfigError, match=r"sinks.webhooks\[0\].template: cannot render"):
        parse_config(
            {
                "sinks": {
                    "webhooks": [
                        {"url": "https://h.example", "format": "template", "template": bad}
                    ]
                }
            },
            environ={},
        )


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{{ nope }}", "unknown variable(s) nope"),
        ('{"a": "{% if %}"}', "line 1: Expected an expression"),
        ('{"a": {{ status }}}', "does not render valid JSON"),
        ("   ", "must not be empty"),
    ],
)
def test_a_bad_template_is_a_config_error_with_its_key_path(template: str, problem: str) -> None:
    raw = {
        "sinks": {
            "webhooks": [
                {"url": "https://h.example/ok"},
                {"url": "https://h.example", "format": "template", "template": template},
            ]
        }
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={})
    [message] = info.value.problems
    assert message.startswith("sinks.webhooks[1].template: "), message
    assert problem in message


def test_format_options_belong_to_their_format() -> None:
    raw = {
        "sinks": {
            "webhooks": [
                {"url": "https://h.example/a", "format": "template"},
                {"url": "https://h.example/b", "format": "pagerduty"},
                {"url": "https://h.example/c", "template": "{}"},
                {"url": "https://h.example/d", "routing_key": {"env": "K"}},
                {"url": "https://h.example/e", "format": "xml"},
                {"url": "https://h.example/f", "secrets": [{"env": "A", "file": "/b"}]},
                {"url": "https://h.example/g", "kinds": ["nope"], "statuses": [""]},
            ]
        }
    }
    with pytest.raises(ConfigError) as info:
        parse_config(raw, environ={})
    text = "\n".join(info.value.problems)
    assert "sinks.webhooks[0]: format: template needs a template" in text
    assert "sinks.webhooks[1]: format: pagerduty needs routing_key" in text
    assert "sinks.webhooks[2]: template: only format: template" in text
    assert "sinks.webhooks[3]: routing_key: only format: pagerduty" in text
    assert "sinks.webhooks[4].format:" in text
    assert "sinks.webhooks[5].secrets[0]: give exactly one of env, file" in text
    assert "sinks.webhooks[6].kinds[0]:" in text and "sinks.webhooks[6].statuses:" in text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_template_text_compiles_or_is_a_typed_problem(text: str) -> None:
    try:
        template = compile_template(text)
    except TemplateProblem:
        return
    json.loads(template.render(SAMPLE_EVENT))


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(sorted(FAILED)),
        st.none() | st.booleans() | st.integers() | st.text() | st.lists(st.text(), max_size=3),
    )
)
def test_any_event_values_render_valid_json(values: dict[str, Any]) -> None:
    template = compile_template(
        '{"t": "{{ task_key }}: {{ status }} {{ labels }}", "s": {{ seq | json }}}'
    )
    json.loads(template.render(FAILED | values))
