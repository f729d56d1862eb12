"""The task API at 10,000 tasks: POST/DELETE cost O(1) in the watch list's size, and a storm
of GET /tasks does not hold the loop (/healthz answers first)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
from pathlib import Path

import aiohttp
import pytest
import yaml

from enkwatch.state.base import TaskRecord
from enkwatch.state.sqlite import SqliteStore
from tests.kit import Spawn, free_port, make_config, running

TOKEN = "admin-token-scale"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# the API: nothing is polled (every stored task is done), so nothing listens there
NO_API = "http://127.0.0.1:9"


async def preload(path: Path, n: int) -> None:
    """`n` tasks added through the API earlier, all done: listed, never polled."""
    store = SqliteStore(str(path))
    await store.add_tasks(
        [
            TaskRecord(
                f"done-{i}",
                f"done-{i}",
                None,
                watch_started_at=1_767_225_600.0,
                last_status="Finished",
                outcome="Finished",
                seq=1,
                spec={"task_id": f"done-{i}", "labels": {"team": "scale"}},
            )
            for i in range(n)
        ]
    )
    await store.close()


def reads_of_every_task(statements: list[str]) -> list[str]:
    """The statements that read or write task rows without naming one."""
    return [
        s for s in statements if " tasks" in s and "WHERE task_key" not in s and "INSERT" not in s
    ]


async def statements_of_post_and_delete(tmp_path: Path, n: int) -> list[str]:
    state = tmp_path / f"state-{n}.db"
    await preload(state, n)
    config = make_config(NO_API, str(state), [], admin={"listen": "127.0.0.1:0"})
    async with running(config, admin_token=TOKEN) as svc:
        assert svc.running is not None
        store = svc.running.store
        assert isinstance(store, SqliteStore)
        base = f"http://127.0.0.1:{svc.admin_port}"
        seen: list[str] = []
        store._db.set_trace_callback(seen.append)
        async with aiohttp.ClientSession(headers=AUTH) as http:
            for i in range(3):
                body = {"task_id": f"new-{i}", "interval_seconds": 3600}
                async with http.post(f"{base}/tasks", json=body) as resp:
                    assert resp.status == 201, await resp.text()
            async with http.post(f"{base}/tasks", json={"task_id": "new-0"}) as resp:
                assert resp.status == 409
            async with http.delete(f"{base}/tasks/new-1") as resp:
                assert resp.status == 204
            async with http.delete(f"{base}/tasks/done-0") as resp:
                assert resp.status == 204
        store._db.set_trace_callback(None)
    return seen


async def test_post_and_delete_do_not_read_the_watch_list(tmp_path: Path) -> None:
    small = await statements_of_post_and_delete(tmp_path, 10)
    large = await statements_of_post_and_delete(tmp_path, 5000)
    assert reads_of_every_task(small) == []
    assert reads_of_every_task(large) == []
    # the same statements whatever the size (only the polls of the new tasks vary)
    assert len([s for s in large if "tasks" in s]) == len([s for s in small if "tasks" in s])


@pytest.mark.e2e
@pytest.mark.timeout(120)
async def test_healthz_answers_during_a_storm_of_get_tasks(
    tmp_path: Path,
    enkwatch: Spawn,
) -> None:
    state = tmp_path / "state.db"
    await preload(state, 10_000)
    port = free_port()
    cfg = tmp_path / "enkwatch.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": NO_API},
                "state": {"path": str(state)},
                "admin": {"listen": f"127.0.0.1:{port}"},
                "tasks": [],
            }
        )
    )
    run = await enkwatch("run", "--config", str(cfg))
    await run.wait_for(lambda e: e["event"] == "daemon.started", "daemon.started")
    answered: list[str] = []  # in the order the answers began

    async def ask(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        return reader, writer

    async def answer(name: str, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> bytes:
        reader, writer = conn
        first = await reader.read(1)
        answered.append(name)
        rest = await reader.read()
        writer.close()
        return first + rest

    # 20 requests are in the server's sockets before /healthz is sent
    storm = [await ask("/tasks") for _ in range(20)]
    health = await ask("/healthz")
    replies = await asyncio.gather(
        answer("healthz", health), *(answer(f"tasks-{i}", c) for i, c in enumerate(storm))
    )
    for reply in replies:
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    body = json.loads(replies[1].partition(b"\r\n\r\n")[2])
    assert len(body["tasks"]) == 10_000
    # the loop was not held by the listing: /healthz answered before the storm was over
    assert answered.index("healthz") < len(answered) - 1, answered
    run.send(signal.SIGTERM)
    assert await run.wait_exit() == 0
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0] == 10_000
