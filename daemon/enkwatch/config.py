"""The config file: pydantic models, YAML and environment loading, errors with key paths."""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, get_args
from urllib.parse import urlsplit

import orjson
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from enkwatch.errors import ConfigError
from enkwatch.models import WEBHOOK_EVENTS, is_postgres_url
from enkwatch.templates import TemplateProblem, compile_template

ENV_PREFIX = "ENKWATCH_"
API_KEY_ENV = "ENKRYPTAI_API_KEY"
CONFIG_PATH_ENV = "ENKWATCH_CONFIG"
DEFAULT_BASE_URL = "https://api.enkryptai.com"
# keys a user might write an API key under; refused without echoing the value
_INLINE_KEY_NAMES = frozenset({"api_key", "apikey", "key", "token", "secret"})
# C0, DEL and C1: every Unicode control character (category Cc)
_UNSAFE_HEADER_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_YAML_NULLS = frozenset({"null", "Null", "NULL", "~"})

# Every duration has a ceiling: far beyond what a user needs, far below what a datetime or a
# timer can hold (1e12 s overflowed `timedelta` in GET /tasks). NaN and infinity are refused.
DAY_S: Final = 86_400.0
MAX_INTERVAL_S: Final = DAY_S  # polls of a task, and the backoff after errors
MAX_DEADLINE_S: Final = 366 * DAY_S
MAX_REQUEST_TIMEOUT_S: Final = 600.0  # an API request, a webhook POST
MAX_DELIVERY_AGE_S: Final = 30 * DAY_S  # how long a webhook delivery is retried
MAX_LEASE_S: Final = 600.0


def _at_most(limit_s: float, words: str) -> AfterValidator:
    def check(value: float) -> float:
        if value > limit_s:
            raise ValueError(f"must be at most {limit_s:.0f} seconds ({words})")
        return value

    return AfterValidator(check)


_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
IntervalSeconds = Annotated[_Seconds, _at_most(MAX_INTERVAL_S, "1 day")]
DeadlineSeconds = Annotated[_Seconds, _at_most(MAX_DEADLINE_S, "366 days")]
TimeoutSeconds = Annotated[_Seconds, _at_most(MAX_REQUEST_TIMEOUT_S, "10 minutes")]
DeliveryAgeSeconds = Annotated[_Seconds, _at_most(MAX_DELIVERY_AGE_S, "30 days")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=False)


def header_problem(value: str) -> str | None:
    """Why `value` cannot travel in an HTTP header, or None when it can."""
    if not value:
        return "must not be empty"
    if _UNSAFE_HEADER_CHARS.search(value):
        return "contains control characters (such as CR/LF) and cannot be sent in an HTTP header"
    if value != value.strip():
        return "has leading or trailing white space, which HTTP would drop"
    return None


def _http_url(value: str) -> str:
    """`value` when it is an http(s) URL with a host; the URL itself is never echoed."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("must be an http:// or https:// URL with a valid host and port") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


def postgres_url_problem(value: str) -> str | None:
    """Why `value` is not a usable postgresql:// URL, or None; the URL is never echoed."""
    if not is_postgres_url(value):
        return "must be a postgresql:// URL"
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        return "the postgresql:// URL does not parse (its host or port)"
    if not parts.hostname and "host=" not in parts.query:
        return "a postgresql:// URL needs a host"
    return None


class ApiConfig(_Model):
    """`api`: where and how to ask."""

    base_url: str = DEFAULT_BASE_URL
    api_key_file: Path | None = None
    timeout_seconds: TimeoutSeconds = 10.0

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(_http_url(value))
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("must not carry credentials, a query or a fragment")
        return value.rstrip("/")


class PollingConfig(_Model):
    """`polling`: cadence and the limits shared by all tasks."""

    interval_seconds: IntervalSeconds = 30.0
    jitter: Annotated[float, Field(ge=0, le=1)] = 0.1
    max_concurrency: Annotated[int, Field(ge=1, le=10_000)] = 16
    max_requests_per_second: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 5.0
    max_backoff_seconds: IntervalSeconds = 300.0
    not_found_attempts: Annotated[int, Field(ge=1)] = 3
    # a task in one non-terminal status longer than this gets task.stalled (null: never)
    stall_after_seconds: DeadlineSeconds | None = None


class StateConfig(_Model):
    """`state`: where the durable state lives."""

    path: str = "enkwatch-state.db"
    # with a postgresql:// path: how long a replica's claim on its tasks lasts
    lease_seconds: Annotated[
        float, Field(ge=1.0, allow_inf_nan=False), _at_most(MAX_LEASE_S, "10 minutes")
    ] = 15.0

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        if not value:
            raise ValueError('must not be empty (use ":memory:" for no persistence)')
        if is_postgres_url(value) and (problem := postgres_url_problem(value)):
            raise ValueError(problem)
        return value

    @property
    def shared(self) -> bool:
        """A PostgreSQL state shared by replicas."""
        return is_postgres_url(self.path)


class AdminConfig(_Model):
    """`admin`: the HTTP admin endpoint."""

    listen: str | None = None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9090")
        return value

    @property
    def host_port(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class SecretSource(_Model):
    """Where a webhook secret or a routing key is read: a variable or a file."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env, file")
        return self


def _stringify_labels(value: object) -> object:
    # `{tier: 1}` is what a user writes; labels travel as strings
    if isinstance(value, Mapping):
        return {
            k: str(v).lower()
            if isinstance(v, bool)
            else str(v)
            if isinstance(v, int | float)
            else v
            for k, v in value.items()
        }
    return value


class WebhookConfig(_Model):
    """One entry of `sinks.webhooks`."""

    url: str
    name: str | None = None
    format: Literal["json", "cloudevents", "slack", "teams", "pagerduty", "template"] = "json"
    # deprecated: one raw secret, for X-Enkwatch-Signature (and webhook-signature)
    secret_env: str | None = None
    # Standard Webhooks secrets (`whsec_<base64>`), all active at once: rotation without a gap
    secrets: list[SecretSource] = Field(default_factory=list)
    # filters, all of which an event must pass
    events: list[str] = Field(default_factory=lambda: ["task.transition", "task.gave_up"])
    statuses: list[str] = Field(default_factory=list)
    kinds: list[Literal["dataset", "redteam", "redteam_run"]] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    # format options
    template: str | None = None
    source: str = "enkwatch"
    routing_key: SecretSource | None = None
    timeout_seconds: TimeoutSeconds = 10.0
    max_age_seconds: DeliveryAgeSeconds = 86400.0

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        # webhook URLs often embed a token: _http_url never echoes it
        return _http_url(value)

    @field_validator("events")
    @classmethod
    def _check_events(cls, value: list[str]) -> list[str]:
        unknown = [e for e in value if e != "*" and e not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(
                f"unknown event(s) {', '.join(unknown)}; choose from "
                f"{', '.join(sorted(WEBHOOK_EVENTS))} or '*'"
            )
        if not value:
            raise ValueError("select at least one event (or '*' for all)")
        return value

    @field_validator("statuses")
    @classmethod
    def _check_statuses(cls, value: list[str]) -> list[str]:
        if any(not s.strip() for s in value):
            raise ValueError("a status must not be empty")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_text(cls, value: object) -> object:
        return _stringify_labels(value)

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        if not value or header_problem(value):
            raise ValueError("must be a non-empty URI reference without control characters")
        return value

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                compile_template(value)
            except TemplateProblem as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _format_options(self) -> WebhookConfig:
        if (self.format == "template") != (self.template is not None):
            raise ValueError(
                "format: template needs a template, and only it takes one"
                if self.format == "template"
                else f"template: only format: template takes a template (this is {self.format})"
            )
        if (self.format == "pagerduty") != (self.routing_key is not None):
            raise ValueError(
                "format: pagerduty needs routing_key ({env: NAME} or {file: PATH})"
                if self.format == "pagerduty"
                else f"routing_key: only format: pagerduty takes one (this is {self.format})"
            )
        return self


class SinksConfig(_Model):
    """`sinks`: where events go besides stdout."""

    webhooks: list[WebhookConfig] = Field(default_factory=list)
    # who makes the deliveries of a SQLite state file: a process of their own (their CPU off
    # the polling process), or the daemon's (one process; `:memory:` and PostgreSQL always)
    delivery: Literal["process", "inline"] = "process"


TaskKindName = Literal["dataset", "redteam", "redteam_run"]
# a kind's identifying fields: (id field, name field); at least one of them is needed
KIND_FIELDS: Final[dict[str, tuple[str, str | None]]] = {
    "dataset": ("task_id", "dataset"),
    "redteam": ("task_id", "test_name"),
    "redteam_run": ("run_id", None),
}
_IDENTITY_FIELDS: Final = ("task_id", "dataset", "test_name", "run_id")
# the identifying fields that do not apply to each kind (checked for every task entry)
_FOREIGN_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    kind: tuple(f for f in _IDENTITY_FIELDS if f not in fields)
    for kind, fields in KIND_FIELDS.items()
}


def task_key(kind: str, ident: str | None, name: str | None) -> str:
    """The task key (CONTRACT §5, §11): a dataset's task_id, else `dataset:<name>`;
    `redteam:<task_id>` (else `redteam:test_name:<name>`); `redteam_run:<run_id>`."""
    if kind == "dataset":
        return ident if ident is not None else f"dataset:{name}"
    if ident is not None:
        return f"{kind}:{ident}"
    return f"{kind}:test_name:{name}"


class TaskConfig(_Model):
    """One entry of `tasks`: an Enkrypt job to watch (a dataset task by default)."""

    kind: TaskKindName = "dataset"
    task_id: str | None = None
    dataset: str | None = None
    test_name: str | None = None
    run_id: str | None = None
    interval_seconds: IntervalSeconds | None = None
    deadline_seconds: DeadlineSeconds | None = None
    # this task's own stall threshold (else polling.stall_after_seconds)
    stall_after_seconds: DeadlineSeconds | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("labels", mode="before")
    @classmethod
    def _scalar_labels(cls, value: object) -> object:
        return _stringify_labels(value)

    @field_validator("task_id", "dataset", "test_name", "run_id")
    @classmethod
    def _check_header_safe(cls, value: str | None) -> str | None:
        if value is not None and (problem := header_problem(value)):
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _needs_an_identity(self) -> TaskConfig:
        id_field, name_field = KIND_FIELDS[self.kind]
        foreign = [f for f in _FOREIGN_FIELDS[self.kind] if getattr(self, f) is not None]
        if foreign:
            raise ValueError(f"{', '.join(foreign)} does not apply to kind {self.kind}")
        if self.ident is None and self.name is None:
            if name_field is None:
                raise ValueError(f"a task of kind {self.kind} needs {id_field}")
            of_kind = "" if self.kind == "dataset" else f" of kind {self.kind}"
            raise ValueError(f"a task{of_kind} needs at least one of {id_field}, {name_field}")
        return self

    @property
    def ident(self) -> str | None:
        """The job's id: a task_id, or a run's run_id."""
        return self.run_id if self.kind == "redteam_run" else self.task_id

    @property
    def name(self) -> str | None:
        """The job's name: a dataset's name, or a red-team test's test_name."""
        return self.test_name if self.kind == "redteam" else self.dataset

    @property
    def key(self) -> str:
        """The task key: see `task_key`."""
        return task_key(self.kind, self.ident, self.name)


# the kinds with a list call, and the statuses a list call filters by
LISTED_KINDS: Final = ("dataset", "redteam")
LIST_STATUSES: Final = ("Queued", "Running", "Finished", "Failed")
MATCH_FIELDS: Final[dict[str, frozenset[str]]] = {
    "dataset": frozenset({"dataset"}),
    "redteam": frozenset({"task_id", "test_name", "model_name", "project_name"}),
}


class DiscoverConfig(_Model):
    """One entry of `discover`: sweep a kind's list pages and watch every matching job."""

    kind: TaskKindName = "dataset"
    statuses: list[str] = Field(default_factory=lambda: ["Queued", "Running"], min_length=1)
    every_seconds: IntervalSeconds = 60.0
    # field -> a glob (`nightly-*`); every one must match
    match: dict[str, str] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    # for the jobs found (default: polling.interval_seconds, no deadline)
    interval_seconds: IntervalSeconds | None = None
    deadline_seconds: DeadlineSeconds | None = None

    @field_validator("labels", mode="before")
    @classmethod
    def _scalar_labels(cls, value: object) -> object:
        return _stringify_labels(value)

    @field_validator("statuses")
    @classmethod
    def _known_statuses(cls, value: list[str]) -> list[str]:
        unknown = [s for s in value if s not in LIST_STATUSES]
        if unknown:
            raise ValueError(
                f"unknown status(es) {', '.join(unknown)}; choose from {', '.join(LIST_STATUSES)}"
            )
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _listed_kind(self) -> DiscoverConfig:
        if self.kind not in LISTED_KINDS:
            raise ValueError(f"kind {self.kind} has no list call to discover from")
        unknown = sorted(set(self.match) - MATCH_FIELDS[self.kind])
        if unknown:
            raise ValueError(
                f"match: {', '.join(unknown)} cannot be matched for kind {self.kind}; "
                f"use {', '.join(sorted(MATCH_FIELDS[self.kind]))}"
            )
        return self


class Config(_Model):
    """The whole config file."""

    api: ApiConfig = Field(default_factory=ApiConfig)
    polling: PollingConfig = Field(default_factory=PollingConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    sinks: SinksConfig = Field(default_factory=SinksConfig)
    tasks: list[TaskConfig] = Field(default_factory=list)
    discover: list[DiscoverConfig] = Field(default_factory=list)


def key_path(loc: Sequence[int | str]) -> str:
    """`("tasks", 3, "deadline_seconds")` -> `tasks[3].deadline_seconds`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


_ABSENT = object()


def _child(node: object, part: int | str) -> object:
    if isinstance(node, Mapping):
        return node.get(part, _ABSENT)
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return node[part]
    return _ABSENT


def _user_loc(loc: Sequence[int | str], raw: object) -> list[int | str]:
    """The part of a pydantic `loc` that names the user's keys and list items."""
    out: list[int | str] = []
    node: object = raw
    for part in loc:
        node = _child(node, part)
        # pydantic's internal tag for a union or validator ("function-after[...]") is no
        # key of the document; a user's key with "[" in it is found in the document
        if node is _ABSENT and isinstance(part, str) and "[" in part:
            continue
        out.append(part)
    return out


def _env_origin(path: str, env_names: Mapping[str, str]) -> str | None:
    """The variable that set `path`, or that created the section `path` (an unknown key)."""
    if path in env_names:
        return env_names[path]
    below = sorted(v for p, v in env_names.items() if p.startswith((f"{path}.", f"{path}[")))
    return ", ".join(below) or None


def _loc_problems(
    err: ValidationError, env_names: Mapping[str, str], raw: object, root: type[BaseModel]
) -> list[str]:
    problems = []
    for item in err.errors(include_input=False, include_url=False):
        user_loc = _user_loc(item["loc"], raw)
        path = key_path(user_loc)
        origin = _env_origin(path, env_names)
        msg = plain_message(item, _child_at(raw, user_loc), root, user_loc, origin)
        problems.append(f"{path}{f' (from {origin})' if origin else ''}: {msg}")
    return problems


def _child_at(raw: object, loc: Sequence[int | str]) -> object:
    node = raw
    for part in loc:
        node = _child(node, part)
    return node


def _model_at(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model whose keys are valid at `loc` (a list item keeps its list's model)."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _kind_of(value: object) -> str:
    """A YAML value's kind in a user's words (never the value: it could be a secret)."""
    if value is None:
        return "empty (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def unknown_key_message(
    key: str, model: type[BaseModel] | None, loc: Sequence[int | str], origin: str | None
) -> str:
    """`unknown key; did you mean interval_seconds?` (or the valid keys when none is close)."""
    if model is None:
        return "unknown key"
    valid = list(model.model_fields)
    # `interval` or `intervl` mean interval_seconds: match the names without their unit too
    aliases = {name.removesuffix("_seconds"): name for name in valid} | {n: n for n in valid}
    near = difflib.get_close_matches(key.lower(), list(aliases), n=1, cutoff=0.6)
    close = [aliases[near[0]]] if near else []
    if not close:
        return f"unknown key; the keys here are {', '.join(valid)}"
    if origin is not None and origin.startswith(ENV_PREFIX) and "," not in origin:
        # named as the variable the user would set instead
        names = [p for p in loc[:-1] if isinstance(p, str)] + [close[0]]
        return f"unknown key; did you mean {ENV_PREFIX}{'__'.join(names).upper()}?"
    return f"unknown key; did you mean {close[0]}?"


_PLAIN: Final = {
    "missing": "required, but missing",
    "finite_number": "must be a finite number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping (key: value lines)",
    "model_type": "must be a mapping (key: value lines)",
    "model_attributes_type": "must be a mapping (key: value lines)",
    "string_type": "must be text",
}
_BOUNDS: Final = {
    "greater_than": ("gt", "must be greater than"),
    "greater_than_equal": ("ge", "must be at least"),
    "less_than": ("lt", "must be less than"),
    "less_than_equal": ("le", "must be at most"),
}


def plain_message(
    item: Any,
    value: object,
    root: type[BaseModel],
    loc: Sequence[int | str],
    origin: str | None = None,
) -> str:
    """A pydantic error in a user's words: `unknown key; did you mean ...`, `must be ...`."""
    kind = item["type"]
    ctx = item.get("ctx") or {}
    if kind == "extra_forbidden" and loc and isinstance(loc[-1], str):
        return unknown_key_message(loc[-1], _model_at(root, loc[:-1]), loc, origin)
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        bound = ctx.get(name)
        if isinstance(bound, int | float):
            return f"{words} {bound:g}"
    if kind in _PLAIN:
        words = _PLAIN[kind]
        if kind in ("missing", "finite_number") or value is _ABSENT:
            return words
        hint = ""
        if kind == "string_type" and isinstance(value, int | float | bool):
            hint = " (put it in quotes)"
        return f"{words}, not {_kind_of(value)}{hint}"
    msg = str(item["msg"]).removeprefix("Value error, ")
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    return msg


def _raw_task_key(task: object) -> str | None:
    if not isinstance(task, Mapping):
        return None
    kind = task.get("kind", "dataset")
    if kind not in KIND_FIELDS:
        return None
    id_field, name_field = KIND_FIELDS[kind]
    ident = task.get(id_field)
    name = task.get(name_field) if name_field else None
    if isinstance(ident, str):
        return task_key(kind, ident, None)
    if ident is None and isinstance(name, str):
        return task_key(kind, None, name)
    return None


def duplicate_problems(tasks: Iterable[object], where: str = "tasks") -> list[str]:
    """One problem per task whose key was already listed."""
    seen: dict[str, int] = {}
    problems = []
    for i, task in enumerate(tasks):
        key = _raw_task_key(task)
        if key is None:
            continue
        if key in seen:
            problems.append(
                f"{where}[{i}]: the task {key} is listed twice (also {where}[{seen[key]}])"
            )
        else:
            seen[key] = i
    return problems


def _inline_secret_problems(raw: Mapping[str, Any]) -> list[str]:
    api = raw.get("api")
    if not isinstance(api, Mapping):
        return []
    return [
        f"api.{name}: the API key is never written in the config file; "
        f"set ${API_KEY_ENV} or api.api_key_file (the value was not shown)"
        for name in api
        if isinstance(name, str) and name.lower() in _INLINE_KEY_NAMES
    ]


def _parse_env_value(text: str) -> Any:
    # a scalar stays text and pydantic types it ("60" -> 60.0), so a string setting keeps
    # its exact value (YAML would turn ":memory:" into a mapping and "off" into False);
    # a YAML flow collection ("[a, b]", "{k: v}") sets a list or a mapping
    if text.strip() in _YAML_NULLS:
        return None
    if text.lstrip().startswith(("[", "{")):
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        if isinstance(value, list | dict):
            return value
    return text


def apply_env_overrides(
    raw: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """Apply `ENKWATCH_SECTION__KEY=value`; return the new dict, path->variable, problems."""
    out: dict[str, Any] = dict(raw)
    names: dict[str, str] = {}
    problems: list[str] = []
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        parts = [p.lower() for p in var[len(ENV_PREFIX) :].split("__")]
        if any(not p for p in parts):
            problems.append(f"{var}: empty key between '__' separators")
            continue
        node = out
        ok = True
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                problems.append(f"{var}: {key_path(parts[: i + 1])} is not a section")
                ok = False
                break
            else:
                child = dict(child)
            node[part] = child
            node = child
        if ok:
            node[parts[-1]] = _parse_env_value(environ[var])
            names[key_path(parts)] = var
    return out, names, problems


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, dict):
            out[key] = _deep_merge(below, value)
        else:
            out[key] = value
    return out


def parse_config(
    raw: object,
    environ: Mapping[str, str] | None = None,
    source: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Validate a decoded YAML document into a Config or raise ConfigError.

    Precedence: the document, then `ENKWATCH_*` variables, then `overrides` (command line).
    """
    environ = os.environ if environ is None else environ
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"(top level): must be a mapping, not {type(raw).__name__}"], source)
    merged, env_names, problems = apply_env_overrides(raw, environ)
    if overrides:
        merged = _deep_merge(merged, overrides)
    problems += _inline_secret_problems(merged)
    if problems:
        # an inline secret must not reach pydantic, whose messages could quote it
        api = merged.get("api")
        if isinstance(api, dict):
            merged["api"] = {
                k: v
                for k, v in api.items()
                if not (isinstance(k, str) and k.lower() in _INLINE_KEY_NAMES)
            }
    raw_tasks = merged.get("tasks")
    if isinstance(raw_tasks, list):
        problems += duplicate_problems(raw_tasks)
    try:
        config = Config.model_validate(merged)
    except ValidationError as err:
        problems += _loc_problems(err, env_names, merged, Config)
    if problems:
        raise ConfigError(problems, source)
    return config


def validate_task_entry(entry: object, where: str = "") -> TaskConfig:
    """One config-style task entry (e.g. a POST /tasks body) or ConfigError with key paths."""
    if not isinstance(entry, dict):
        raise ConfigError([f"{where or '(body)'}: must be an object, not {type(entry).__name__}"])
    try:
        return TaskConfig.model_validate(entry)
    except ValidationError as err:
        problems = _loc_problems(err, {}, entry, TaskConfig)
        if where:
            problems = [f"{where}.{p}" if not p.startswith("(") else p for p in problems]
        raise ConfigError(problems) from None


# A watch list of 100,000 tasks with labels is about 15 MB of JSON; a file larger than this
# is a mistake (a log, a dump), or a device, read until memory runs out.
MAX_CONFIG_BYTES: Final = 32 * 1024 * 1024
MAX_KEY_FILE_BYTES: Final = 64 * 1024
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class _FileRefused(Exception):
    """A file that is not read: not a regular file, or larger than allowed."""


def _check_regular(st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "something else")
        raise _FileRefused(f"it is {kind}, not a regular file")
    if st.st_size > limit:
        raise _FileRefused(f"it is larger than {limit} bytes ({st.st_size} bytes)")


def read_regular_file(path: str | Path, limit: int) -> bytes:
    """The bytes of a regular file (symlinks followed) of at most `limit` bytes.

    Checked before it is opened (opening a FIFO blocks, a device may act), again on the
    open file (the path may have been replaced), and read with a bound (it may grow).
    """
    _check_regular(os.stat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        _check_regular(os.fstat(fd), limit)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _FileRefused(f"it is larger than {limit} bytes")
    return data


# libyaml's loader when PyYAML has it (its wheels do): ~3x faster on a large watch list
_YamlLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a config file: YAML, or JSON when the name ends in `.json`.

    JSON is also YAML; a generated watch list of 100,000 tasks parses in milliseconds as
    JSON and in seconds as YAML.
    """
    source = str(path)
    try:
        text = read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8")
    except _FileRefused as err:
        raise ConfigError([f"cannot read the config file: {err}"], source) from None
    except OSError as err:
        raise ConfigError([f"cannot read the config file: {err.strerror or err}"], source) from None
    except UnicodeDecodeError:
        raise ConfigError(["the config file is not UTF-8 text"], source) from None
    if source.endswith(".json"):
        try:
            raw = orjson.loads(text)
        except orjson.JSONDecodeError as err:
            raise ConfigError([f"not valid JSON: {err}"], source) from None
        return parse_config(raw, environ, source)
    try:
        raw = yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"not valid YAML: {where}{problem}"], source) from None
    return parse_config(raw, environ, source)


def read_key_file(path: Path, where: str) -> str:
    """The stripped text of a small key file (an API key, a secret); ConfigError naming `where`
    and the file, never its content."""
    try:
        key = read_regular_file(path, MAX_KEY_FILE_BYTES).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError, _FileRefused) as err:
        detail = (
            str(err)
            if isinstance(err, _FileRefused)
            else getattr(err, "strerror", None) or "not readable UTF-8 text"
        )
        raise ConfigError([f"{where}: cannot read {path}: {detail}"]) from None
    if not key:
        raise ConfigError([f"{where}: {path} is empty"])
    return key


def load_api_key(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """The API key from `api.api_key_file`, else `$ENKRYPTAI_API_KEY`; never echoed."""
    environ = os.environ if environ is None else environ
    if config.api.api_key_file is not None:
        key = read_key_file(config.api.api_key_file, "api.api_key_file")
        origin = "api.api_key_file"
    else:
        key = environ.get(API_KEY_ENV, "").strip()
        if not key:
            raise ConfigError(
                [
                    f"no API key: set ${API_KEY_ENV} or api.api_key_file "
                    "(the key is never in the config)"
                ]
            )
        origin = f"${API_KEY_ENV}"
    if header_problem(key):
        raise ConfigError(
            [f"{origin}: the API key contains characters that cannot be sent in an HTTP header"]
        )
    return key


def normalized_watch_list(config: Config) -> list[dict[str, Any]]:
    """The watch list with defaults applied, as `check-config` prints it."""
    return [_normalized_task(t, config.polling) for t in config.tasks]


def _normalized_task(t: TaskConfig, polling: PollingConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"task_key": t.key, "kind": t.kind}
    id_field, name_field = KIND_FIELDS[t.kind]
    for field in ("task_id", "dataset") if t.kind == "dataset" else (id_field, name_field):
        if field is not None:
            out[field] = getattr(t, field)
    out["interval_seconds"] = t.interval_seconds or polling.interval_seconds
    out["deadline_seconds"] = t.deadline_seconds
    out["labels"] = dict(t.labels)
    return out
