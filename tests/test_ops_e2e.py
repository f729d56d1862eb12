"""The operations surface end to end: the installed command as a real subprocess."""

from __future__ import annotations

import hashlib
import hmac
import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kit import SECRET, Spawn, StartReceiver, StartSim, finish, sim_task, write_config

pytestmark = pytest.mark.e2e

HOOK_SECRET = "whsec-ops-SECRET"


def config_file(path: Path, base_url: str, hook_url: str | None, tasks: list[Any]) -> Path:
    sinks = {
        "webhooks": [
            {"url": hook_url, "secret_env": "WEBHOOK_SECRET", "events": ["task.transition"]}
        ]
    }
    write_config(
        path,
        base_url,
        tasks,
        state=str(path.parent / "state.db"),
        polling={"interval_seconds": 0.1},
        **({"sinks": sinks} if hook_url else {}),
    )
    return path


def signed_ok(header: str, body: bytes) -> bool:
    fields = dict(part.split("=", 1) for part in header.split(","))
    mac = hmac.new(HOOK_SECRET.encode(), f"{fields['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), fields["v1"])


@pytest.mark.timeout(90)
async def test_outbox_survives_sigkill_and_delivers_in_order(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn, hooks: StartReceiver
) -> None:
    receiver = await hooks(accepting=False)
    sim = await simulate(sim_task("t1", ("Queued", 1.0), ("Running", 1.0), ("Finished", None)))
    cfg = config_file(tmp_path / "c.yaml", sim.url, receiver.url, [{"task_id": "t1"}])
    first = await enkwatch("run", "--config", str(cfg), WEBHOOK_SECRET=HOOK_SECRET)
    await first.wait_for(lambda e: e.get("status") == "Queued")
    first.kill()  # SIGKILL: the delivery of Queued was never confirmed
    await first.wait_exit()

    receiver.accepting = True
    second = await enkwatch(
        "run", "--config", str(cfg), "--exit-when-done", WEBHOOK_SECRET=HOOK_SECRET
    )
    code = await second.wait_exit(within=40)
    assert code == 0, second.stderr
    received = [(headers["X-Enkwatch-Signature"], body) for headers, body in receiver.received]
    statuses = [json.loads(body)["status"] for _, body in received]
    assert statuses == ["Queued", "Running", "Finished"]
    assert all(signed_ok(sig, body) for sig, body in received)
    ids = [json.loads(body)["event_id"] for _, body in received]
    assert ids == ["t1:1", "t1:2", "t1:3"]
    for daemon in (first, second):
        assert not any(SECRET in line for line in daemon.lines)
        assert not any(HOOK_SECRET in line for line in daemon.lines)


@pytest.mark.timeout(60)
async def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(sim_task("a", ("Running", None)), sim_task("b", ("Running", None)))
    cfg = config_file(tmp_path / "c.yaml", sim.url, None, [{"task_id": "a"}])
    daemon = await enkwatch("run", "--config", str(cfg))
    await daemon.wait_for(lambda e: e.get("task_key") == "a" and e.get("status") == "Running")

    cfg.write_text("tasks: [{task_id: a, interval_seconds: -5}]\n")
    daemon.send(signal.SIGHUP)
    failed = await daemon.wait_for(lambda e: e["event"] == "config.reload_failed")
    assert failed["errors"] == ["tasks[0].interval_seconds: must be greater than 0"]

    config_file(cfg, sim.url, None, [{"task_id": "a"}, {"task_id": "b"}])
    daemon.send(signal.SIGHUP)
    reloaded = await daemon.wait_for(lambda e: e["event"] == "config.reloaded")
    assert reloaded["added"] == ["b"] and reloaded["removed"] == []
    await daemon.wait_for(lambda e: e.get("task_key") == "b" and e.get("status") == "Running")

    daemon.send(signal.SIGTERM)
    code = await daemon.wait_exit()
    assert code == 0, daemon.stderr
    a_transitions = [
        e for e in daemon.events if e["event"] == "task.transition" and e["task_key"] == "a"
    ]
    assert len(a_transitions) == 1  # the reload did not restart task a


async def test_admin_port_in_use_is_a_config_error(tmp_path: Path, enkwatch: Spawn) -> None:
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
        daemon = await finish(enkwatch, "run", "--config", str(cfg), json_lines=False)
    assert daemon.rc == 2
    assert f"admin.listen: cannot listen on 127.0.0.1:{port}" in daemon.stderr
    assert "Traceback" not in daemon.stderr


async def test_a_closed_stdout_stops_the_daemon_without_a_traceback(enkwatch: Spawn) -> None:
    run = await enkwatch("demo", json_lines=False)
    await run.wait_for(lambda e: True, "a first event")
    assert run.proc.stdout is not None
    run.proc.stdout.feed_eof()
    transport = run.proc._transport  # type: ignore[attr-defined]
    transport.get_pipe_transport(1).close()  # like `enkwatch demo | head -1`
    code = await run.wait_exit(within=30)
    assert code == 1
    assert run.stderr.strip().splitlines() == [
        "enkwatch: stdout cannot be written: Broken pipe (EPIPE); stopping"
    ]


async def test_simulate_on_a_port_in_use_is_a_usage_error(enkwatch: Spawn) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sim = await finish(enkwatch, "simulate", "--port", str(port), json_lines=False)
    assert sim.rc == 2
    assert f"cannot listen on 127.0.0.1:{port}: the port is in use" in sim.stderr
    assert "Traceback" not in sim.stderr


async def test_simulate_refuses_a_port_out_of_range(enkwatch: Spawn) -> None:
    sim = await finish(enkwatch, "simulate", "--port", "70000", json_lines=False)
    assert sim.rc == 2
    assert "--port: not a port number (0..65535): 70000" in sim.stderr
    assert "Traceback" not in sim.stderr
