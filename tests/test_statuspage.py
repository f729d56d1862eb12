"""The admin API for people: one task, forget, the status page and the event stream.

A real service beside the simulator, on 127.0.0.1; HTTP through a real aiohttp client.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest

from enkwatch.config import Config
from enkwatch.service import Service
from tests.kit import StartSim, make_config, running, sim_task, sse_messages, until

TOKEN = "admin-token-SECRET"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def with_admin(simulate: StartSim, tasks: list[dict[str, Any]], *sim: Any) -> Config:
    """A config watching `tasks` of a simulator serving `sim`, with the admin API on."""
    url = (await simulate(*sim)).url
    return make_config(url, ":memory:", tasks, admin={"listen": "127.0.0.1:0"})


def admin_url(svc: Service) -> str:
    return f"http://127.0.0.1:{svc.admin_port}"


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.get(url, **kw) as resp:
        return resp.status, await resp.json()


def done(svc: Service, key: str) -> bool:
    assert svc.running is not None
    task = svc.running.watchlist.tasks.get(key)
    return task is not None and task.done


async def test_one_task_and_forget(simulate: StartSim) -> None:
    config = await with_admin(
        simulate,
        [{"task_id": "t1"}, {"task_id": "t2"}],
        sim_task("t1", ("Running", 0.1), ("Finished", None)),
        sim_task("t2", ("Running", None)),
    )
    async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
        base = admin_url(svc)
        await until(lambda: done(svc, "t1"))
        status, task = await get_json(http, f"{base}/tasks/t1")
        assert status == 200
        assert task["task_key"] == "t1" and task["status"] == "Finished"
        assert task["outcome"] == "Finished" and task["status_since"].endswith("Z")
        assert (await get_json(http, f"{base}/tasks/nope"))[0] == 404
        # forget needs the token, a task that ended, and a task the state knows
        async with http.post(f"{base}/tasks/t1/forget") as resp:
            assert resp.status == 401
        async with http.post(f"{base}/tasks/t2/forget", headers=AUTH) as resp:
            assert resp.status == 409 and "has not ended" in (await resp.json())["error"]
        async with http.post(f"{base}/tasks/nope/forget", headers=AUTH) as resp:
            assert resp.status == 404
        assert svc.running is not None
        seq_before = svc.running.watchlist.tasks["t1"].record.seq
        async with http.post(f"{base}/tasks/t1/forget", headers=AUTH) as resp:
            assert resp.status == 200
            again = await resp.json()
        assert again["status"] is None and again["outcome"] is None and again["polls"] == 0
        # polled again as new: the first status is a transition again; seq goes on
        await until(lambda: done(svc, "t1"))
        record = svc.running.watchlist.tasks["t1"].record
        assert record.seq == seq_before + 1 and record.last_status == "Finished"


async def test_the_status_page_is_one_self_contained_escaped_page(simulate: StartSim) -> None:
    tasks = [
        {"task_id": "t1", "labels": {"team": "<script>alert(1)</script>"}},
        {"task_id": "t2"},
        {"task_id": "t3"},
    ]
    config = await with_admin(
        simulate,
        tasks,
        sim_task("t1", ("Running", 0.05), ("Finished", None)),
        sim_task("t2", ("Running", 0.05), ("Failed", None)),
        sim_task("t3", ("Queued", None)),
    )
    async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
        base = admin_url(svc)
        await until(lambda: done(svc, "t1") and done(svc, "t2"))
        async with http.get(f"{base}/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
            csp = resp.headers["Content-Security-Policy"]
            page = await resp.text()
        assert "default-src 'none'" in csp
        nonce = re.search(r"'nonce-([^']+)'", csp)
        assert nonce is not None and page.count(f'nonce="{nonce.group(1)}"') == 2
        # nothing loaded from anywhere: no src at all, no stylesheet or font link
        assert " src=" not in page and "@import" not in page and "url(" not in page
        assert re.findall(r"<link [^>]*>", page) == ['<link rel="icon" href="data:,">']
        assert "<script>alert(1)</script>" not in page
        assert "team=&lt;script&gt;alert(1)&lt;/script&gt;" in page
        for key, status in (("t1", "Finished"), ("t2", "Failed"), ("t3", "Queued")):
            assert re.search(rf'data-key="{key}">.*?{status}', page, re.S), key
        # the changes section exists only for a daemon with a token; the token never shows
        assert 'id="changes"' in page and TOKEN not in page
        # without JavaScript: filter and sort through the query
        async with http.get(f"{base}/?status=Failed") as resp:
            only = await resp.text()
        assert 'data-key="t2"' in only and 'data-key="t1"' not in only
        async with http.get(f"{base}/?sort=task&order=desc") as resp:
            desc = await resp.text()
        assert desc.index('data-key="t3"') < desc.index('data-key="t1"')


async def test_the_page_is_read_only_without_a_token(simulate: StartSim) -> None:
    config = await with_admin(simulate, [{"task_id": "t1"}], sim_task("t1", ("Running", None)))
    async with running(config, admin_token=None) as svc, aiohttp.ClientSession() as http:
        base = admin_url(svc)
        async with http.get(f"{base}/") as resp:
            page = await resp.text()
        assert 'id="changes"' not in page and "stop watching" not in page.split("<script")[0]
        assert "const canChange = false;" in page


async def test_events_one_message_each_with_its_id_and_resumable(simulate: StartSim) -> None:
    config = await with_admin(
        simulate, [], sim_task("t1", ("Queued", 0.2), ("Running", 0.2), ("Finished", None))
    )
    async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
        base = admin_url(svc)
        async with http.get(f"{base}/events") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            # added once the stream is open: every event of the task comes through it
            async with http.post(f"{base}/tasks", json={"task_id": "t1"}, headers=AUTH) as add:
                assert add.status == 201
            got = await sse_messages(resp, 3)
        assert [m["data"]["status"] for m in got] == ["Queued", "Running", "Finished"]
        assert [m["id"] for m in got] == ["t1:1", "t1:2", "t1:3"]
        assert all(m["id"] == m["data"]["event_id"] for m in got)
        # resumed after the first: the two that followed, from the ring
        async with http.get(f"{base}/events", headers={"Last-Event-ID": "t1:1"}) as resp:
            again = await sse_messages(resp, 2)
        assert [m["id"] for m in again] == ["t1:2", "t1:3"]
        # an id the ring does not hold (older, or from before a restart): a full snapshot
        async with http.get(f"{base}/events", headers={"Last-Event-ID": "t1:0"}) as resp:
            [snap] = await sse_messages(resp, 1)
        assert snap["event"] == "snapshot"
        assert snap["data"]["reason"] == "last_event_id_not_in_ring"
        assert [t["status"] for t in snap["data"]["tasks"]] == ["Finished"]
        async with http.get(f"{base}/events?snapshot=1") as resp:
            [snap] = await sse_messages(resp, 1)
        assert snap["data"]["reason"] == "requested"


async def test_metrics_have_no_created_series_nor_replica_metrics_on_one_daemon(
    simulate: StartSim,
) -> None:
    config = await with_admin(
        simulate, [{"task_id": "t1"}], sim_task("t1", ("Running", 0.05), ("Finished", None))
    )
    async with running(config, admin_token=TOKEN) as svc, aiohttp.ClientSession() as http:
        await until(lambda: done(svc, "t1"))
        async with http.get(f"{admin_url(svc)}/metrics") as resp:
            text = await resp.text()
    assert "enkwatch_transitions_total" in text
    assert "_created" not in text
    assert "takeover" not in text and "partition" not in text and "lease" not in text


@pytest.mark.parametrize("path", ["/tasks/t1/forget", "/tasks/t1"])
async def test_changes_need_the_token(path: str, simulate: StartSim) -> None:
    config = await with_admin(simulate, [{"task_id": "t1"}], sim_task("t1", ("Running", None)))
    async with running(config, admin_token=None) as svc, aiohttp.ClientSession() as http:
        method = http.post if path.endswith("forget") else http.delete
        async with method(f"{admin_url(svc)}{path}", headers=AUTH) as resp:
            assert resp.status == 403
