"""The simulator's endpoints of every kind: red-team tasks, runs, light status, list pages."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from enkwatch.clock import FakeClock
from enkwatch.errors import ConfigError
from enkwatch.simulator import STATS, Scenario, build_app, load_scenario

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[[web.Application], Awaitable[Client]]

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 1, 1, tzinfo=UTC)
KEY = {"apikey": "k"}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=START)


def scenario(*tasks: dict[str, Any], **keys: Any) -> Scenario:
    return Scenario.model_validate({"tasks": list(tasks), **keys})


def phases(*pairs: tuple[str, float | None]) -> list[dict[str, Any]]:
    return [{"status": s, "seconds": sec} for s, sec in pairs]


def dataset(n: int, *pairs: tuple[str, float | None], **extra: Any) -> dict[str, Any]:
    timeline = (
        phases(*pairs) if pairs else phases(("Queued", 5), ("Running", 20), ("Finished", None))
    )
    return {"task_id": f"data-{n:03}", "dataset": f"DS{n:03}", "timeline": timeline, **extra}


def redteam(n: int, *pairs: tuple[str, float | None], **extra: Any) -> dict[str, Any]:
    timeline = (
        phases(*pairs) if pairs else phases(("Queued", 5), ("Running", 20), ("Finished", None))
    )
    return {
        "kind": "redteam",
        "task_id": f"rt-task-{n:03}",
        "test_name": f"nightly-{n:03}",
        "timeline": timeline,
        **extra,
    }


def run(run_id: str, *pairs: tuple[str, float | None], **extra: Any) -> dict[str, Any]:
    timeline = phases(*pairs) if pairs else phases(("Running", 30), ("completed", None))
    return {"kind": "redteam_run", "run_id": run_id, "timeline": timeline, **extra}


async def get(
    client: Client, path: str, headers: dict[str, str] | None = None, **params: Any
) -> tuple[int, Any]:
    resp = await client.get(path, headers={**KEY, **(headers or {})}, params=params)
    body = await resp.json() if resp.content_type == "application/json" else await resp.text()
    return resp.status, body


async def ok(
    client: Client, path: str, headers: dict[str, str] | None = None, **params: Any
) -> Any:
    status, body = await get(client, path, headers, **params)
    assert status == 200, body
    return body


# -- scenario keys of kinds ------------------------------------------------------------------


def problems(raw: dict[str, Any], tmp_path: Path) -> list[str]:
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    return info.value.problems


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (
            {"kind": "redteam", "task_id": "a"},
            "tasks[0]: Value error, kind redteam needs test_name",
        ),
        ({"kind": "redteam_run"}, "tasks[0]: Value error, kind redteam_run needs run_id"),
        ({"task_id": "a"}, "tasks[0]: Value error, kind dataset needs dataset"),
        (
            {"task_id": "a", "dataset": "A", "run_id": "rt-1", "model_name": "m"},
            "tasks[0]: Value error, model_name does not apply to kind dataset; run_id does not",
        ),
        (
            {"kind": "redteam_run", "run_id": "r", "task_id": "t", "tools": []},
            "tasks[0]: Value error, task_id does not apply to kind redteam_run; tools does not",
        ),
        (
            {
                "kind": "redteam",
                "task_id": "a",
                "test_name": "n",
                "model_config": {"x": 1},
                "depth": 2,
            },
            "tasks[0]: Value error, depth does not apply to kind redteam",
        ),
        ({"kind": "job", "task_id": "a"}, "tasks[0].kind: Input should be 'dataset'"),
        ({"kind": "redteam_run", "run_id": "r", "id_field": "uid"}, "tasks[0].id_field: Input"),
        ({"task_id": "a", "dataset": "A", "starts": "later"}, "tasks[0].starts: Input should be"),
    ],
)
def test_kind_fields_are_checked(task: dict[str, Any], expected: str, tmp_path: Path) -> None:
    found = problems({"tasks": [{"timeline": [{"status": "Running"}], **task}]}, tmp_path)
    assert any(p.startswith(expected) for p in found), found


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"default_per_page": 0}, "default_per_page: Input should be greater than or equal to 1"),
        ({"default_per_page": 20, "max_per_page": 10}, "(scenario): Value error, default_per_page"),
        ({"per_page_out_of_range": "ignore"}, "per_page_out_of_range: Input should be"),
        ({"list_faults": {"runs": []}}, "list_faults.runs: Extra inputs are not permitted"),
        ({"list_faults": {"dataset": [{"kind": "http_418"}]}}, "list_faults.dataset[0].kind"),
        ({"starts": "soon"}, "starts: Input should be 'first_request' or 'at_start'"),
    ],
)
def test_scenario_keys_are_checked(keys: dict[str, Any], expected: str, tmp_path: Path) -> None:
    found = problems({"tasks": [], **keys}, tmp_path)
    assert any(p.startswith(expected) for p in found), found


def test_ids_are_unique_across_kinds(tmp_path: Path) -> None:
    timeline = [{"status": "Running"}]
    found = problems(
        {
            "tasks": [
                {"task_id": "x", "dataset": "A", "timeline": timeline},
                {"kind": "redteam", "task_id": "x", "test_name": "t", "timeline": timeline},
                {"kind": "redteam_run", "run_id": "x", "timeline": timeline},
                {"kind": "redteam", "task_id": "y", "test_name": "t", "timeline": timeline},
            ]
        },
        tmp_path,
    )
    assert found == [
        "tasks: Value error, tasks[1].task_id 'x' repeats tasks[0]; tasks[2].run_id 'x' repeats"
        " tasks[0]; tasks[3].test_name 't' repeats tasks[1]"
    ]


# -- per-task endpoints -----------------------------------------------------------------------


async def test_dataset_task_status_is_light(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    app = build_app(scenario(dataset(1)), clock)
    client = await aiohttp_client(app)
    by_name = {"X-Enkrypt-Dataset": "DS001"}
    assert await ok(client, "/datasets/task-status", by_name) == {"status": "Queued"}
    clock.advance(5)  # the light call started the timeline, as any request of the task
    assert await ok(client, "/datasets/task-status", {"X-Enkrypt-Task-ID": "data-001"}) == {
        "status": "Running"
    }
    assert (await ok(client, "/datasets/get-task", by_name))["data"]["status"] == "Running"
    assert await get(client, "/datasets/task-status", {"X-Enkrypt-Dataset": "nope"}) == (
        404,
        {"detail": "Task not found"},
    )
    assert (await get(client, "/datasets/task-status"))[0] == 422
    assert app[STATS].by_task == {"data-001": 3}


async def test_redteam_get_task(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    extra = {
        "model_name": "gpt-4o",
        "model_saved_name": "support-bot",
        "project_name": "support",
        "model_config": {"system_prompt": "be kind", "model_version": "v1"},
        "user_metadata": {"team": "qa"},
    }
    sc = scenario(redteam(1, **extra), redteam(2, ("Failed", None)), dataset(3))
    client = await aiohttp_client(build_app(sc, clock))
    by_name = {"X-Enkrypt-Test-Name": "nightly-001"}
    data = (await ok(client, "/redteam/get-task", by_name))["data"]
    assert data == {
        "task_id": "rt-task-001",
        "test_name": "nightly-001",
        "status": "Queued",
        "created_at": "2026-01-01T00:00:00.000000+00:00",
        "created_by": "simulator@example.com",
        "project_name": "support",
        "model_name": "gpt-4o",
        "model_saved_name": "support-bot",
        "model_config": {"system_prompt": "be kind", "model_version": "v1"},
        "user_metadata": {"team": "qa"},
    }
    clock.advance(5)
    by_id = {"X-Enkrypt-Task-ID": "rt-task-001"}
    assert (await ok(client, "/redteam/get-task", by_id))["data"]["status"] == "Running"
    assert await ok(client, "/redteam/task-status", by_name) == {"status": "Running"}
    # the task id wins over the test name
    both = {"X-Enkrypt-Task-ID": "rt-task-002", **by_name}
    assert (await ok(client, "/redteam/get-task", both))["data"]["test_name"] == "nightly-002"
    # a task of another kind is not found through this kind's endpoints, nor the other way
    for path, headers in [
        ("/redteam/get-task", {"X-Enkrypt-Task-ID": "data-003"}),
        ("/redteam/task-status", {"X-Enkrypt-Task-ID": "data-003"}),
        ("/datasets/get-task", by_id),
        ("/redteam/get-task", {"X-Enkrypt-Test-Name": "nope"}),
    ]:
        assert await get(client, path, headers) == (404, {"detail": "Task not found"})
    status, body = await get(client, "/redteam/get-task")
    assert status == 422
    assert "X-Enkrypt-Test-Name" in body["detail"]


async def test_runs(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    rid = "rt-8f14e45f-ceea-467f-a0e6-6d35b1d3a1c2"
    sc = scenario(
        run(rid, ("Queued", 10), ("Running", 30), ("completed", None), fields={"progress": 0.5}),
        run("eval-2", ("Running", 5), ("cancelled", None), id_field="run_id"),
        run("eval 3/x", ("error", None)),
    )
    app = build_app(sc, clock)
    client = await aiohttp_client(app)
    body = await ok(client, f"/rt/runs/{rid}")
    assert body == {
        "progress": 0.5,
        "id": rid,
        "status": "Queued",
        "created_at": "2026-01-01T00:00:00.000000+00:00",
    }
    assert (await ok(client, "/rt/runs/eval-2")) == {
        "run_id": "eval-2",
        "status": "Running",
        "created_at": "2026-01-01T00:00:00.000000+00:00",
    }
    clock.advance(10)
    assert (await ok(client, f"/rt/runs/{rid}"))["status"] == "Running"
    assert (await ok(client, "/rt/runs/eval-2"))["status"] == "cancelled"
    clock.advance(30)
    assert (await ok(client, f"/rt/runs/{rid}"))["status"] == "completed"
    # the id path-escaped, as a client must send it
    assert (await ok(client, "/rt/runs/eval%203%2Fx"))["status"] == "error"
    assert await get(client, "/rt/runs/rt-unknown") == (404, {"detail": "Run not found"})
    assert app[STATS].by_task == {rid: 3, "eval-2": 2, "eval 3/x": 1}


# -- lists ------------------------------------------------------------------------------------


async def test_dataset_list_pages(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    tasks = [dataset(n, ("Running", 10 + n), ("Finished", None)) for n in range(1, 26)]
    client = await aiohttp_client(build_app(scenario(*tasks, starts="at_start"), clock))
    first = await ok(client, "/datasets/list-tasks", status="Running")
    assert first == {
        "datasets": [f"DS{n:03}" for n in range(1, 11)],
        "pagination": {
            "page": 1,
            "per_page": 10,
            "total_count": 25,
            "total_pages": 3,
            "has_next": True,
            "has_previous": False,
        },
    }
    last = await ok(client, "/datasets/list-tasks", status="Running", page=3)
    assert last["datasets"] == [f"DS{n:03}" for n in range(21, 26)]
    assert (last["pagination"]["has_next"], last["pagination"]["has_previous"]) == (False, True)
    past = await ok(client, "/datasets/list-tasks", status="Running", page=4)
    assert past["datasets"] == []
    assert (past["pagination"]["has_next"], past["pagination"]["total_count"]) == (False, 25)

    clock.advance(14.5)  # DS001..DS004 (11..14 s) have finished
    finished = await ok(client, "/datasets/list-tasks", status="Finished", per_page=100)
    assert finished["datasets"] == ["DS001", "DS002", "DS003", "DS004"]
    running = await ok(client, "/datasets/list-tasks", status="Running", per_page=100)
    assert running["datasets"] == [f"DS{n:03}" for n in range(5, 26)]
    everything = await ok(client, "/datasets/list-tasks", per_page=100)
    assert len(everything["datasets"]) == 25
    assert (await ok(client, "/datasets/list-tasks", status="Queued"))["datasets"] == []


async def test_redteam_list_items_carry_their_status(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    sc = scenario(
        redteam(1, ("Running", 10), ("Finished", None)),
        redteam(2, ("Queued", 5), ("Running", None), project_name="support"),
        redteam(3, ("Failed", None), created_at="2025-12-31T00:00:00"),  # no offset: UTC
        dataset(4),
        starts="at_start",
    )
    client = await aiohttp_client(build_app(sc, clock))
    everything = await ok(client, "/redteam/list-tasks")
    # ordered by created_at, then task id: the one created the day before comes first
    assert [(t["task_id"], t["status"]) for t in everything["tasks"]] == [
        ("rt-task-003", "Failed"),
        ("rt-task-001", "Running"),
        ("rt-task-002", "Queued"),
    ]
    assert everything["tasks"][2] == {
        "task_id": "rt-task-002",
        "test_name": "nightly-002",
        "status": "Queued",
        "model_name": "gpt-4o-mini",
        "project_name": "support",
        "created_at": "2026-01-01T00:00:00.000000+00:00",
    }
    assert everything["tasks"][0]["created_at"] == "2025-12-31T00:00:00.000000+00:00"
    assert everything["pagination"]["total_count"] == 3
    clock.advance(10)
    running = await ok(client, "/redteam/list-tasks", status="Running")
    assert [(t["task_id"], t["status"]) for t in running["tasks"]] == [("rt-task-002", "Running")]


async def test_first_request_jobs_wait_in_their_first_status(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    sc = scenario(
        redteam(1, ("Queued", 5), ("Running", None)),
        redteam(2, ("Queued", 5), ("Running", None), starts="at_start"),
    )
    client = await aiohttp_client(build_app(sc, clock))
    clock.advance(100)
    items = (await ok(client, "/redteam/list-tasks"))["tasks"]
    # nobody asked about the first one: listing does not start it, and it has no created_at
    assert [(t["status"], "created_at" in t) for t in items] == [
        ("Queued", False),
        ("Running", True),
    ]
    await ok(client, "/redteam/task-status", {"X-Enkrypt-Task-ID": "rt-task-001"})
    clock.advance(5)
    items = (await ok(client, "/redteam/list-tasks", status="Running"))["tasks"]
    assert [t["task_id"] for t in items] == ["rt-task-001", "rt-task-002"]
    assert items[0]["created_at"] == "2026-01-01T00:01:40.000000+00:00"


async def test_a_job_moving_between_lists_shifts_the_pages(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    # five running tests; the second finishes between the reads of page 1 and page 2
    tasks = [redteam(n, ("Running", 100), ("Finished", None)) for n in (1, 3, 4, 5)]
    tasks.append(redteam(2, ("Running", 10), ("Finished", None)))
    client = await aiohttp_client(build_app(scenario(*tasks, starts="at_start"), clock))

    async def page(status: str, number: int) -> list[str]:
        body = await ok(client, "/redteam/list-tasks", status=status, page=number, per_page=2)
        return [t["test_name"][-1] for t in body["tasks"]]

    assert await page("Running", 1) == ["1", "2"]
    clock.advance(10)
    # as the real API would: 3 slid onto page 1, so a reader of page 2 never sees it there
    assert await page("Running", 2) == ["4", "5"]
    assert await page("Running", 1) == ["1", "3"]
    assert await page("Finished", 1) == ["2"]
    body = await ok(client, "/redteam/list-tasks", status="Running", page=2, per_page=2)
    assert body["pagination"] == {
        "page": 2,
        "per_page": 2,
        "total_count": 4,
        "total_pages": 2,
        "has_next": False,
        "has_previous": True,
    }


@pytest.mark.parametrize("path", ["/datasets/list-tasks", "/redteam/list-tasks"])
async def test_page_size_default_and_maximum(
    aiohttp_client: MakeClient, clock: FakeClock, path: str
) -> None:
    tasks = [dataset(n, ("Running", None)) for n in range(150)]
    tasks += [redteam(n, ("Running", None)) for n in range(150)]
    key = "datasets" if path.startswith("/datasets") else "tasks"
    client = await aiohttp_client(build_app(scenario(*tasks), clock))
    assert len((await ok(client, path))[key]) == 10
    assert len((await ok(client, path, per_page=100))[key]) == 100
    for params in ({"per_page": 101}, {"per_page": 0}, {"per_page": "ten"}, {"page": 0}):
        status, body = await get(client, path, **params)
        assert status == 422, params
        assert body["detail"][0]["loc"] == ["query", next(iter(params))]
    status, body = await get(client, path, status="running")  # the vocabulary is exact
    assert (status, body["detail"][0]["loc"]) == (422, ["query", "status"])

    clamping = scenario(*tasks, default_per_page=5, max_per_page=20, per_page_out_of_range="clamp")
    client = await aiohttp_client(build_app(clamping, clock))
    assert len((await ok(client, path))[key]) == 5
    big = await ok(client, path, per_page=500)
    assert (len(big[key]), big["pagination"]["per_page"], big["pagination"]["total_pages"]) == (
        20,
        20,
        8,
    )
    assert (await ok(client, path, per_page=-3))["pagination"]["per_page"] == 1


# -- faults and auth on every endpoint -------------------------------------------------------

PER_TASK = [
    ("/datasets/get-task", {"X-Enkrypt-Task-ID": "data-001"}, ("data", "status")),
    ("/datasets/task-status", {"X-Enkrypt-Dataset": "DS001"}, ("status",)),
    ("/redteam/get-task", {"X-Enkrypt-Test-Name": "nightly-002"}, ("data", "status")),
    ("/redteam/task-status", {"X-Enkrypt-Task-ID": "rt-task-002"}, ("status",)),
    ("/rt/runs/rt-3", {}, ("status",)),
]
LISTS = [
    ("/datasets/list-tasks", {}, ("datasets",)),
    ("/redteam/list-tasks", {}, ("tasks",)),
]
FAULTS: list[dict[str, Any]] = [
    {"kind": "http_500"},
    {"kind": "http_503", "retry_after": 1.2},
    {"kind": "http_429", "retry_after": 2},
    {"kind": "slow", "seconds": 0.01},
    {"kind": "garbage"},
    {"kind": "truncated"},
    {"kind": "missing_field"},
    {"kind": "error_200"},
    {"kind": "not_found"},
    {"kind": "http_401"},
]


def faulty_scenario(faults: list[dict[str, Any]], in_lists: bool) -> Scenario:
    per_task = {} if in_lists else {"faults": faults}
    list_faults = {"dataset": faults, "redteam": faults} if in_lists else {}
    return scenario(
        dataset(1, **per_task),
        redteam(2, **per_task),
        run("rt-3", **per_task),
        list_faults=list_faults,
    )


async def check_fault(
    resp: aiohttp.ClientResponse, fault: dict[str, Any], main: tuple[str, ...]
) -> None:
    kind = fault["kind"]
    expected_status = {
        "http_500": 500,
        "http_503": 503,
        "http_429": 429,
        "not_found": 404,
        "http_401": 401,
    }.get(kind, 200)
    assert resp.status == expected_status
    if kind in ("http_503", "http_429"):
        assert resp.headers["Retry-After"] == "2"
    text = await resp.text()
    if kind == "garbage":
        assert resp.content_type == "text/html"
        assert text.startswith("<html>")
        return
    assert resp.content_type == "application/json"
    if kind == "truncated":
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        return
    body = json.loads(text)
    if kind == "error_200":
        assert body == {"error": "Internal error while fetching task"}
    elif kind == "missing_field":
        inner = body
        for key in main[:-1]:
            inner = inner[key]
        assert main[-1] not in inner
    elif kind == "slow":
        assert body
    else:
        assert "detail" in body


@pytest.mark.parametrize("fault", FAULTS, ids=[f["kind"] for f in FAULTS])
@pytest.mark.parametrize(("path", "headers", "main"), PER_TASK + LISTS, ids=lambda v: v)
async def test_every_fault_on_every_endpoint(
    aiohttp_client: MakeClient,
    clock: FakeClock,
    fault: dict[str, Any],
    path: str,
    headers: dict[str, str],
    main: tuple[str, ...],
) -> None:
    in_lists = "list-tasks" in path
    client = await aiohttp_client(build_app(faulty_scenario([fault], in_lists), clock))
    resp = await client.get(path, headers={**KEY, **headers})
    await check_fault(resp, fault, main)
    # then normal answers, with the field a missing_field fault dropped
    body = await ok(client, path, headers)
    inner = body
    for key in main[:-1]:
        inner = inner[key]
    assert main[-1] in inner


async def test_faults_of_a_task_count_its_requests_on_all_its_endpoints(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    faults = [{"kind": "http_500"}, {"kind": "ok", "requests": 2}, {"kind": "http_429"}]
    client = await aiohttp_client(build_app(faulty_scenario(faults, in_lists=False), clock))
    by_name = {"X-Enkrypt-Test-Name": "nightly-002"}
    statuses = [
        (await get(client, "/redteam/get-task", by_name))[0],
        (await get(client, "/redteam/task-status", by_name))[0],
        (await get(client, "/redteam/get-task", by_name))[0],
        (await get(client, "/redteam/task-status", by_name))[0],
        (await get(client, "/redteam/task-status", by_name))[0],
        (await get(client, "/rt/runs/rt-3"))[0],  # another job: its own count
    ]
    assert statuses == [500, 200, 200, 429, 200, 500]


async def test_list_faults_count_each_list_endpoint_apart(
    aiohttp_client: MakeClient, clock: FakeClock
) -> None:
    # a rate limit in the middle of a sweep: the third page of the red-team list
    faults = {"redteam": [{"kind": "ok", "requests": 2}, {"kind": "http_429", "retry_after": 1}]}
    tasks = [redteam(n, ("Running", None)) for n in range(5)]
    client = await aiohttp_client(build_app(scenario(*tasks, list_faults=faults), clock))
    seen = [(await get(client, "/redteam/list-tasks", page=p, per_page=2))[0] for p in (1, 2, 3)]
    assert seen == [200, 200, 429]
    assert (await get(client, "/datasets/list-tasks"))[0] == 200  # the other list: no fault
    assert (await get(client, "/redteam/list-tasks", page=3, per_page=2))[0] == 200
    # a request refused for its query does not use up a scripted fault
    client = await aiohttp_client(build_app(scenario(*tasks, list_faults=faults), clock))
    assert (await get(client, "/redteam/list-tasks", per_page=0))[0] == 422
    assert [(await get(client, "/redteam/list-tasks"))[0] for _ in range(3)] == [200, 200, 429]


ALL = [path for path, _, _ in PER_TASK + LISTS]


@pytest.mark.parametrize("path", ALL)
async def test_every_endpoint_needs_the_api_key(
    aiohttp_client: MakeClient, clock: FakeClock, path: str
) -> None:
    app = build_app(faulty_scenario([], in_lists=False).model_copy(update={"api_key": "sk"}), clock)
    client = await aiohttp_client(app)
    headers = dict(next(h for p, h, _ in PER_TASK + LISTS if p == path))
    for key in ("", "wrong"):
        resp = await client.get(path, headers={"apikey": key, **headers} if key else headers)
        assert resp.status == 401
        assert "detail" in await resp.json()
    assert (await client.get(path, headers={"apikey": "sk", **headers})).status == 200
    assert app[STATS].by_task == ({} if "list-tasks" in path else {app_ident(path): 1})


def app_ident(path: str) -> str:
    return {"datasets": "data-001", "redteam": "rt-task-002", "rt": "rt-3"}[path.split("/")[1]]


async def test_stats_count_every_endpoint(aiohttp_client: MakeClient, clock: FakeClock) -> None:
    app = build_app(faulty_scenario([], in_lists=False), clock)
    client = await aiohttp_client(app)
    for path, headers, _ in PER_TASK + LISTS:
        await ok(client, path, headers)
    await get(client, "/rt/runs/none")
    stats = app[STATS]
    assert stats.requests == 8
    assert stats.by_endpoint == {
        "/datasets/get-task": 1,
        "/datasets/task-status": 1,
        "/redteam/get-task": 1,
        "/redteam/task-status": 1,
        "/rt/runs/{run_id}": 2,
        "/datasets/list-tasks": 1,
        "/redteam/list-tasks": 1,
    }
    assert stats.by_task == {"data-001": 2, "rt-task-002": 2, "rt-3": 1}


# -- the documented example scenario ---------------------------------------------------------


def documented_scenario() -> str:
    text = (ROOT / "docs" / "development.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "kind: redteam_run" in b)


async def test_the_documented_scenario_serves_every_kind(
    aiohttp_client: MakeClient, clock: FakeClock, tmp_path: Path
) -> None:
    path = tmp_path / "every-kind.yaml"
    path.write_text(documented_scenario(), encoding="utf-8")
    sc = load_scenario(path)
    assert {t.kind for t in sc.tasks} == {"dataset", "redteam", "redteam_run"}
    client = await aiohttp_client(build_app(sc, clock))
    headers = {"apikey": "sk-test"}

    async def body(url: str, **extra: str) -> Any:
        resp = await client.get(url, headers={**headers, **extra})
        assert resp.status == 200, url
        return await resp.json()

    # discovery sees the red-team tests that exist from the start
    listed = await body("/redteam/list-tasks?status=Running&per_page=100")
    assert [t["test_name"] for t in listed["tasks"]] == ["nightly-llama", "nightly-gpt"]
    # nobody asked about the dataset task yet: it waits in its first status
    assert (await body("/datasets/list-tasks?status=Queued"))["datasets"] == ["Election2"]
    data = (await body("/datasets/get-task", **{"X-Enkrypt-Dataset": "Election2"}))["data"]
    assert data["status"] == "Queued"
    red = await body("/redteam/get-task", **{"X-Enkrypt-Test-Name": "nightly-gpt"})
    assert red["data"]["status"] == "Running"
    run_id = next(t.run_id for t in sc.tasks if t.kind == "redteam_run")
    assert (await body(f"/rt/runs/{run_id}"))["status"] == "Queued"
    clock.advance(3600)
    assert (await body(f"/rt/runs/{run_id}"))["status"] == "completed"
    finished = await body("/redteam/list-tasks?status=Finished")
    assert [t["test_name"] for t in finished["tasks"]] == ["nightly-llama", "nightly-gpt"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"page": ""}, 422),
        ({"page": "1.5"}, 422),
        ({"page": "9" * 5000}, 422),  # longer than int() takes
        ({"page": "99999999999999999999"}, 200),  # far past the last page: empty
        ({"per_page": "99999999999999999999"}, 422),
        ({"per_page": " 3 "}, 200),
        ({"status": ""}, 422),
        ({"status": "Finished", "extra": "x"}, 200),  # unknown parameters are ignored
    ],
)
async def test_odd_list_queries_are_answered(
    aiohttp_client: MakeClient, clock: FakeClock, params: dict[str, str], expected: int
) -> None:
    client = await aiohttp_client(build_app(scenario(redteam(1)), clock))
    status, body = await get(client, "/redteam/list-tasks", **params)
    assert status == expected, body
    if status == 200:
        assert body["pagination"]["has_next"] is False
