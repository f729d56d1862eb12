"""Hostile peers and hostile inputs, end to end: the installed command as a subprocess.

Each peer is a real aiohttp server on 127.0.0.1 in the test's event loop. Memory is
checked as the child's peak RSS, reported by a small wrapper process whose only child is
the command (so no other test's subprocess counts).
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.bombs import bomb
from tests.kit import Run, Spawn, StartSim, finish, sim_task

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

TASK_ID = "data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668"
MIB = 1024 * 1024
# a Python process running enkwatch is well under this; a body inflated in full is over it
RSS_CEILING_BYTES = 256 * MIB

Finish = Callable[..., Awaitable[Run]]


@pytest.fixture
def run_enkwatch(enkwatch: Spawn) -> Finish:
    """`python -m enkwatch ARGS` to its end (the kit's `finish`), with its peak RSS."""
    return functools.partial(finish, enkwatch, json_lines=False, measured=True, within=60.0)


@pytest.fixture
def serve(aiohttp_server: Any) -> Any:
    async def start(handler: Any, path: str = "/{tail:.*}") -> TestServer:
        app = web.Application()
        app.router.add_route("*", path, handler)
        server: TestServer = await aiohttp_server(app)
        return server

    return start


def valid_observation_head() -> bytes:
    data = {
        "dataset_name": "Election2",
        "created_at": "2026-01-01T10:00:00Z",
        "status": "Running",
        "task_id": TASK_ID,
    }
    # a valid answer with a huge extra field: inflated in full it would be accepted
    return json.dumps({"data": data, "pad": ""}).encode()[:-2]


# -- 13.1: the API body limit holds for the decoded bytes ---------------------------------


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_gzip_bomb_from_the_api_is_refused_with_little_memory(
    serve: Any, chunked: bool, run_enkwatch: Finish
) -> None:
    wire = bomb("gzip", 900 * MIB, valid_observation_head(), b'"}')
    assert len(wire) < MIB  # under the limit on the wire (Content-Length), 900 MiB decoded

    async def answer(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if not chunked:
            return web.Response(body=wire, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for i in range(0, len(wire), 64 * 1024):
                await resp.write(wire[i : i + 64 * 1024])
            await resp.write_eof()
        except ConnectionError:
            pass  # the client hung up after the limit: as it should
        return resp

    server = await serve(answer)
    done = await run_enkwatch(
        "status",
        "--task-id",
        TASK_ID,
        ENKWATCH_API__BASE_URL=str(server.make_url("")).rstrip("/"),
    )
    assert done.rc == 5, done.stderr
    assert "invalid_response" in done.stderr
    assert "larger than 1048576 bytes" in done.stderr
    assert done.peak_rss_bytes < RSS_CEILING_BYTES, done.peak_rss_bytes


# -- 13.7: every duration bounded at load time, with its key path -------------------------


def write_yaml(path: Path, doc: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("command", ["check-config", "run"])
async def test_huge_durations_in_a_config_exit_2_naming_each_key(
    tmp_path: Path, command: str, run_enkwatch: Finish
) -> None:
    cfg = write_yaml(
        tmp_path / "huge.yaml",
        {
            "api": {"base_url": "http://127.0.0.1:9", "timeout_seconds": 1e9},
            "polling": {"interval_seconds": 1e12, "max_backoff_seconds": 1e308},
            "state": {"path": ":memory:"},
            "tasks": [{"task_id": TASK_ID, "deadline_seconds": 1e308, "interval_seconds": 1e300}],
        },
    )
    done = await run_enkwatch(command, "--config", cfg)
    assert done.rc == 2, done.stderr
    assert done.stdout == ""
    for path in (
        "api.timeout_seconds",
        "polling.interval_seconds",
        "polling.max_backoff_seconds",
        "tasks[0].deadline_seconds",
        "tasks[0].interval_seconds",
    ):
        assert f"{path}: must be at most" in done.stderr, (path, done.stderr)


async def test_huge_durations_on_the_watch_command_line_exit_2_naming_the_option(
    run_enkwatch: Finish,
) -> None:
    done = await run_enkwatch(
        "watch", "--task-id", TASK_ID, "--interval", "1e12", "--deadline", "inf"
    )
    assert done.rc == 2, done.stderr
    assert "--interval: must be at most 86400 seconds" in done.stderr, done.stderr
    # in plain words (issue 11), naming the option and its task
    assert "--deadline (the task): must be a finite number" in done.stderr, done.stderr


# -- 13.8: credentials in URLs are never printed ------------------------------------------

PG_PASSWORD = "PGSECRET-do-not-print"
HOOK_TOKEN = "HOOKTOKEN-do-not-print"


def no_url_secrets(done: Run) -> None:
    for secret in (PG_PASSWORD, HOOK_TOKEN):
        assert secret not in done.stdout, done.stdout
        assert secret not in done.stderr, done.stderr


async def test_check_config_redacts_credentials_in_urls(
    tmp_path: Path, run_enkwatch: Finish
) -> None:
    cfg = write_yaml(
        tmp_path / "c.yaml",
        {
            "state": {"path": f"postgresql://enk:{PG_PASSWORD}@db.internal:5432/enkwatch"},
            "sinks": {
                "webhooks": [
                    {"url": f"https://hooks.slack.com/services/T000/B000/{HOOK_TOKEN}"},
                    {"url": f"https://example.test/hook?token={HOOK_TOKEN}", "name": "ops"},
                ]
            },
            "tasks": [{"task_id": TASK_ID}],
        },
    )
    done = await run_enkwatch("check-config", "--config", cfg)
    assert done.rc == 0, done.stderr
    no_url_secrets(done)
    out = json.loads(done.stdout)
    assert out["state"]["path"] == "postgresql://[redacted]@db.internal:5432/[redacted]"
    urls = [hook["url"] for hook in out["sinks"]["webhooks"]]
    assert urls == [
        "https://hooks.slack.com/[redacted]",
        "https://example.test/[redacted]?[redacted]",
    ]


@pytest.mark.parametrize(
    ("url", "parses"),
    [
        (f"postgresql://enk:{PG_PASSWORD}@127.0.0.1:1/enkwatch", True),  # nothing listens
        (f"postgresql://enk:{PG_PASSWORD}@127.0.0.1:port/enkwatch", False),
        (f"postgresql://enk:{PG_PASSWORD}@[::1/enkwatch", False),
    ],
    ids=["unreachable", "bad-port", "bad-host"],
)
async def test_a_bad_postgresql_url_is_exit_2_without_its_password(
    tmp_path: Path, url: str, parses: bool, run_enkwatch: Finish
) -> None:
    source = tmp_path / "state.db"
    sqlite3.connect(source).close()
    migrate = await run_enkwatch("migrate-state", "--from", str(source), "--to", url)
    assert migrate.rc == 2, migrate.stderr
    assert "--to: " in migrate.stderr
    no_url_secrets(migrate)
    cfg = write_yaml(
        tmp_path / "c.yaml",
        {
            "api": {"base_url": "http://127.0.0.1:9"},
            "state": {"path": url},
            "tasks": [{"task_id": "t1"}],
        },
    )
    for command in ("check-config", "run"):
        done = await run_enkwatch(command, "--config", cfg)
        no_url_secrets(done)
        if command == "run" or not parses:
            assert done.rc == 2, done.stderr
            assert "state.path: " in done.stderr


async def test_healthcheck_errors_redact_the_url(run_enkwatch: Finish) -> None:
    done = await run_enkwatch(
        "healthcheck", "--url", f"http://127.0.0.1:1/{HOOK_TOKEN}?t={HOOK_TOKEN}"
    )
    assert done.rc == 1
    assert "unhealthy: http://127.0.0.1:1/[redacted]?[redacted]: " in done.stderr
    no_url_secrets(done)
    for bad in (
        f"{HOOK_TOKEN}/x",
        f"http://127.0.0.1:port/{HOOK_TOKEN}",
        f"http://[::1/{HOOK_TOKEN}",
    ):
        done = await run_enkwatch("healthcheck", "--url", bad)
        assert done.rc == 2, done.stderr
        assert "--url: " in done.stderr
        no_url_secrets(done)


async def test_a_run_never_prints_a_webhook_url(
    tmp_path: Path, serve: Any, simulate: StartSim, run_enkwatch: Finish
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        # a receiver that echoes what it was asked, URL included
        return web.Response(status=500, text=f"no such hook: {request.path_qs}")

    hooks = await serve(refuse)
    sim = await simulate(sim_task("t1", ("Finished", None)))
    api_url = sim.url
    cfg = write_yaml(
        tmp_path / "c.yaml",
        {
            "api": {"base_url": api_url, "timeout_seconds": 2},
            "polling": {"interval_seconds": 0.05, "jitter": 0, "max_requests_per_second": 0},
            "state": {"path": str(tmp_path / "state.db")},
            "sinks": {
                "webhooks": [
                    {
                        "url": str(hooks.make_url(f"/services/T0/B0/{HOOK_TOKEN}")),
                        "events": ["*"],
                        "max_age_seconds": 0.001,  # the first failure dead-letters it
                    }
                ]
            },
            "tasks": [{"task_id": "t1"}],
        },
    )
    done = await run_enkwatch("run", "--config", cfg, "--exit-when-done")
    assert done.rc == 0, done.stderr
    no_url_secrets(done)
    events = [json.loads(line) for line in done.stdout.splitlines()]
    names = [e["event"] for e in events]
    assert "daemon.started" in names and "sink.delivery_failed" in names, names


# -- a config file that is not a regular file, or too large, is refused before it is read --


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "too-large"])
@pytest.mark.parametrize("command", ["check-config", "run"])
async def test_a_config_that_is_no_regular_file_is_exit_2_naming_it(
    tmp_path: Path, kind: str, command: str, run_enkwatch: Finish
) -> None:
    path = tmp_path / "config.yaml"
    if kind == "device":
        path.symlink_to("/dev/urandom")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        with path.open("wb") as f:
            f.truncate(32 * MIB + 1)
    done = await run_enkwatch(command, "--config", str(path), within=20)
    assert done.rc == 2, done.stderr
    assert str(path) in done.stderr
    assert "cannot read the config file: it is " in done.stderr
    assert done.peak_rss_bytes < RSS_CEILING_BYTES
