"""The simulator's dataset answers validate against the spec's OpenAPI file, formats included."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from jsonschema import Draft4Validator, FormatChecker
from jsonschema.exceptions import ValidationError

from enkwatch.clock import FakeClock
from enkwatch.simulator import Scenario, build_app, default_scenario

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "data" / "datasets-get-task.openapi.yaml"
SHARED_SPEC = ROOT.parent / "shared" / "spec" / SPEC.name  # the project's copy, beside the repo
STATUSES = ("Queued", "Running", "Finished", "Failed")


def test_the_spec_copy_has_not_drifted() -> None:
    if not SHARED_SPEC.exists():
        pytest.skip(f"{SHARED_SPEC} is not beside the repository")
    assert SPEC.read_text(encoding="utf-8") == SHARED_SPEC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def validator() -> Draft4Validator:
    """The 200 answer's schema of `GET /datasets/get-task`, its formats checked.

    OpenAPI 3.0 schemas are a superset of a JSON Schema draft 4 subset; this one uses no
    OpenAPI-only keyword but `example`, which a validator ignores.
    """
    doc = yaml.safe_load(SPEC.read_text(encoding="utf-8"))
    answer = doc["paths"]["/datasets/get-task"]["get"]["responses"]["200"]
    schema = {**answer["content"]["application/json"]["schema"], "components": doc["components"]}
    Draft4Validator.check_schema(schema)
    return Draft4Validator(schema, format_checker=FormatChecker())


def test_the_validator_checks_date_times(validator: Draft4Validator) -> None:
    # date-time is checked only when rfc3339-validator is installed: prove it is
    good = {
        "dataset_name": "D",
        "created_at": "2025-02-28T11:07:36.872803+00:00",
        "status": "Queued",
        "task_id": "t",
    }
    validator.validate({"data": good})
    for bad in (
        {**good, "started_at": ""},
        {**good, "started_at": None},
        {**good, "created_at": "2025-02-28 11:07"},
        {**good, "status": "Paused"},
        {key: value for key, value in good.items() if key != "task_id"},
    ):
        with pytest.raises(ValidationError):
            validator.validate({"data": bad})


async def answers_over_time(
    client: Client, names: list[str], clock: FakeClock, until_s: float, step_s: float
) -> list[tuple[int, Any]]:
    """Every task's get-task answer at each step of the fake clock."""
    seen: list[tuple[int, Any]] = []
    for _ in range(int(until_s / step_s) + 1):
        for name in names:
            resp = await client.get(
                "/datasets/get-task", headers={"apikey": "k", "X-Enkrypt-Dataset": name}
            )
            body = await resp.json() if resp.content_type == "application/json" else None
            seen.append((resp.status, body))
        clock.advance(step_s)
    return seen


def assert_all_valid(validator: Draft4Validator, seen: list[tuple[int, Any]]) -> set[str]:
    statuses: set[str] = set()
    for status, body in seen:
        if status != 200:
            continue  # a scripted fault (an error status) is not a 200 answer
        errors = [e.message for e in validator.iter_errors(body)]
        assert not errors, (body, errors)
        statuses.add(body["data"]["status"])
        if body["data"]["status"] == "Queued":
            assert "started_at" not in body["data"]
    return statuses


async def test_the_default_scenario_validates(
    aiohttp_client: MakeClient, validator: Draft4Validator
) -> None:
    clock = FakeClock(start=datetime(2026, 1, 1, tzinfo=UTC))
    sc = default_scenario()
    client = await aiohttp_client(build_app(sc, clock))
    names = [t.dataset for t in sc.tasks if t.dataset is not None]
    seen = await answers_over_time(client, names, clock, until_s=12, step_s=0.5)
    assert assert_all_valid(validator, seen) == set(STATUSES)
    assert sum(1 for status, _ in seen if status == 200) >= len(seen) - 3  # SupportBot's faults


async def test_every_status_and_field_validates(
    aiohttp_client: MakeClient, validator: Draft4Validator
) -> None:
    tools = [{"name": "web_search", "description": "searches the web"}]
    lives = {
        "Straight": [("Queued", 1), ("Running", 1), ("Finished", None)],
        "Failing": [("Queued", 1), ("Running", 1), ("Failed", None)],
        "NoQueue": [("Running", 1), ("Finished", None)],
        "FailsQueued": [("Queued", 1), ("Failed", None)],
    }
    tasks: list[dict[str, Any]] = [
        {
            "task_id": f"data-generation-{i}",
            "dataset": name,
            "timeline": [{"status": s, "seconds": sec} for s, sec in life],
            "tools": tools,
            "created_at": "2025-02-28T11:07:36.872803+00:00" if i % 2 else None,
            "system_description": "a system",
            "project_name": "support",
        }
        for i, (name, life) in enumerate(lives.items())
    ]
    clock = FakeClock(start=datetime(2026, 1, 1, tzinfo=UTC))
    client = await aiohttp_client(build_app(Scenario.model_validate({"tasks": tasks}), clock))
    seen = await answers_over_time(client, list(lives), clock, until_s=3, step_s=0.25)
    assert all(status == 200 for status, _ in seen)
    assert assert_all_valid(validator, seen) == set(STATUSES)
