"""The admin HTTP app over real HTTP, on a running service against the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from enkwatch import events as ev
from tests.kit import (
    API_KEY,
    StartSim,
    events_named,
    make_config,
    running,
    sim_task,
    until,
)

TOKEN = "admin-token-123"


def two_tasks() -> tuple[dict[str, Any], ...]:
    return (
        sim_task("t1", ("Queued", 0.3), ("Running", None)),
        sim_task("t2", ("Running", 0.3), ("Finished", None)),
    )


async def test_health_ready_and_metrics(tmp_path: Path, simulate: StartSim) -> None:
    sim = await simulate(*two_tasks())
    url = sim.url
    config = make_config(
        url, str(tmp_path / "s.db"), [{"task_id": "t1"}], admin={"listen": "127.0.0.1:0"}
    )
    with capture_logs() as logs:
        async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{svc.admin_port}"
            await until(lambda: bool(events_named(logs, ev.TASK_TRANSITION)))
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
                assert (await resp.json())["status"] == "ok"
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["ready"] is True
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.content_type == "text/plain"
                text = await resp.text()
            # a stalled scheduler fails the liveness probe
            svc.health._beat -= 3600
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 503
                assert "scheduler" in (await resp.json())["reason"]
    for name in (
        'enkwatch_polls_total{kind="dataset",outcome="ok"}',
        "enkwatch_poll_duration_seconds_bucket",
        'enkwatch_transitions_total{from_status="none",kind="dataset",to_status="Queued"}',
        'enkwatch_tasks{kind="dataset",status="Queued"} 1.0',
        "enkwatch_rate_limit_waits_total",
        "enkwatch_retry_after_pauses_total",
        "enkwatch_consecutive_failures_max",
        "enkwatch_task_time_to_terminal_seconds",
        "enkwatch_outbox_pending",
        'enkwatch_task_status_age_seconds_max{status="Queued"}',
    ):
        assert name in text, name
    assert API_KEY not in text


async def test_readiness_states(tmp_path: Path, simulate: StartSim) -> None:
    sim = await simulate(*two_tasks())
    url = sim.url
    config = make_config(url, ":memory:", [{"task_id": "t1"}])
    async with running(config) as svc:
        assert svc.health.readiness() == (True, "ok")
        svc.health.auth_failed = True
        assert svc.health.readiness() == (False, "the API rejected the key")
        svc.health.auth_failed = False


async def test_task_api_tokens_add_list_delete_and_persist(
    tmp_path: Path, simulate: StartSim
) -> None:
    state = str(tmp_path / "s.db")
    sim = await simulate(*two_tasks())
    url = sim.url
    config = make_config(url, state, [{"task_id": "t1"}], admin={"listen": "127.0.0.1:0"})
    with capture_logs() as logs:
        async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{svc.admin_port}"
            auth = {"Authorization": f"Bearer {TOKEN}"}
            entry = {"task_id": "t2", "labels": {"team": "x"}}
            async with http.post(f"{base}/tasks", json=entry) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            bad = {"Authorization": "Bearer nope"}
            async with http.post(f"{base}/tasks", json=entry, headers=bad) as resp:
                assert resp.status == 401
            async with http.post(f"{base}/tasks", json=entry, headers=auth) as resp:
                assert resp.status == 201
                added = await resp.json()
                assert added["task_key"] == "t2" and added["source"] == "api"
            async with http.post(f"{base}/tasks", json=entry, headers=auth) as resp:
                assert resp.status == 409
            await until(
                lambda: any(
                    e["task_key"] == "t2" and e["status"] == "Finished"
                    for e in events_named(logs, ev.TASK_TRANSITION)
                )
            )
            t2 = [e for e in logs if e.get("task_key") == "t2"]
            assert all(e["labels"] == {"team": "x"} for e in t2)
            async with http.get(f"{base}/tasks") as resp:
                listed = {t["task_key"]: t for t in (await resp.json())["tasks"]}
            assert listed["t2"]["outcome"] == "Finished"
            assert listed["t1"]["status"] in ("Queued", "Running")
            assert listed["t1"]["next_poll_at"] is not None
            assert {"polls", "last_error", "consecutive_failures"} <= listed["t1"].keys()
            async with http.delete(f"{base}/tasks/t1", headers=auth) as resp:
                assert resp.status == 204
            async with http.delete(f"{base}/tasks/t1", headers=auth) as resp:
                assert resp.status == 404
            async with http.delete(f"{base}/tasks/t2") as resp:
                assert resp.status == 401
    # a restart keeps the task added through the API
    config = make_config(url, state, [], admin={"listen": "127.0.0.1:0"})
    async with running(config) as svc:
        assert set(svc.running.watchlist.tasks) == {"t2"}
        assert svc.running.watchlist.tasks["t2"].source == "api"
        assert svc.running.watchlist.tasks["t2"].done  # Finished before: never polled again


async def test_bad_bodies_get_400_with_key_paths(tmp_path: Path, simulate: StartSim) -> None:
    sim = await simulate(*two_tasks())
    url = sim.url
    config = make_config(url, ":memory:", [], admin={"listen": "127.0.0.1:0"})
    async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{svc.admin_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        cases: list[tuple[Any, str]] = [
            ({"deadline_seconds": -1, "task_id": "x"}, "deadline_seconds: "),
            ({"task_id": "a\r\nb"}, "task_id: contains control characters"),
            ({"labels": {}}, "a task needs at least one of task_id, dataset"),
            ({"task_id": "x", "extra": 1}, "extra: unknown key"),
            ({"task_id": "x", "label": {}}, "label: unknown key; did you mean labels?"),
            ([1, 2], "(body): must be an object"),
        ]
        for body, expected in cases:
            async with http.post(f"{base}/tasks", json=body, headers=auth) as resp:
                assert resp.status == 400, body
                errors = (await resp.json())["errors"]
                assert any(expected in e for e in errors), errors
        async with http.post(f"{base}/tasks", data=b"{nope", headers=auth) as resp:
            assert resp.status == 400
        huge = b'{"task_id": "' + b"x" * 200_000 + b'"}'
        async with http.post(f"{base}/tasks", data=huge, headers=auth) as resp:
            assert resp.status == 413


async def test_mutations_are_forbidden_without_a_configured_token(
    tmp_path: Path, simulate: StartSim
) -> None:
    sim = await simulate(*two_tasks())
    url = sim.url
    config = make_config(url, ":memory:", [], admin={"listen": "127.0.0.1:0"})
    async with running(config) as svc, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{svc.admin_port}"
        headers = {"Authorization": "Bearer anything"}
        async with http.post(f"{base}/tasks", json={"task_id": "t1"}, headers=headers) as r:
            assert r.status == 403
        async with http.delete(f"{base}/tasks/t1", headers=headers) as r:
            assert r.status == 403


async def test_a_huge_duration_is_400_naming_its_key_and_the_list_still_answers(
    tmp_path: Path,
    simulate: StartSim,
) -> None:
    sim = await simulate(*two_tasks())
    url = sim.url
    config = make_config(url, ":memory:", [], admin={"listen": "127.0.0.1:0"})
    async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{svc.admin_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        for key, raw in (
            ("interval_seconds", b"1e308"),
            ("interval_seconds", b"1e12"),
            ("deadline_seconds", b"1e308"),
            ("deadline_seconds", b"1e400"),  # json: infinity
            ("interval_seconds", b"NaN"),
        ):
            body = b'{"task_id": "t1", "' + key.encode() + b'": ' + raw + b"}"
            async with http.post(f"{base}/tasks", data=body, headers=auth) as resp:
                assert resp.status == 400, (key, raw)
                errors = (await resp.json())["errors"]
                assert any(e.startswith(f"{key}: ") for e in errors), errors
        async with http.get(f"{base}/tasks") as resp:
            assert resp.status == 200
            assert (await resp.json())["tasks"] == []
        # at the ceilings the task is taken, and listed
        entry = {"task_id": "t1", "interval_seconds": 86_400, "deadline_seconds": 366 * 86_400}
        async with http.post(f"{base}/tasks", json=entry, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
        async with http.get(f"{base}/tasks") as resp:
            assert resp.status == 200
            [task] = (await resp.json())["tasks"]
            assert task["interval_seconds"] == 86_400


async def test_deeply_nested_and_non_object_bodies_get_400(
    tmp_path: Path, simulate: StartSim
) -> None:
    sim = await simulate(*two_tasks())
    url = sim.url
    config = make_config(url, ":memory:", [], admin={"listen": "127.0.0.1:0"})
    async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{svc.admin_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        deep = 30_000  # within the 64 KiB body limit
        cases: list[tuple[bytes, str]] = [
            (b"[" * deep + b"]" * deep, "(body): nested too deeply"),
            (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "(body): nested too deeply"),
            (
                b'{"task_id": "t1", "labels": ' + b"[" * deep + b"]" * deep + b"}",
                "(body): nested too deeply",
            ),
            # as deep as a parser goes: each key path error is still named
            (
                b'{"task_id": "t1", "labels": {"a": ' + b"[" * 900 + b"]" * 900 + b"}}",
                "labels.a: must be text, not a list",
            ),
            (b'{"task_id": "t1", "x": ' + b"[" * 900 + b"]" * 900 + b"}", "x: unknown key"),
            (b"[]", "(body): must be an object, not list"),
            (b'"t1"', "(body): must be an object, not str"),
            (b"1", "(body): must be an object, not int"),
            (b"null", "(body): must be an object, not NoneType"),
            (b"", "(body): not valid JSON"),
            (b"\xff\xfe{", "(body): not valid JSON"),
        ]
        for body, expected in cases:
            async with http.post(f"{base}/tasks", data=body, headers=auth) as resp:
                assert resp.status == 400, (body[:40], await resp.text())
                errors = (await resp.json())["errors"]
                assert any(e.startswith(expected) for e in errors), (body[:40], errors)
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
