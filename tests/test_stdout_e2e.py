"""stdout as a peer that can stall or vanish (issue 13.6, 13.9): the installed command as a
subprocess, its stdout a pipe or file the test controls, the API a real aiohttp server on
127.0.0.1 whose tasks change status on every poll (an event per poll)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.kit import CLOSED, Spawn, finish, free_port, journal_written, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SLOW_WAIT_S = 40.0  # filling the pipe and the queue takes a while on a busy machine
# a long dataset name: every event line is ~4 KiB, so the pipe and the queue fill fast
PAD = "d" * 4000


class FlipApi:
    """Every task answers Queued and Running in turn (Finished once `finish` is set)."""

    def __init__(self) -> None:
        self.polls: dict[str, int] = {}
        self.finish = False

    async def handle(self, request: web.Request) -> web.Response:
        task_id = request.headers.get("X-Enkrypt-Task-ID", "")
        n = self.polls[task_id] = self.polls.get(task_id, 0) + 1
        status = "Finished" if self.finish else ("Queued", "Running")[n % 2]
        data = {
            "task_id": task_id,
            "dataset_name": f"{task_id}-{PAD}",
            "status": status,
            "created_at": "2026-01-01T10:00:00Z",
        }
        return web.json_response({"data": data})


@pytest.fixture
async def api(aiohttp_server: Any) -> tuple[FlipApi, str]:
    flip = FlipApi()
    app = web.Application()
    app.router.add_get("/{tail:.*}", flip.handle)
    server: TestServer = await aiohttp_server(app)
    return flip, str(server.make_url("")).rstrip("/")


def write_config(tmp_path: Path, base_url: str, tasks: int, admin_port: int | None = None) -> str:
    doc: dict[str, Any] = {
        "api": {"base_url": base_url, "timeout_seconds": 5},
        "polling": {
            "interval_seconds": 0.02,
            "jitter": 0,
            "max_requests_per_second": 0,
            "max_concurrency": 8,
        },
        "state": {"path": str(tmp_path / "state.db")},
        "tasks": [{"task_id": f"t{i}"} for i in range(tasks)],
    }
    if admin_port is not None:
        doc["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


def read_all(fd: int) -> bytes:
    """What a pipe holds once its writer is gone."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def event_ids(data: bytes) -> list[str]:
    """The event_ids of the complete JSON lines (a line cut by the stop is not one)."""
    out = []
    for line in data.split(b"\n"):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event_id" in event:
            out.append(event["event_id"])
    return out


# -- 13.6: a reader that stops reading ------------------------------------------------------


async def test_a_stalled_reader_is_visible_sigterm_still_stops_and_nothing_is_lost(
    tmp_path: Path, api: tuple[FlipApi, str], enkwatch: Spawn
) -> None:
    flip, base_url = api
    port = free_port()
    config = write_config(tmp_path, base_url, tasks=16, admin_port=port)
    read_fd, write_fd = os.pipe()
    run = await enkwatch(
        "run",
        "--config",
        config,
        stdout=write_fd,
        json_lines=False,
        ENKWATCH_STDOUT_STALL_LIMIT_S="1.5",
    )
    os.close(write_fd)
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:

        async def healthz_is(status: int) -> bool:
            try:
                async with http.get(f"{url}/healthz") as resp:
                    return resp.status == status
            except aiohttp.ClientError:
                return False

        async def metric(name: str) -> float:
            async with http.get(f"{url}/metrics") as resp:
                text = await resp.text()
            return float(next(ln for ln in text.splitlines() if ln.startswith(name)).split()[1])

        # the pipe fills, /healthz keeps answering and fails once the limit passed
        await until(
            lambda: healthz_is(503),
            "/healthz failing on the stalled reader",
            SLOW_WAIT_S,
            every=0.05,
        )
        async with http.get(f"{url}/healthz") as resp:
            assert "stdout" in (await resp.json())["reason"]

        async def queue_is_full() -> bool:
            return await metric("enkwatch_stdout_queued_bytes") >= 3 * 1024 * 1024

        await until(queue_is_full, "the queue at its bound", SLOW_WAIT_S, every=0.05)
        assert await metric("enkwatch_stdout_stalled_seconds") > 1.5
        polls_then = sum(flip.polls.values())
        # polls wait for room in the queue: memory stays flat, a few more at most
        await until(lambda: healthz_is(503), "still answering", SLOW_WAIT_S, every=0.05)
        assert sum(flip.polls.values()) - polls_then < 100
    started = time.monotonic()
    run.send(signal.SIGTERM)
    code = await run.wait_exit(9.0)
    assert code == 0, run.stderr
    assert time.monotonic() - started < 9.0
    first = event_ids(read_all(read_fd))
    os.close(read_fd)

    # a restart with a reader: every journaled event appears, none lost
    flip.finish = True
    second = await finish(enkwatch, "run", "--config", config, "--exit-when-done", within=60)
    assert second.rc == 0, second.stderr
    shown = set(first) | set(event_ids(second.stdout.encode()))
    with sqlite3.connect(tmp_path / "state.db") as db:
        journal = journal_written(db)
    assert journal
    assert all(written == 1 for _, _, written in journal)
    missing = {f"{key}:{seq}" for key, seq, _ in journal} - shown
    assert not missing, sorted(missing)[:10]
    replayed = set(event_ids(second.stdout.encode())) - set(first)
    assert replayed  # the run cut short left events to write again


# -- 13.9: an unusable stdout is exit 1 with one line ---------------------------------------


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


async def test_a_reader_that_closes_the_pipe_is_exit_1_with_one_line(
    tmp_path: Path, api: tuple[FlipApi, str], enkwatch: Spawn
) -> None:
    _, base_url = api
    config = write_config(tmp_path, base_url, tasks=4)
    read_fd, write_fd = os.pipe()
    run = await enkwatch("run", "--config", config, stdout=write_fd, json_lines=False)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:  # `| head -1`
        assert await asyncio.to_thread(reader.readline)
    code = await run.wait_exit(20.0)
    err = run.stderr
    assert code == 1
    assert "stdout cannot be written" in one_line(err) and "EPIPE" in err, err


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
@pytest.mark.parametrize("command", ["run", "check-config"])
async def test_a_full_disk_on_stdout_is_exit_1_with_one_line(
    tmp_path: Path, api: tuple[FlipApi, str], command: str, enkwatch: Spawn
) -> None:
    _, base_url = api
    config = write_config(tmp_path, base_url, tasks=2)
    full = os.open("/dev/full", os.O_WRONLY)
    run = await enkwatch(command, "--config", config, stdout=full, json_lines=False)
    os.close(full)
    code = await run.wait_exit(20.0)
    err = run.stderr
    assert code == 1
    assert "ENOSPC" in one_line(err), err


async def test_a_stdout_open_for_reading_only_is_exit_1_with_one_line(
    tmp_path: Path, api: tuple[FlipApi, str], enkwatch: Spawn
) -> None:
    _, base_url = api
    config = write_config(tmp_path, base_url, tasks=2)
    (tmp_path / "ro").write_bytes(b"")
    read_only = os.open(tmp_path / "ro", os.O_RDONLY)
    run = await enkwatch("run", "--config", config, stdout=read_only, json_lines=False)
    os.close(read_only)
    code = await run.wait_exit(20.0)
    err = run.stderr
    assert code == 1
    assert "EBADF" in one_line(err), err


@pytest.mark.parametrize("command", ["run", "check-config"])
async def test_stdout_closed_at_start_is_exit_1_with_one_line(
    tmp_path: Path, api: tuple[FlipApi, str], command: str, enkwatch: Spawn
) -> None:
    _, base_url = api
    config = write_config(tmp_path, base_url, tasks=2)
    run = await enkwatch(command, "--config", config, stdout=CLOSED, json_lines=False)
    code = await run.wait_exit(20.0)
    err = run.stderr
    assert code == 1
    assert "stdout is closed" in one_line(err), err
    assert not (tmp_path / "state.db").exists()  # nothing opened: it could have taken fd 1
