"""The admin API for people: one task, forget, the status page and the event stream.

A real service beside the simulator, on 127.0.0.1; HTTP through a real aiohttp client.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from enkwatch.service import Service
from tests.kit import make_config, running, sim_task, simulator, until

TOKEN = "admin-token-SECRET"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 15.0


@asynccontextmanager
async def daemon(
    tasks: list[dict[str, Any]], sim_tasks: list[dict[str, Any]], token: str | None = TOKEN
) -> AsyncIterator[tuple[Service, str, aiohttp.ClientSession]]:
    async with simulator(*sim_tasks) as sim:
        url = sim.url
        config = make_config(url, ":memory:", tasks, admin={"listen": "127.0.0.1:0"})
        async with running(config, admin_token=token) as svc, aiohttp.ClientSession() as http:
            yield svc, f"http://127.0.0.1:{svc.admin_port}", http


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any]:
    async with http.get(url, **kw) as resp:
        return resp.status, await resp.json()


def done(svc: Service, key: str) -> bool:
    assert svc.running is not None
    task = svc.running.watchlist.tasks.get(key)
    return task is not None and task.done


async def messages(resp: aiohttp.ClientResponse, count: int) -> list[dict[str, Any]]:
    """The next `count` SSE messages (comments skipped) as {event, id, data}."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT_S):
        while len(out) < count:
            block = (await resp.content.readuntil(b"\n\n")).decode()
            fields: dict[str, Any] = {}
            for line in block.strip("\n").split("\n"):
                name, _, value = line.partition(": ")
                if name in ("event", "id", "data"):
                    fields[name] = orjson.loads(value) if name == "data" else value
            if "data" in fields:
                out.append(fields)
    return out


async def test_one_task_and_forget() -> None:
    sim = [sim_task("t1", ("Running", 0.1), ("Finished", None)), sim_task("t2", ("Running", None))]
    async with daemon([{"task_id": "t1"}, {"task_id": "t2"}], sim) as (svc, base, http):
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


async def test_the_status_page_is_one_self_contained_escaped_page() -> None:
    sim = [
        sim_task("t1", ("Running", 0.05), ("Finished", None)),
        sim_task("t2", ("Running", 0.05), ("Failed", None)),
        sim_task("t3", ("Queued", None)),
    ]
    tasks = [
        {"task_id": "t1", "labels": {"team": "<script>alert(1)</script>"}},
        {"task_id": "t2"},
        {"task_id": "t3"},
    ]
    async with daemon(tasks, sim) as (svc, base, http):
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


async def test_the_page_is_read_only_without_a_token() -> None:
    sim = [sim_task("t1", ("Running", None))]
    async with daemon([{"task_id": "t1"}], sim, token=None) as (_, base, http):
        async with http.get(f"{base}/") as resp:
            page = await resp.text()
        assert 'id="changes"' not in page and "stop watching" not in page.split("<script")[0]
        assert "const canChange = false;" in page


async def test_events_one_message_each_with_its_id_and_resumable() -> None:
    sim = [sim_task("t1", ("Queued", 0.2), ("Running", 0.2), ("Finished", None))]
    async with daemon([], sim) as (_, base, http):
        async with http.get(f"{base}/events") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            # added once the stream is open: every event of the task comes through it
            async with http.post(f"{base}/tasks", json={"task_id": "t1"}, headers=AUTH) as add:
                assert add.status == 201
            got = await messages(resp, 3)
        assert [m["data"]["status"] for m in got] == ["Queued", "Running", "Finished"]
        assert [m["id"] for m in got] == ["t1:1", "t1:2", "t1:3"]
        assert all(m["id"] == m["data"]["event_id"] for m in got)
        # resumed after the first: the two that followed, from the ring
        async with http.get(f"{base}/events", headers={"Last-Event-ID": "t1:1"}) as resp:
            again = await messages(resp, 2)
        assert [m["id"] for m in again] == ["t1:2", "t1:3"]
        # an id the ring does not hold (older, or from before a restart): a full snapshot
        async with http.get(f"{base}/events", headers={"Last-Event-ID": "t1:0"}) as resp:
            [snap] = await messages(resp, 1)
        assert snap["event"] == "snapshot"
        assert snap["data"]["reason"] == "last_event_id_not_in_ring"
        assert [t["status"] for t in snap["data"]["tasks"]] == ["Finished"]
        async with http.get(f"{base}/events?snapshot=1") as resp:
            [snap] = await messages(resp, 1)
        assert snap["data"]["reason"] == "requested"


async def test_metrics_have_no_created_series_nor_replica_metrics_on_one_daemon() -> None:
    sim = [sim_task("t1", ("Running", 0.05), ("Finished", None))]
    async with daemon([{"task_id": "t1"}], sim) as (svc, base, http):
        await until(lambda: done(svc, "t1"))
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    assert "enkwatch_transitions_total" in text
    assert "_created" not in text
    assert "takeover" not in text and "partition" not in text and "lease" not in text


@pytest.mark.parametrize("path", ["/tasks/t1/forget", "/tasks/t1"])
async def test_changes_need_the_token(path: str) -> None:
    sim = [sim_task("t1", ("Running", None))]
    async with daemon([{"task_id": "t1"}], sim, token=None) as (_, base, http):
        method = http.post if path.endswith("forget") else http.delete
        async with method(f"{base}{path}", headers=AUTH) as resp:
            assert resp.status == 403
