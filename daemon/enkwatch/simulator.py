"""A simulated Enkrypt API: `GET /datasets/get-task` with scripted lifecycles and faults."""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal, Self

import yaml
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from enkwatch.clock import Clock, SystemClock
from enkwatch.errors import ConfigError
from enkwatch.kinds.dataset import QUEUED

FaultKind = Literal[
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

ARRIVALS_KEPT: Final = 100_000
_SHUTDOWN_TIMEOUT_S: Final = 2.0  # a slow fault must not hold up the simulator's exit
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NOT_FOUND: Final = {"detail": "Task not found"}
_GARBAGE: Final = "<html><body><h1>502 Bad Gateway</h1><p>upstream hiccup</p></body></html>"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Phase(_Model):
    """One status of a task's timeline, lasting `seconds` (the last one stays)."""

    status: str = Field(min_length=1)
    seconds: float | None = Field(default=None, ge=0, allow_inf_nan=False)


class Fault(_Model):
    """Answer the next `requests` requests of a task in a faulty way."""

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
    """One simulated task: its identity, lifecycle, faults and spec fields."""

    task_id: str = Field(min_length=1)
    dataset: str = Field(min_length=1)
    timeline: list[Phase] = Field(min_length=1)
    faults: list[Fault] = []
    created_at: datetime | None = None  # default: the time of the task's first request
    project_name: str = "default"
    system_description: str = ""
    policy_description: str = ""
    info_pdf_url: str = ""
    scenarios: int = 1
    categories: int = 1
    depth: int = 1
    max_prompts: int = 100
    tools: list[Tool] = []

    @field_validator("timeline")
    @classmethod
    def _only_last_phase_is_open(cls, timeline: list[Phase]) -> list[Phase]:
        for i, phase in enumerate(timeline[:-1]):
            if phase.seconds is None:
                raise ValueError(f"timeline[{i}] needs seconds: only the last phase stays")
        return timeline


class Scenario(_Model):
    """The tasks a simulator serves, and the API key it expects (any non-empty one if unset)."""

    api_key: str | None = Field(default=None, min_length=1)
    tasks: list[ScenarioTask]

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[ScenarioTask]) -> list[ScenarioTask]:
        problems: list[str] = []
        for key in ("task_id", "dataset"):
            seen: dict[str, int] = {}
            for i, task in enumerate(tasks):
                value = getattr(task, key)
                if value in seen:
                    problems.append(f"tasks[{i}].{key} {value!r} repeats tasks[{seen[value]}]")
                seen.setdefault(value, i)
        if problems:
            raise ValueError("; ".join(problems))
        return tasks


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


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most of `times` within any half-open window of `window_s` seconds."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


@dataclass
class SimulatorStats:
    """What the simulator has seen: counts, concurrency, arrival times (monotonic)."""

    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)
    by_task: dict[str, int] = field(default_factory=dict)

    def record_arrival(self, at: float) -> None:
        """Count one request arriving at monotonic time `at`; keep arrivals bounded."""
        self.requests += 1
        self.arrivals.append(at)
        if len(self.arrivals) > ARRIVALS_KEPT:
            # drop a tenth at once so trimming stays cheap per request
            del self.arrivals[: len(self.arrivals) - ARRIVALS_KEPT * 9 // 10]

    def max_in_window(self, window_s: float = 1.0) -> int:
        """The most arrivals within any half-open window of `window_s` seconds."""
        return max_in_window(self.arrivals, window_s)


STATS: Final = web.AppKey("STATS", SimulatorStats)


@dataclass
class _TaskState:
    task: ScenarioTask
    requests: int = 0
    started_mono: float = 0.0
    started_wall: datetime = _EPOCH


def _raw(header_value: str) -> bytes:
    # aiohttp decodes header bytes with surrogateescape; this gets the bytes back
    return header_value.encode("utf-8", "surrogateescape")


def _iso(moment: datetime) -> str:
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


class _Simulator:
    """The request handler and its per-task state."""

    def __init__(self, scenario: Scenario, clock: Clock, stats: SimulatorStats) -> None:
        self._scenario = scenario
        self._clock = clock
        self._stats = stats
        self._by_id = {t.task_id: _TaskState(t) for t in scenario.tasks}
        self._by_dataset = {s.task.dataset: s for s in self._by_id.values()}

    async def get_task(self, request: web.Request) -> web.StreamResponse:
        stats = self._stats
        stats.record_arrival(self._clock.monotonic())
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await self._answer(request)
        finally:
            stats.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("apikey", "")
        expected = self._scenario.api_key
        if not key:
            return web.json_response({"detail": "Missing API key"}, status=401)
        if expected is not None and not hmac.compare_digest(_raw(key), _raw(expected)):
            return web.json_response({"detail": "Invalid API key"}, status=401)
        task_id = request.headers.get("X-Enkrypt-Task-ID", "")
        dataset = request.headers.get("X-Enkrypt-Dataset", "")
        if not task_id and not dataset:
            detail = "X-Enkrypt-Task-ID or X-Enkrypt-Dataset header is required"
            return web.json_response({"detail": detail}, status=422)
        state = self._by_id.get(task_id) if task_id else self._by_dataset.get(dataset)
        if state is None:
            return web.json_response(_NOT_FOUND, status=404)
        if state.requests == 0:
            state.started_mono = self._clock.monotonic()
            state.started_wall = self._clock.now()
        state.requests += 1
        name = state.task.task_id
        self._stats.by_task[name] = self._stats.by_task.get(name, 0) + 1
        fault = self._fault_for(state)
        if fault is None:
            return web.json_response({"data": self._data(state)})
        return await self._faulty(fault, state)

    @staticmethod
    def _fault_for(state: _TaskState) -> Fault | None:
        covered = 0
        for fault in state.task.faults:
            covered += fault.requests
            if state.requests <= covered:
                return fault
        return None

    async def _faulty(self, fault: Fault, state: _TaskState) -> web.StreamResponse:
        kind = fault.kind
        if kind in ("http_503", "http_429"):
            headers: dict[str, str] = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(math.ceil(fault.retry_after))
            status = 503 if kind == "http_503" else 429
            detail = "Service unavailable" if status == 503 else "Too many requests"
            return web.json_response({"detail": detail}, status=status, headers=headers)
        if kind == "http_500":
            return web.json_response({"detail": "Internal server error"}, status=500)
        if kind == "http_401":
            return web.json_response({"detail": "Invalid API key"}, status=401)
        if kind == "not_found":
            return web.json_response(_NOT_FOUND, status=404)
        if kind == "error_200":
            return web.json_response({"error": "Internal error while fetching task"})
        if kind == "garbage":
            return web.Response(text=_GARBAGE, content_type="text/html")
        data = self._data(state)
        if kind == "missing_field":
            del data["status"]
            return web.json_response({"data": data})
        if kind == "truncated":
            body = json.dumps({"data": data})
            return web.Response(text=body[: len(body) // 2], content_type="application/json")
        # slow: the phase is read on arrival, as on a backend that stalls before it answers
        await asyncio.sleep(fault.seconds or 0.0)
        return web.json_response({"data": data})

    def _data(self, state: _TaskState) -> dict[str, Any]:
        task = state.task
        elapsed = self._clock.monotonic() - state.started_mono
        offset = 0.0
        status = task.timeline[-1].status
        for phase in task.timeline:
            if phase.seconds is None or elapsed < offset + phase.seconds:
                status = phase.status
                break
            offset += phase.seconds
        started_at = ""
        if status != QUEUED:
            began = 0.0
            for phase in task.timeline:
                if phase.status != QUEUED:
                    break
                began += phase.seconds or 0.0
            started_at = _iso(state.started_wall + timedelta(seconds=began))
        return {
            "dataset_name": task.dataset,
            "created_at": _iso(task.created_at or state.started_wall),
            "started_at": started_at,
            "status": status,
            "system_description": task.system_description,
            "max_prompts": task.max_prompts,
            "scenarios": task.scenarios,
            "categories": task.categories,
            "depth": task.depth,
            "policy_description": task.policy_description,
            "project_name": task.project_name,
            "info_pdf_url": task.info_pdf_url,
            "tools": [tool.model_dump() for tool in task.tools],
            "task_id": task.task_id,
        }


def build_app(scenario: Scenario, clock: Clock | None = None) -> web.Application:
    """An aiohttp app serving the scenario; its statistics are at `app[STATS]`."""
    app = web.Application()
    stats = SimulatorStats()
    app[STATS] = stats
    simulator = _Simulator(scenario, clock or SystemClock(), stats)
    app.router.add_get("/datasets/get-task", simulator.get_task, allow_head=False)
    return app


async def start_simulator(
    scenario: Scenario, host: str = "127.0.0.1", port: int = 0, clock: Clock | None = None
) -> tuple[web.AppRunner, int, web.Application]:
    """Serve the scenario over TCP; return the runner (to clean up), the bound port, the app."""
    app = build_app(scenario, clock)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound, app


async def serve(
    host: str,
    port: int,
    scenario: Scenario,
    stop: asyncio.Event,
    ready: Callable[[int], None] | None = None,
    *,
    clock: Clock | None = None,
) -> None:
    """Serve the scenario until `stop` is set; call `ready(port)` once listening."""
    runner, bound, _ = await start_simulator(scenario, host, port, clock)
    try:
        if ready is not None:
            ready(bound)
        await stop.wait()
    finally:
        await runner.cleanup()
