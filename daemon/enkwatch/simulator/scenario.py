"""A simulator scenario: its tasks of every kind, their timelines and faults, and loading it."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from enkwatch.errors import ConfigError

FaultKind = Literal[
    "ok",
    "http_500",
    "http_503",
    "http_429",
    "slow",
    "garbage",
    "truncated",
    "missing_field",
    "error_200",
    "not_found",
    "http_401",
]
TaskKind = Literal["dataset", "redteam", "redteam_run"]
Starts = Literal["first_request", "at_start"]

# the fields each kind may set, beyond those every kind has (kind, timeline, faults, starts,
# created_at): a field of another kind is a mistake in the scenario, named as such
_COMMON: Final = frozenset({"kind", "timeline", "faults", "starts", "created_at"})
_KIND_FIELDS: Final[dict[str, frozenset[str]]] = {
    "dataset": frozenset(
        {
            "task_id",
            "dataset",
            "project_name",
            "system_description",
            "policy_description",
            "info_pdf_url",
            "scenarios",
            "categories",
            "depth",
            "max_prompts",
            "tools",
        }
    ),
    "redteam": frozenset(
        {
            "task_id",
            "test_name",
            "project_name",
            "model_name",
            "model_saved_name",
            "created_by",
            "model_config_",
            "user_metadata",
        }
    ),
    "redteam_run": frozenset({"run_id", "id_field", "fields"}),
}
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "dataset": ("task_id", "dataset"),
    "redteam": ("task_id", "test_name"),
    "redteam_run": ("run_id",),
}


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Phase(_Model):
    """One status of a task's timeline, lasting `seconds` (the last one stays)."""

    status: str = Field(min_length=1)
    seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class Fault(_Model):
    """Answer the next `requests` requests in a faulty way (`ok`: normally)."""

    kind: FaultKind
    requests: int = Field(default=1, ge=1)
    retry_after: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _options_fit_kind(self) -> Self:
        if self.retry_after is not None and self.kind not in ("http_503", "http_429"):
            raise ValueError("retry_after applies only to http_503 and http_429")
        if self.kind == "slow" and self.seconds is None:
            raise ValueError("a slow fault needs seconds")
        if self.kind != "slow" and self.seconds is not None:
            raise ValueError("seconds applies only to slow")
        return self


class Tool(_Model):
    """A tool of the spec's `tools` array."""

    name: str
    description: str


class ScenarioTask(_Model):
    """One simulated job of any kind: its identity, lifecycle, faults and answer fields."""

    # `model_config` is pydantic's own attribute: the red-team field goes by an alias
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, protected_namespaces=()
    )

    kind: TaskKind = "dataset"
    task_id: str | None = Field(default=None, min_length=1)
    dataset: str | None = Field(default=None, min_length=1)
    test_name: str | None = Field(default=None, min_length=1)
    run_id: str | None = Field(default=None, min_length=1)
    timeline: list[Phase] = Field(min_length=1)
    faults: list[Fault] = []
    starts: Starts | None = None  # default: the scenario's `starts`
    created_at: datetime | None = None  # default: when the timeline starts
    project_name: str = "default"
    # dataset
    system_description: str = ""
    policy_description: str = ""
    info_pdf_url: str = ""
    scenarios: int = 1
    categories: int = 1
    depth: int = 1
    max_prompts: int = 100
    tools: list[Tool] = []
    # redteam
    model_name: str = "gpt-4o-mini"
    model_saved_name: str = ""
    created_by: str = "simulator@example.com"
    model_config_: dict[str, Any] = Field(default_factory=dict, alias="model_config")
    user_metadata: dict[str, Any] = {}
    # redteam_run
    id_field: Literal["id", "run_id"] = "id"
    fields: dict[str, Any] = {}

    @field_validator("timeline")
    @classmethod
    def _only_last_phase_is_open(cls, timeline: list[Phase]) -> list[Phase]:
        for i, phase in enumerate(timeline[:-1]):
            if phase.seconds is None:
                raise ValueError(f"timeline[{i}] needs seconds: only the last phase stays")
        return timeline

    @field_validator("created_at")
    @classmethod
    def _aware(cls, moment: datetime | None) -> datetime | None:
        # a time without an offset is UTC, so every job's created_at orders with the others
        if moment is not None and moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> Self:
        allowed = _KIND_FIELDS[self.kind] | _COMMON
        problems = [
            f"{name.rstrip('_')} does not apply to kind {self.kind}"
            for name in sorted(self.model_fields_set - allowed)
        ]
        problems += [
            f"kind {self.kind} needs {name}"
            for name in _REQUIRED[self.kind]
            if getattr(self, name) is None
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def ident(self) -> str:
        """The id a task is counted under: its task_id, or a run's run_id."""
        ident = self.run_id if self.kind == "redteam_run" else self.task_id
        assert ident is not None  # the validator requires it
        return ident


class ListFaults(_Model):
    """Faults of the list calls, each list endpoint counting its own requests."""

    dataset: list[Fault] = []
    redteam: list[Fault] = []


class Scenario(_Model):
    """The jobs a simulator serves, how it pages lists, and the API key it expects."""

    api_key: str | None = Field(default=None, min_length=1)
    starts: Starts = "first_request"
    default_per_page: int = Field(default=10, ge=1)
    max_per_page: int = Field(default=100, ge=1)
    per_page_out_of_range: Literal["reject", "clamp"] = "reject"
    list_faults: ListFaults = ListFaults()
    tasks: list[ScenarioTask]

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[ScenarioTask]) -> list[ScenarioTask]:
        problems: list[str] = []
        # task ids and run ids share one namespace: the statistics count requests under them
        namespaces = (("task_id", "run_id"), ("dataset",), ("test_name",))
        for keys in namespaces:
            seen: dict[str, int] = {}
            for i, task in enumerate(tasks):
                for key in keys:
                    value = getattr(task, key)
                    if value is None:
                        continue
                    if value in seen:
                        problems.append(f"tasks[{i}].{key} {value!r} repeats tasks[{seen[value]}]")
                    seen.setdefault(value, i)
        if problems:
            raise ValueError("; ".join(problems))
        return tasks

    @model_validator(mode="after")
    def _page_sizes(self) -> Self:
        if self.default_per_page > self.max_per_page:
            raise ValueError("default_per_page must not exceed max_per_page")
        return self


def _key_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or "(scenario)"


def _parse_scenario(text: str, source: str) -> Scenario:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}".replace("\n", " ")], source=source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(["(scenario): must be a mapping"], source=source)
    try:
        return Scenario.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_key_path(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(problems, source=source) from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file; any problem is a ConfigError with key paths."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"cannot read the scenario: {reason}"], source=str(path)) from None
    return _parse_scenario(text, str(path))


def default_scenario() -> Scenario:
    """The built-in demo scenario bundled with the package."""
    data = resources.files("enkwatch").joinpath("data", "demo-scenario.yaml")
    return _parse_scenario(data.read_text(encoding="utf-8"), "enkwatch:data/demo-scenario.yaml")
