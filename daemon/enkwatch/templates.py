"""The `template` payload format: a sandboxed Jinja2 body whose values are JSON-escaped.

A leaf (imports nothing of ours): the config validates a template with it at load time and
the `template` format renders with it at delivery time, so both agree on what is valid.

Every `{{ expression }}` writes its value as JSON text that can stand inside a JSON string:
`"text": "{{ task_key }} is {{ status }}"` stays valid JSON whatever the task key holds
(quotes, backslashes, newlines). Numbers, true/false and null are written as they are, so
`"seq": {{ seq }}` works too. `{{ x | json }}` writes the JSON value itself, quotes included
(`"labels": {{ labels | json }}`). An absent or null value writes `null`. The variables
are the event's fields (absent ones are null) and `payload`, the whole event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

import orjson
from jinja2 import ChainableUndefined, TemplateSyntaxError, Undefined, meta
from jinja2.exceptions import TemplateError
from jinja2.sandbox import SandboxedEnvironment
from markupsafe import Markup

# the fields an event may carry (CONTRACT §5 and §11), each a template variable
EVENT_FIELDS: Final = frozenset(
    {
        "timestamp",
        "level",
        "event",
        "task_id",
        "dataset",
        "task_key",
        "kind",
        "seq",
        "event_id",
        "labels",
        "previous_status",
        "status",
        "terminal",
        "polls",
        "created_at",
        "started_at",
        "watched_seconds",
        "error",
        "http_status",
        "attempt",
        "retry_in_seconds",
        "reason",
        "last_status",
        "hint",
        "version",
        "tasks",
        "added",
        "removed",
        "changed",
        "restart_required",
        "errors",
        "finished",
        "failed",
        "gave_up",
        "cancelled_polls",
        "sink",
        "failed_event",
        "failed_event_id",
        "attempts",
        "stalled_seconds",
        "stall_ended",
        "dropped_deliveries",
        "source",
    }
)
WHOLE_EVENT: Final = "payload"
VARIABLES: Final = EVENT_FIELDS | {WHOLE_EVENT}
# a body is rendered for every delivery: a template that writes megabytes is a mistake
MAX_TEMPLATE_CHARS: Final = 16 * 1024


class TemplateProblem(ValueError):
    """A template that cannot be used; the message says why (without the event's values)."""


class _Json(str):
    """A value already in JSON form: written as it is."""


def _dumps(value: Any) -> str:
    try:
        return orjson.dumps(value, default=str).decode()
    except TypeError:  # what orjson refuses (an integer beyond 64 bits): the slow way
        return json.dumps(value, default=str, ensure_ascii=False)


def _to_json(value: Any) -> _Json:
    if isinstance(value, Undefined):
        value = None
    return _Json(_dumps(value))


def _finalize(value: Any) -> str:
    # every expression's value as JSON text that can stand inside a JSON string: a string
    # without its quotes, a number, true/false/null as they are, a list or a mapping as its
    # JSON text escaped (`| json` writes them as values instead)
    if isinstance(value, _Json | Markup):
        return str(value)
    if isinstance(value, Undefined) or value is None:
        return "null"
    if isinstance(value, str):
        return _dumps(value)[1:-1]
    text = _dumps(value)
    if isinstance(value, bool | int | float):
        return text
    return _dumps(text)[1:-1]


def _environment() -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=ChainableUndefined,  # `labels.team` of an event without labels is null
        finalize=_finalize,
        autoescape=False,
        keep_trailing_newline=True,
    )
    env.filters["json"] = _to_json
    return env


_ENV: Final = _environment()

# an event that has most fields, to check that a template renders JSON at config load
SAMPLE_EVENT: Final[Mapping[str, Any]] = {
    "timestamp": "2026-01-01T00:00:00.000000Z",
    "level": "warning",
    "event": "task.transition",
    "task_id": "data-generation-0000",
    "dataset": "Election2",
    "task_key": "data-generation-0000",
    "kind": "dataset",
    "seq": 2,
    "event_id": "data-generation-0000:2",
    "labels": {"team": "safety"},
    "previous_status": "Running",
    "status": "Failed",
    "terminal": True,
    "polls": 12,
    "created_at": "2026-01-01T00:00:00Z",
    "started_at": None,
    "watched_seconds": 360.0,
}


class BodyTemplate:
    """A compiled, validated template."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._template = _ENV.from_string(source)

    def render(self, event: Mapping[str, Any]) -> bytes:
        """The body for `event`: valid JSON, or TemplateProblem."""
        context: dict[str, Any] = dict.fromkeys(EVENT_FIELDS)
        context.update((k, v) for k, v in event.items() if k in EVENT_FIELDS)
        context[WHOLE_EVENT] = dict(event)
        try:
            text = self._template.render(context)
        except TemplateError as err:
            raise TemplateProblem(f"cannot render: {type(err).__name__}: {err.message}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as err:
            raise TemplateProblem(f"cannot render: {type(err).__name__}") from None
        body = text.encode()
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as err:
            raise TemplateProblem(f"does not render valid JSON ({err.msg})") from None
        return body


def compile_template(source: str) -> BodyTemplate:
    """Parse and check a template: syntax, known variables, and JSON output on a sample."""
    if not source.strip():
        raise TemplateProblem("must not be empty")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateProblem(f"is longer than {MAX_TEMPLATE_CHARS} characters")
    try:
        tree = _ENV.parse(source)
    except TemplateSyntaxError as err:
        raise TemplateProblem(f"line {err.lineno}: {err.message}") from None
    unknown = sorted(meta.find_undeclared_variables(tree) - VARIABLES)
    if unknown:
        raise TemplateProblem(
            f"unknown variable(s) {', '.join(unknown)}; the variables are the event's fields "
            f"({', '.join(sorted(EVENT_FIELDS))}) and {WHOLE_EVENT} (the whole event)"
        )
    template = BodyTemplate(source)
    template.render(SAMPLE_EVENT)
    return template
