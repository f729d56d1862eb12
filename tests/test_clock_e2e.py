"""End to end: the daemon's wall clock steps back and forward (libfaketime) while it runs.

The daemon runs under libfaketime with the offset read from a file at every call
(`FAKETIME_NO_CACHE`), so the test steps the daemon's wall clock, and only its wall clock
(`FAKETIME_DONT_FAKE_MONOTONIC`), whenever it likes. The simulator, in the test's process,
keeps real time and records when each poll arrives.
"""

from __future__ import annotations

import asyncio
import glob
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from enkwatch.simulator import max_in_window
from tests.kit import Run, Spawn, StartSim, free_port, sim_task, tid, timeline, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

INTERVAL_S = 0.2
HOW_TO_ENABLE = "libfaketime is not installed: apt-get install faketime (.ci/run does)"


def libfaketime() -> str | None:
    """The path of libfaketime's shared object, or None."""
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    return found[0] if found else None


async def healthz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/healthz") as resp,
    ):
        return resp.status


async def steps_counted(port: int) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("enkwatch_wall_clock_steps_total "):
            return float(line.split()[1])
    raise AssertionError("no enkwatch_wall_clock_steps_total in /metrics")


@pytest.mark.parametrize("step", ["-7200", "+7200"])
async def test_a_wall_clock_step_neither_stops_nor_bursts_polling(
    step: str,
    tmp_path: Path,
    simulate: StartSim,
    enkwatch: Spawn,
) -> None:
    lib = libfaketime()
    if lib is None:
        pytest.skip(HOW_TO_ENABLE)
    sim = await simulate(sim_task(1, "Forever", timeline("Running")))
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": sim.url, "timeout_seconds": 2},
                "polling": {
                    "interval_seconds": INTERVAL_S,
                    "jitter": 0,
                    "max_requests_per_second": 0,
                },
                "state": {"path": str(tmp_path / "state.db")},
                "admin": {"listen": f"127.0.0.1:{port}"},
                "tasks": [{"task_id": tid(1)}],
            }
        ),
        encoding="utf-8",
    )
    offset = tmp_path / "faketime"
    offset.write_text("+0\n", encoding="utf-8")
    run = await enkwatch(
        "run",
        "--config",
        str(cfg),
        LD_PRELOAD=lib,
        FAKETIME_TIMESTAMP_FILE=str(offset),
        FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )
    await run.wait_for(lambda e: e["event"] == "task.transition", "the first transition")
    await until(lambda: sim.count(task_id=tid(1)) >= 3, "three polls before the step")

    offset.write_text(f"{step}\n", encoding="utf-8")
    stepped_at = asyncio.get_running_loop().time()
    before = sim.count(task_id=tid(1))
    # without the guard, a step back left every job asleep for the length of the step
    await until(lambda: sim.count(task_id=tid(1)) >= before + 10, "polls after the step")
    assert await healthz(port) == 200

    async def step_counted() -> bool:
        return await steps_counted(port) >= 1

    await until(step_counted, "the clock step counted in the metrics", every=0.05)

    # no burst either way: one task polled every 0.2 s makes ~5 requests in any second
    after = [t for t in sim.of(task_id=tid(1)) if t >= stepped_at]
    assert max_in_window(after) <= 8, after
    # the events keep the daemon's (stepped) wall time; the transition is not repeated
    run.send(signal.SIGTERM)
    assert await run.wait_exit() == 0
    assert len(run.transitions(tid(1))) == 1


async def start_stepped(
    tmp_path: Path,
    enkwatch: Spawn,
    url: str,
    task: dict[str, Any],
    *args: str,
) -> tuple[Run, Path]:
    """`enkwatch run` under libfaketime (wall clock only, offset read from the returned file)."""
    lib = libfaketime()
    if lib is None:
        pytest.skip(HOW_TO_ENABLE)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": url, "timeout_seconds": 2},
                "polling": {"interval_seconds": INTERVAL_S, "jitter": 0},
                "state": {"path": str(tmp_path / "state.db")},
                "tasks": [task],
            }
        ),
        encoding="utf-8",
    )
    offset = tmp_path / "faketime"
    offset.write_text("+0\n", encoding="utf-8")
    run = await enkwatch(
        "run", "--config", str(cfg), *args,
        LD_PRELOAD=lib, FAKETIME_TIMESTAMP_FILE=str(offset), FAKETIME_NO_CACHE="1",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
    )  # fmt: skip
    return run, offset


async def test_a_step_forward_does_not_end_a_deadline(
    tmp_path: Path,
    simulate: StartSim,
    enkwatch: Spawn,
) -> None:
    sim = await simulate(sim_task(1, "Forever", timeline("Running")))
    run, offset = await start_stepped(
        tmp_path, enkwatch, sim.url, {"task_id": tid(1), "deadline_seconds": 3600}
    )
    await run.wait_for(lambda e: e["event"] == "task.transition", "the first transition")
    offset.write_text("+7200\n", encoding="utf-8")  # two hours later on the wall, at once
    before = sim.count(task_id=tid(1))
    await until(lambda: sim.count(task_id=tid(1)) >= before + 10, "polls after the step")
    # before: every poll after the step found its 1 h deadline two hours past, and gave up
    assert run.named("task.gave_up") == []
    run.send(signal.SIGTERM)
    assert await run.wait_exit() == 0
    assert run.named("task.gave_up") == []


async def test_a_step_back_does_not_extend_a_deadline(
    tmp_path: Path,
    simulate: StartSim,
    enkwatch: Spawn,
) -> None:
    deadline_s = 3.0
    sim = await simulate(sim_task(1, "Forever", timeline("Running")))
    run, offset = await start_stepped(
        tmp_path, enkwatch, sim.url, {"task_id": tid(1), "deadline_seconds": deadline_s},
        "--exit-when-done",
    )  # fmt: skip
    first = await run.wait_for(lambda e: e["event"] == "task.transition", "the transition")
    seen_at = time.monotonic() - first["watched_seconds"]
    offset.write_text("-7200\n", encoding="utf-8")
    # before: the deadline moved two hours later with the wall clock
    gave_up = await run.wait_for(
        lambda e: e["event"] == "task.gave_up", "the deadline", within=deadline_s + 10
    )
    assert gave_up["reason"] == "deadline_exceeded"
    assert deadline_s - 0.1 <= gave_up["watched_seconds"] <= deadline_s + 2.0
    assert time.monotonic() - seen_at < deadline_s + 10
    assert await run.wait_exit() == 3
