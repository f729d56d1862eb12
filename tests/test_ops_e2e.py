"""The operations surface end to end: the installed command as a real subprocess."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.servicekit import scenario, sim_task, simulator

pytestmark = pytest.mark.e2e

API_KEY = "sk-test-SECRET-ops"
HOOK_SECRET = "whsec-ops-SECRET"


class Daemon:
    """`python -m enkwatch ...` with its stdout read as JSON events."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.raw: list[bytes] = []

    @classmethod
    async def start(cls, *args: str, env: dict[str, str] | None = None) -> Daemon:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ENKWATCH_")}
        full_env.update({"ENKRYPTAI_API_KEY": API_KEY, "WEBHOOK_SECRET": HOOK_SECRET})
        full_env.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "enkwatch",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=full_env,
        )
        return cls(proc)

    async def until(self, predicate: Any, within_s: float = 20.0) -> dict[str, Any]:
        """Read events until one satisfies `predicate`; return it."""
        assert self.proc.stdout is not None
        for event in self.events:
            if predicate(event):
                return event
        async with asyncio.timeout(within_s):
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError(f"stdout ended; events: {self.events}")
                self.raw.append(line)
                event = json.loads(line)
                self.events.append(event)
                if predicate(event):
                    return event

    async def finish(self, within_s: float = 20.0) -> tuple[int, bytes]:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        async with asyncio.timeout(within_s):
            rest, err = await self.proc.communicate()
        for line in rest.splitlines():
            self.raw.append(line)
            self.events.append(json.loads(line))
        assert self.proc.returncode is not None
        return self.proc.returncode, err


def config_file(path: Path, base_url: str, hook_url: str | None, tasks: list[Any]) -> Path:
    raw: dict[str, Any] = {
        "api": {"base_url": base_url, "timeout_seconds": 2},
        "polling": {"interval_seconds": 0.1, "jitter": 0, "max_requests_per_second": 0},
        "state": {"path": str(path.parent / "state.db")},
        "tasks": tasks,
    }
    if hook_url:
        raw["sinks"] = {
            "webhooks": [
                {"url": hook_url, "secret_env": "WEBHOOK_SECRET", "events": ["task.transition"]}
            ]
        }
    path.write_text(yaml.safe_dump(raw))
    return path


def signed_ok(header: str, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    mac = hmac.new(HOOK_SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), fields["v1"])


@pytest.mark.timeout(90)
async def test_outbox_survives_sigkill_and_delivers_in_order(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    accepting = False
    received: list[tuple[str, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        if not accepting:
            return web.Response(status=503)
        received.append((request.headers["X-Enkwatch-Signature"], body))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await aiohttp_server(app)
    scn = scenario(sim_task("t1", ("Queued", 1.0), ("Running", 1.0), ("Finished", None)))
    async with simulator(scn) as (url, _):
        cfg = config_file(
            tmp_path / "c.yaml", url, str(receiver.make_url("/hook")), [{"task_id": "t1"}]
        )
        first = await Daemon.start("run", "--config", str(cfg))
        await first.until(lambda e: e.get("status") == "Queued")
        first.proc.kill()  # SIGKILL: the delivery of Queued was never confirmed
        await first.proc.wait()

        accepting = True
        second = await Daemon.start("run", "--config", str(cfg), "--exit-when-done")
        code, err = await second.finish(within_s=40)
    assert code == 0, err
    statuses = [json.loads(body)["status"] for _, body in received]
    assert statuses == ["Queued", "Running", "Finished"]
    assert all(signed_ok(sig, body) for sig, body in received)
    ids = [json.loads(body)["event_id"] for _, body in received]
    assert ids == ["t1:1", "t1:2", "t1:3"]
    for daemon in (first, second):
        assert not any(API_KEY.encode() in line for line in daemon.raw)
        assert not any(HOOK_SECRET.encode() in line for line in daemon.raw)


@pytest.mark.timeout(60)
async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(tmp_path: Path) -> None:
    scn = scenario(sim_task("a", ("Running", None)), sim_task("b", ("Running", None)))
    async with simulator(scn) as (url, _):
        cfg = config_file(tmp_path / "c.yaml", url, None, [{"task_id": "a"}])
        daemon = await Daemon.start("run", "--config", str(cfg))
        await daemon.until(lambda e: e.get("task_key") == "a" and e.get("status") == "Running")

        cfg.write_text("tasks: [{task_id: a, interval_seconds: -5}]\n")
        daemon.proc.send_signal(signal.SIGHUP)
        failed = await daemon.until(lambda e: e["event"] == "config.reload_failed")
        assert failed["errors"] == ["tasks[0].interval_seconds: must be greater than 0"]

        config_file(cfg, url, None, [{"task_id": "a"}, {"task_id": "b"}])
        daemon.proc.send_signal(signal.SIGHUP)
        reloaded = await daemon.until(lambda e: e["event"] == "config.reloaded")
        assert reloaded["added"] == ["b"] and reloaded["removed"] == []
        await daemon.until(lambda e: e.get("task_key") == "b" and e.get("status") == "Running")

        daemon.proc.send_signal(signal.SIGTERM)
        code, err = await daemon.finish()
    assert code == 0, err
    a_transitions = [
        e for e in daemon.events if e["event"] == "task.transition" and e["task_key"] == "a"
    ]
    assert len(a_transitions) == 1  # the reload did not restart task a


async def test_admin_port_in_use_is_a_config_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "api": {"base_url": "http://127.0.0.1:9"},
                    "admin": {"listen": f"127.0.0.1:{port}"},
                    "state": {"path": ":memory:"},
                }
            )
        )
        daemon = await Daemon.start("run", "--config", str(cfg))
        code, err = await daemon.finish()
    assert code == 2
    assert f"admin.listen: cannot listen on 127.0.0.1:{port}" in err.decode()
    assert b"Traceback" not in err


async def test_a_closed_stdout_stops_the_daemon_without_a_traceback() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "enkwatch",
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    await asyncio.wait_for(proc.stdout.readline(), 20)
    proc.stdout.feed_eof()
    transport = proc._transport  # type: ignore[attr-defined]
    transport.get_pipe_transport(1).close()  # like `enkwatch demo | head -1`
    err = await asyncio.wait_for(proc.stderr.read(), 30)
    code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 1
    assert err.decode().strip().splitlines() == [
        "enkwatch: stdout cannot be written: Broken pipe (EPIPE); stopping"
    ]


async def test_simulate_on_a_port_in_use_is_a_usage_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sim = await Daemon.start("simulate", "--port", str(port))
        code, err = await sim.finish()
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in err.decode()
    assert b"Traceback" not in err


async def test_simulate_refuses_a_port_out_of_range() -> None:
    sim = await Daemon.start("simulate", "--port", "70000")
    code, err = await sim.finish()
    assert code == 2
    assert "--port: not a port number (0..65535): 70000" in err.decode()
    assert b"Traceback" not in err
