"""The installed command on a state file the kernel will not let grow (RLIMIT_FSIZE, SIGXFSZ
ignored, as a full file system answers): a known condition, not an internal error."""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kit import WAIT_S, child_env, sim_task, simulator

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

# the state file and its WAL may not grow past this: a few commits fit, then writes fail
FILE_SIZE_LIMIT = 120_000


def _small_files() -> None:  # runs in the child, before exec
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


async def start(cfg: Path, limited: bool) -> asyncio.subprocess.Process:
    env = child_env()
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "enkwatch",
        "run",
        "--config",
        str(cfg),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        preexec_fn=_small_files if limited else None,
    )


async def read_until(
    proc: asyncio.subprocess.Process, events: list[dict[str, Any]], name: str
) -> None:
    assert proc.stdout is not None
    async with asyncio.timeout(WAIT_S):
        while not any(e["event"] == name for e in events):
            line = await proc.stdout.readline()
            assert line, f"exited before {name}: {events}"
            events.append(json.loads(line))


async def stop(proc: asyncio.subprocess.Process, events: list[dict[str, Any]]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    events.extend(json.loads(line) for line in out.splitlines())
    assert proc.returncode == 0, err.decode()
    return err.decode()


def state_config(path: Path, base_url: str) -> None:
    path.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": base_url, "timeout_seconds": 2},
                "polling": {"interval_seconds": 0.05, "max_backoff_seconds": 0.2},
                "state": {"path": str(path.parent / "state.db")},
                "tasks": [{"task_id": "t1"}],
            }
        )
    )


async def test_a_state_file_that_cannot_grow(tmp_path: Path) -> None:
    cfg = tmp_path / "enkwatch.yaml"
    # first nothing answers: every poll fails, and each failure is an event to journal
    state_config(cfg, "http://127.0.0.1:9")
    first: list[dict[str, Any]] = []
    proc = await start(cfg, limited=True)
    await read_until(proc, first, "state.unavailable")
    stderr = await stop(proc, first)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    (unavailable,) = [e for e in first if e["event"] == "state.unavailable"]
    assert unavailable["level"] == "warning"
    assert str(tmp_path) not in unavailable["error"]
    written = [e["seq"] for e in first if e.get("task_key") == "t1"]
    assert written == list(range(1, len(written) + 1))
    # then with room and an API: the task goes on from the last event it wrote, none repeated
    async with simulator(sim_task("t1", ("Running", None))) as sim:
        state_config(cfg, sim.url)
        second: list[dict[str, Any]] = []
        proc = await start(cfg, limited=False)
        await read_until(proc, second, "task.transition")
        stderr = await stop(proc, second)
    assert stderr == ""
    (transition,) = [e for e in second if e["event"] == "task.transition"]
    assert transition["seq"] == len(written) + 1
    assert transition["status"] == "Running"
