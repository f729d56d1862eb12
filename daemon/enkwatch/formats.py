"""Payload formats of a webhook: pure functions from an event to the bytes a receiver takes.

One small class per `format:` of a sink, chosen once when the sink is built:

- `json`: the event object as it is journaled (the body of every earlier release);
- `cloudevents`: CloudEvents 1.0, structured mode;
- `slack`: an incoming-webhook message (a text fallback and blocks);
- `teams`: a Workflows message holding an Adaptive Card;
- `pagerduty`: Events API v2, `trigger` on a failure, `resolve` when the task Finishes;
- `template`: the user's own body (see `templates`).

A format may decline an event (`accepts`): PagerDuty takes only what opens or closes an
incident. Rendering never sees a secret other than PagerDuty's routing key, which goes in
that body and nowhere else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson

from enkwatch import events as ev
from enkwatch.config import WebhookConfig
from enkwatch.kinds import KINDS
from enkwatch.templates import BodyTemplate, TemplateProblem, compile_template

JSON_TYPE: Final = "application/json"
CLOUDEVENTS_TYPE: Final = "application/cloudevents+json"
# CloudEvents `type` prefix: the event's name follows (`enkwatch.task.transition`)
CLOUDEVENTS_TYPE_PREFIX: Final = "enkwatch."
# digits of the `sequence` extension: a string that sorts as the number does
SEQUENCE_DIGITS: Final = 20
# PagerDuty's documented limits
PAGERDUTY_SUMMARY_MAX: Final = 1024
PAGERDUTY_DEDUP_MAX: Final = 255
PAGERDUTY_TRIGGER: Final = "trigger"
# the terminal statuses that end well (`Finished`), of every kind: PagerDuty resolves on them
SUCCEEDED: Final = frozenset().union(*(k.terminal - k.failed for k in KINDS.values()))
PAGERDUTY_RESOLVE: Final = "resolve"
# a Slack section's text is at most 3000 characters
SLACK_TEXT_MAX: Final = 3000


class FormatError(Exception):
    """This event cannot be rendered by this sink's format (retrying would not help)."""


@dataclass(frozen=True, slots=True)
class Payload:
    """What is POSTed: the body and its Content-Type."""

    body: bytes
    content_type: str = JSON_TYPE


class Format(Protocol):
    """How one sink writes an event.

    `cache_key`: equal for formats that render every event alike (sinks sharing it render an
    event once); None when rendering costs nothing worth remembering.
    """

    @property
    def cache_key(self) -> Hashable | None: ...

    def accepts(self, event: Mapping[str, Any]) -> bool:
        """False when this format sends nothing for the event."""
        ...

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        """The payload of `event` (`raw`: its journaled JSON; `message_id`: its stable id)."""
        ...


def message_id(event: Mapping[str, Any], raw: bytes) -> str:
    """The delivery's stable id: the `event_id`, else a digest of the journaled event.

    Events that are not about a task (`daemon.started`, ...) have no `event_id`; their
    journaled bytes include a microsecond timestamp, so the digest is unique, and it is the
    same on every retry and after a restart.
    """
    value = event.get("event_id")
    if isinstance(value, str) and value:
        return value
    return f"{event.get('event', 'event')}:{hashlib.sha256(raw).hexdigest()[:32]}"


def headline(event: Mapping[str, Any]) -> str:
    """A one-line human summary of an event (chat messages, PagerDuty's summary)."""
    name = str(event.get("event"))
    who = event.get("task_key")
    if who and event.get("dataset") and event.get("dataset") != event.get("task_id"):
        who = f"{who} ({event['dataset']})"
    if name == ev.TASK_TRANSITION:
        before = event.get("previous_status")
        change = f"{before} → {event.get('status')}" if before else str(event.get("status"))
        return f"{who}: {change}"
    if name == ev.TASK_GAVE_UP:
        return f"{who}: gave up ({event.get('reason')}, last status {event.get('last_status')})"
    if name == ev.TASK_POLL_FAILED:
        return f"{who}: poll failed ({event.get('error')}, attempt {event.get('attempt')})"
    if name == ev.TASK_UNKNOWN_STATUS:
        return f"{who}: unknown status {event.get('status')}"
    if name == ev.TASK_STALLED:
        return f"{who}: stalled in {event.get('status')} for {event.get('stalled_seconds')} s"
    if name == ev.SINK_DELIVERY_FAILED:
        return f"webhook {event.get('sink')}: gave up delivering {event.get('failed_event_id')}"
    if name == ev.SINK_DISABLED:
        return f"webhook {event.get('sink')}: disabled (HTTP {event.get('http_status')})"
    return f"{who}: {name}" if who else f"enkwatch: {name}"


def _details(event: Mapping[str, Any]) -> list[tuple[str, str]]:
    keys = ("event", "status", "dataset", "task_id", "kind", "reason", "error", "timestamp")
    facts = [(k, str(event[k])) for k in keys if event.get(k) is not None]
    facts += [(f"label {k}", str(v)) for k, v in (event.get("labels") or {}).items()]
    return facts


class JsonFormat:
    """The journaled event, byte for byte."""

    cache_key = None

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return True

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        return Payload(raw)


class CloudEventsFormat:
    """CloudEvents 1.0 in structured mode; the event is `data`."""

    def __init__(self, source: str) -> None:
        self._source = source
        self.cache_key = ("cloudevents", source)

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return True

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        envelope: dict[str, Any] = {
            "specversion": "1.0",
            "id": message_id,
            "source": self._source,
            "type": CLOUDEVENTS_TYPE_PREFIX + str(event.get("event")),
            "datacontenttype": JSON_TYPE,
        }
        if event.get("task_key"):
            envelope["subject"] = event["task_key"]
        if event.get("timestamp"):
            envelope["time"] = event["timestamp"]
        seq = event.get("seq")
        if isinstance(seq, int) and seq >= 0:
            envelope["sequence"] = str(seq).zfill(SEQUENCE_DIGITS)
        envelope["data"] = orjson.Fragment(raw)
        return Payload(orjson.dumps(envelope), CLOUDEVENTS_TYPE)


def _slack_escape(text: str) -> str:
    # Slack's mrkdwn gives &, < and > a meaning: escaped, a task name cannot ping @channel
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class SlackFormat:
    """An incoming-webhook message: `text` (notifications, fallback) and blocks."""

    cache_key = ("slack",)

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return True

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        title = _slack_escape(headline(event))[:SLACK_TEXT_MAX]
        facts = " · ".join(f"{k}: {_slack_escape(v)}" for k, v in _details(event))
        body = {
            "text": title,
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": f"*{title}*"}},
                {
                    "type": "context",
                    "elements": [{"type": "mrkdwn", "text": facts[:SLACK_TEXT_MAX] or "-"}],
                },
            ],
        }
        return Payload(orjson.dumps(body))


class TeamsFormat:
    """A message for a Teams Workflows webhook, holding one Adaptive Card."""

    cache_key = ("teams",)

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return True

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        attention = event.get("level") in (ev.WARNING, ev.ERROR, ev.CRITICAL)
        card = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            "body": [
                {
                    "type": "TextBlock",
                    "text": headline(event),
                    "weight": "Bolder",
                    "size": "Medium",
                    "wrap": True,
                    "color": "Attention" if attention else "Default",
                },
                {
                    "type": "FactSet",
                    "facts": [{"title": k, "value": v} for k, v in _details(event)],
                },
            ],
        }
        body = {
            "type": "message",
            "attachments": [
                {
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": None,
                    "content": card,
                }
            ],
        }
        return Payload(orjson.dumps(body))


def pagerduty_action(event: Mapping[str, Any]) -> str | None:
    """`trigger` for a failure or a stall, `resolve` for a task that ended well or moved on
    from a stall, None for anything else."""
    name = event.get("event")
    if name in (ev.TASK_GAVE_UP, ev.TASK_STALLED):
        return PAGERDUTY_TRIGGER
    if name == ev.TASK_TRANSITION and event.get("terminal"):
        return PAGERDUTY_RESOLVE if event.get("status") in SUCCEEDED else PAGERDUTY_TRIGGER
    if name == ev.TASK_TRANSITION and event.get("stall_ended"):
        return PAGERDUTY_RESOLVE
    return None


class PagerDutyFormat:
    """Events API v2: one incident per task (`dedup_key` = task key)."""

    def __init__(self, routing_key: str, source: str) -> None:
        self._routing_key = routing_key
        self._source = source
        self.cache_key = ("pagerduty", routing_key, source)

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return pagerduty_action(event) is not None and bool(event.get("task_key"))

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        action = pagerduty_action(event)
        if action is None:
            raise FormatError(f"pagerduty takes no {event.get('event')} event")
        body: dict[str, Any] = {
            "routing_key": self._routing_key,
            "event_action": action,
            "dedup_key": str(event.get("task_key"))[:PAGERDUTY_DEDUP_MAX],
        }
        if action == PAGERDUTY_TRIGGER:
            body["payload"] = {
                "summary": headline(event)[:PAGERDUTY_SUMMARY_MAX],
                "source": self._source,
                "severity": "warning" if event.get("event") == ev.TASK_STALLED else "error",
                "timestamp": event.get("timestamp"),
                "component": event.get("dataset") or event.get("task_id"),
                "group": event.get("kind") or "dataset",
                "class": event.get("event"),
                "custom_details": orjson.Fragment(raw),
            }
        return Payload(orjson.dumps(body))


class TemplateFormat:
    """The user's template."""

    def __init__(self, template: BodyTemplate) -> None:
        self._template = template
        self.cache_key: Hashable = self  # its own template: shared by no other sink

    def accepts(self, event: Mapping[str, Any]) -> bool:
        return True

    def render(self, event: Mapping[str, Any], raw: bytes, message_id: str) -> Payload:
        try:
            return Payload(self._template.render(event))
        except TemplateProblem as err:
            raise FormatError(f"template: {err}") from None


def build_format(cfg: WebhookConfig, routing_key: str | None = None) -> Format:
    """The format of a configured sink (its template compiled, its routing key given)."""
    if cfg.format == "cloudevents":
        return CloudEventsFormat(cfg.source)
    if cfg.format == "slack":
        return SlackFormat()
    if cfg.format == "teams":
        return TeamsFormat()
    if cfg.format == "pagerduty":
        if not routing_key:
            raise ValueError("the pagerduty format needs a routing key")
        return PagerDutyFormat(routing_key, cfg.source)
    if cfg.format == "template":
        assert cfg.template is not None  # the config validated it
        return TemplateFormat(compile_template(cfg.template))
    return JsonFormat()
