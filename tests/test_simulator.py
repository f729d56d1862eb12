"""The simulated Enkrypt API: lifecycles, faults, auth, statistics, scenario loading."""

from __future__ import annotations

import asyncio
import json
import string
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enkwatch.clock import FakeClock
from enkwatch.errors import ConfigError
from enkwatch.kinds.dataset import parse_observation
from enkwatch.simulator import (
    ARRIVALS_KEPT,
    STATS,
    Scenario,
    SimulatorStats,
    build_app,
    default_scenario,
    load_scenario,
    serve,
    start_simulator,
)

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]

URL = "/datasets/get-task"
TASK_ID = "data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668"
SPEC_FIELDS = (
    "dataset_name",
    "created_at",
    "started_at",
    "status",
    "system_description",
    "scenarios",
    "categories",
    "depth",
    "policy_description",
    "info_pdf_url",
    "tools",
    "project_name",
    "task_id",
    "max_prompts",
)
START = datetime(2026, 1, 1, tzinfo=UTC)


def scenario(*tasks: dict[str, Any], api_key: str | None = None) -> Scenario:
    return Scenario.model_validate({"api_key": api_key, "tasks": list(tasks)})


def task(
    task_id: str = TASK_ID,
    dataset: str = "Election2",
    timeline: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    timeline = timeline or [
        {"status": "Queued", "seconds": 5},
        {"status": "Running", "seconds": 20},
        {"status": "Finished"},
    ]
    return {"task_id": task_id, "dataset": dataset, "timeline": timeline, **extra}


def hdrs(task_id: str | None = None, dataset: str | None = None, key: str = "k") -> dict[str, str]:
    headers = {"apikey": key}
    if task_id is not None:
        headers["X-Enkrypt-Task-ID"] = task_id
    if dataset is not None:
        headers["X-Enkrypt-Dataset"] = dataset
    return headers


async def get_data(client: Client, **kwargs: str) -> dict[str, Any]:
    resp = await client.get(URL, headers=hdrs(**kwargs))
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert isinstance(body["data"], dict)
    return body["data"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=START)


# lifecycle


@pytest.mark.parametrize("by", ["task_id", "dataset"])
async def test_lifecycle(aiohttp_client: MakeClient, clock: FakeClock, by: str) -> None:
    client = await aiohttp_client(build_app(scenario(task()), clock))
    ident = {"task_id": TASK_ID} if by == "task_id" else {"dataset": "Election2"}

    first = await get_data(client, **ident)
    assert first["status"] == "Queued"
    assert "started_at" not in first  # a Queued task has not started (the spec: no empty string)
    assert first["created_at"] == "2026-01-01T00:00:00.000000+00:00"
    assert first["task_id"] == TASK_ID
    assert first["dataset_name"] == "Election2"

    clock.advance(4.9)
    assert (await get_data(client, **ident))["status"] == "Queued"
    clock.advance(0.1)
    running = await get_data(client, **ident)
    assert running["status"] == "Running"
    assert running["started_at"] == "2026-01-01T00:00:05.000000+00:00"
    assert running["created_at"] == first["created_at"]

    clock.advance(20)
    finished = await get_data(client, **ident)
    assert finished["status"] == "Finished"
    assert finished["started_at"] == running["started_at"]
    clock.advance(10_000)
    assert (await get_data(client, **ident))["status"] == "Finished"


async def test_timeline_starts_at_first_request(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    client = await aiohttp_client(build_app(scenario(task()), clock))
    clock.advance(1000)
    data = await get_data(client, task_id=TASK_ID)
    assert data["status"] == "Queued"
    assert data["created_at"] == (START + timedelta(seconds=1000)).isoformat(
        timespec="microseconds"
    )


async def test_unknown_status_and_running_first(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    timeline = [{"status": "Running", "seconds": 1}, {"status": "Paused", "seconds": 1}]
    client = await aiohttp_client(build_app(scenario(task(timeline=timeline)), clock))
    data = await get_data(client, dataset="Election2")
    assert data["status"] == "Running"
    assert data["started_at"] == data["created_at"]  # no Queued phase: started at once
    clock.advance(1)
    assert (await get_data(client, dataset="Election2"))["status"] == "Paused"
    clock.advance(5)  # the last phase stays even though it has seconds
    assert (await get_data(client, dataset="Election2"))["status"] == "Paused"


async def test_task_id_header_wins_over_dataset(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    other = task(task_id="other", dataset="Other", timeline=[{"status": "Failed"}])
    client = await aiohttp_client(build_app(scenario(task(), other), clock))
    data = await get_data(client, task_id="other", dataset="Election2")
    assert data["task_id"] == "other"
    resp = await client.get(URL, headers=hdrs(task_id="nope", dataset="Election2"))
    assert resp.status == 404


async def test_every_spec_field_is_filled(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    tools = [{"name": "web_search", "description": "searches the web"}]
    client = await aiohttp_client(build_app(scenario(task(tools=tools)), clock))
    data = await get_data(client, task_id=TASK_ID)
    assert set(SPEC_FIELDS) - set(data) == {"started_at"}  # Queued: not started
    clock.advance(5)
    assert set(SPEC_FIELDS) <= set(await get_data(client, task_id=TASK_ID))
    for name in ("scenarios", "categories", "depth", "max_prompts"):
        assert isinstance(data[name], int)
    assert data["tools"] == tools
    assert data["project_name"] == "default"
    observation = parse_observation({"data": data})
    assert observation.status == "Queued"
    assert observation.started_at is None


async def test_created_at_override(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    sc = scenario(task(created_at="2025-02-28T11:07:36.872803+00:00"))
    client = await aiohttp_client(build_app(sc, clock))
    data = await get_data(client, task_id=TASK_ID)
    assert data["created_at"] == "2025-02-28T11:07:36.872803+00:00"


# errors and faults


async def test_unknown_task_is_404(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    app = build_app(scenario(task()), clock)
    client = await aiohttp_client(app)
    for headers in (hdrs(task_id="nope"), hdrs(dataset="Nope")):
        resp = await client.get(URL, headers=headers)
        assert resp.status == 404
        assert await resp.json() == {"detail": "Task not found"}
    assert app[STATS].by_task == {}


async def test_no_lookup_header_is_422(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    client = await aiohttp_client(build_app(scenario(task()), clock))
    resp = await client.get(URL, headers=hdrs())
    assert resp.status == 422
    assert "detail" in await resp.json()


async def test_faults_in_order(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    faults = [
        {"kind": "http_500", "requests": 2},
        {"kind": "http_503", "retry_after": 1.2},
        {"kind": "http_429", "retry_after": 2},
        {"kind": "http_503"},
        {"kind": "garbage"},
        {"kind": "truncated"},
        {"kind": "missing_field"},
        {"kind": "error_200"},
        {"kind": "not_found"},
        {"kind": "http_401"},
    ]
    app = build_app(scenario(task(faults=faults)), clock)
    client = await aiohttp_client(app)

    async def get() -> aiohttp.ClientResponse:
        return await client.get(URL, headers=hdrs(task_id=TASK_ID))

    for _ in range(2):
        assert (await get()).status == 500
    resp = await get()
    assert (resp.status, resp.headers["Retry-After"]) == (503, "2")
    resp = await get()
    assert (resp.status, resp.headers["Retry-After"]) == (429, "2")
    resp = await get()
    assert resp.status == 503
    assert "Retry-After" not in resp.headers

    resp = await get()
    assert (resp.status, resp.content_type) == (200, "text/html")
    assert (await resp.text()).startswith("<html>")

    resp = await get()
    assert (resp.status, resp.content_type) == (200, "application/json")
    text = await resp.text()
    assert text.startswith('{"data": {')
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)

    resp = await get()
    data = (await resp.json())["data"]
    assert resp.status == 200
    assert "status" not in data
    assert data["task_id"] == TASK_ID

    resp = await get()
    assert resp.status == 200
    assert await resp.json() == {"error": "Internal error while fetching task"}

    resp = await get()
    assert resp.status == 404
    assert await resp.json() == {"detail": "Task not found"}

    assert (await get()).status == 401

    assert (await get_data(client, task_id=TASK_ID))["status"] == "Queued"
    assert app[STATS].by_task == {TASK_ID: 12}


async def test_faulted_request_starts_the_timeline(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    client = await aiohttp_client(build_app(scenario(task(faults=[{"kind": "http_500"}])), clock))
    resp = await client.get(URL, headers=hdrs(dataset="Election2"))
    assert resp.status == 500
    clock.advance(5)
    assert (await get_data(client, dataset="Election2"))["status"] == "Running"


async def test_slow_fault_answers_after_the_delay(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    sc = scenario(task(faults=[{"kind": "slow", "seconds": 0.05}]))
    client = await aiohttp_client(build_app(sc, clock))
    loop = asyncio.get_running_loop()
    began = loop.time()
    data = await get_data(client, task_id=TASK_ID)
    assert loop.time() - began >= 0.04
    assert data["status"] == "Queued"


# auth


@pytest.mark.parametrize(
    ("api_key", "sent", "status"),
    [
        ("sk-test", "sk-test", 200),
        ("sk-test", "sk-other", 401),
        ("sk-test", "", 401),
        (None, "anything", 200),
        (None, "", 401),
    ],
)
async def test_api_key(
    aiohttp_client: MakeClient, clock: FakeClock, api_key: str | None, sent: str, status: int
) -> None:
    app = build_app(scenario(task(), api_key=api_key), clock)
    client = await aiohttp_client(app)
    resp = await client.get(URL, headers=hdrs(task_id=TASK_ID, key=sent))
    assert resp.status == status
    if status == 401:
        assert "detail" in await resp.json()
        assert app[STATS].by_task == {}  # a rejected request does not start the task


async def test_missing_apikey_header_is_401(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    client = await aiohttp_client(build_app(scenario(task()), clock))
    resp = await client.get(URL, headers={"X-Enkrypt-Task-ID": TASK_ID})
    assert resp.status == 401


# statistics


async def test_stats_count_requests(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    app = build_app(scenario(task(), task(task_id="t2", dataset="D2")), clock)
    client = await aiohttp_client(app)
    await get_data(client, task_id=TASK_ID)
    clock.advance(0.5)
    await get_data(client, dataset="D2")
    clock.advance(0.5)
    await get_data(client, dataset="Election2")
    await client.get(URL, headers=hdrs(task_id="nope"))
    stats = app[STATS]
    assert stats.requests == 4
    assert stats.arrivals == [1000.0, 1000.5, 1001.0, 1001.0]
    assert stats.by_task == {TASK_ID: 2, "t2": 1}
    assert (stats.in_flight, stats.max_in_flight) == (0, 1)
    assert stats.max_in_window(1.0) == 3
    assert stats.max_in_window(0.5) == 2


async def test_stats_max_in_flight(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    sc = scenario(task(faults=[{"kind": "slow", "seconds": 0.05, "requests": 5}]))
    app = build_app(sc, clock)
    client = await aiohttp_client(app)
    results = await asyncio.gather(*(get_data(client, task_id=TASK_ID) for _ in range(5)))
    assert len(results) == 5
    stats = app[STATS]
    assert (stats.requests, stats.in_flight, stats.max_in_flight) == (5, 0, 5)


def test_arrivals_stay_bounded() -> None:
    stats = SimulatorStats()
    for i in range(ARRIVALS_KEPT + 1):
        stats.record_arrival(float(i))
    assert stats.requests == ARRIVALS_KEPT + 1
    assert len(stats.arrivals) <= ARRIVALS_KEPT
    assert stats.arrivals[-1] == float(ARRIVALS_KEPT)


# scenario files


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert info.value.source == str(path)
    return info.value.problems


def test_load_scenario_reads_a_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
api_key: sk-test
tasks:
  - task_id: a
    dataset: A
    timeline: [{status: Queued, seconds: 5}, {status: Finished}]
    faults: [{kind: http_503, requests: 2, retry_after: 1.5}]
""",
    )
    sc = load_scenario(str(path))
    assert sc.api_key == "sk-test"
    assert sc.tasks[0].faults[0].requests == 2
    assert [p.status for p in sc.tasks[0].timeline] == ["Queued", "Finished"]


def test_load_scenario_names_key_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
tasks:
  - task_id: a
    dataset: A
    timeline: [{status: Finished}]
    colour: blue
  - task_id: b
    dataset: B
    timeline: [{status: Queued, seconds: soon}, {status: Finished}]
    faults: [{kind: http_418}, {kind: slow}, {kind: http_500, requests: 0}]
""",
    )
    problems = problems_of(path)
    assert "tasks[0].colour: Extra inputs are not permitted" in problems
    assert any(
        p.startswith("tasks[1].timeline[0].seconds: Input should be a valid number")
        for p in problems
    )
    assert any(p.startswith("tasks[1].faults[0].kind: Input should be") for p in problems)
    assert any(p.startswith("tasks[1].faults[1]: ") and "seconds" in p for p in problems)
    assert any(p.startswith("tasks[1].faults[2].requests: ") for p in problems)
    assert len(problems) == 5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", "tasks: Field required"),
        ("tasks: [{task_id: a, dataset: A}]", "tasks[0].timeline: Field required"),
        ("tasks: [{task_id: a, dataset: A, timeline: []}]", "tasks[0].timeline: List should"),
        (
            "tasks: [{task_id: a, dataset: A, timeline: [{status: Queued}, {status: Failed}]}]",
            "tasks[0].timeline: Value error, timeline[0] needs seconds",
        ),
        (
            "tasks: [{task_id: a, dataset: A, timeline: [{status: Failed, seconds: -1}]}]",
            "tasks[0].timeline[0].seconds: Input should be greater than or equal to 0",
        ),
        (
            "tasks: [{task_id: a, dataset: A, timeline: [{status: Failed}],"
            " faults: [{kind: garbage, retry_after: 1}]}]",
            "tasks[0].faults[0]: Value error, retry_after applies only",
        ),
        (
            "tasks: [{task_id: a, dataset: A, timeline: [{status: Failed}]},"
            " {task_id: a, dataset: A, timeline: [{status: Failed}]}]",
            "tasks: Value error, tasks[1].task_id 'a' repeats tasks[0]; tasks[1].dataset",
        ),
        ("- just\n- a list", "(scenario): must be a mapping"),
        ("tasks: [unclosed", "not valid YAML"),
    ],
)
def test_load_scenario_problems(tmp_path: Path, text: str, expected: str) -> None:
    problems = problems_of(write(tmp_path, text))
    assert any(p.startswith(expected) for p in problems), problems


def test_load_scenario_missing_file(tmp_path: Path) -> None:
    problems = problems_of(tmp_path / "absent.yaml")
    assert problems == ["cannot read the scenario: No such file or directory"]


_keys = st.sampled_from(
    [
        "api_key",
        "tasks",
        "task_id",
        "dataset",
        "timeline",
        "status",
        "kind",
        "test_name",
        "run_id",
        "starts",
        "fields",
        "model_config",
        "list_faults",
        "redteam",
        "max_per_page",
    ]
)
_yamlish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_yamlish.map(yaml.safe_dump), st.text(alphabet=string.printable, max_size=60)))
def test_load_scenario_never_crashes(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            outcome: Scenario | list[str] = load_scenario(path)
        except ConfigError as exc:
            outcome = exc.problems
    assert isinstance(outcome, Scenario) or all(isinstance(p, str) for p in outcome)
    assert outcome  # a ConfigError always names at least one problem


def test_default_scenario() -> None:
    sc = default_scenario()
    assert sc.api_key is None
    datasets = [t for t in sc.tasks if t.kind == "dataset"]
    by_dataset = {t.dataset: t for t in datasets}
    assert list(by_dataset) == ["Election2", "FinanceQA", "SupportBot", "MedicalAdvice"]
    assert [t.ident[-4:] for t in sc.tasks] == ["0001", "0002", "0003", "0004", "0005", "0006",
                                                "0007"]  # fmt: skip
    # then a red-team test, a run, and a red-team test the demo discovers
    assert [t.kind for t in sc.tasks[4:]] == ["redteam", "redteam_run", "redteam"]
    assert [(p.status, p.seconds) for p in by_dataset["Election2"].timeline] == [
        ("Queued", 2),
        ("Running", 4),
        ("Finished", None),
    ]
    assert by_dataset["FinanceQA"].timeline[-1].status == "Failed"
    assert [(f.kind, f.requests, f.retry_after) for f in by_dataset["SupportBot"].faults] == [
        ("http_500", 2, None),
        ("http_429", 1, 1),
    ]
    # every task starts Queued: the demo shows Queued -> Running -> terminal for each
    assert all(t.timeline[0].status == "Queued" for t in sc.tasks)


# real TCP


async def test_start_simulator_serves_over_tcp() -> None:
    runner, port, app = await start_simulator(default_scenario(), port=0)
    try:
        assert port > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{port}{URL}", headers=hdrs(dataset="MedicalAdvice")
            ) as resp,
        ):
            assert resp.status == 200
            assert (await resp.json())["data"]["status"] == "Queued"
        assert app[STATS].requests == 1
    finally:
        await runner.cleanup()


async def test_serve_until_stopped() -> None:
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve("127.0.0.1", 0, default_scenario(), stop, ready.set_result))
    port = await asyncio.wait_for(ready, 5)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{URL}", headers=hdrs(task_id="nope")) as resp,
    ):
        assert resp.status == 404
    stop.set()
    await asyncio.wait_for(server, 5)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as session:
            await session.get(f"http://127.0.0.1:{port}{URL}")
