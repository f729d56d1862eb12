"""A watched job that moves from Running to Finished between two pages of one sweep (issue
10, item 6): the real command against the simulator, whose clock the test moves forward
just before a sweep's second page of the Running list is served.

One job sits on page 1 (that page names it Running, then it has left the list), the other
on page 2 (the sweep never names it). The list shrinks while it is read, so every job
behind them moves up a page (page 1 is read again). Each job's transitions are written
exactly once, in order, nothing lost or duplicated, and `polls` counts the list
observations too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from enkwatch.clock import FakeClock
from enkwatch.simulator import STATS, Scenario, SimulatorStats, build_app
from tests.kit import Spawn, timeline, until
from tests.test_e2e import is_transition

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

LIST = "/redteam/list-tasks"
FIRST, LAST = "redteam:rt-task-0001", "redteam:rt-task-0002"
RUNNING_S = 1000.0  # the watched jobs run this long on the simulator's (fake) clock
FILLERS = 150  # Running jobs that never end: two pages of 100


def job(n: int, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "redteam",
        "task_id": f"rt-task-{n:04d}",
        "test_name": name,
        "timeline": timeline("Running", RUNNING_S, "Finished"),
        "starts": "at_start",
        **extra,
    }


class Mover:
    """Moves the simulator's clock past the watched jobs' Running phase just before the
    next page 2 of the Running list is served, once armed."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.armed = False
        self.moved = False
        self.pages: list[tuple[str, str]] = []  # (status, page) of every list request

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == LIST:
            status, page = request.query.get("status", ""), request.query.get("page", "1")
            self.pages.append((status, page))
            if self.armed and status == "Running" and page == "2":
                self.armed, self.moved = False, True
                self.clock.advance(RUNNING_S + 1)
        response: Awaitable[web.StreamResponse] = handler(request)
        return await response


@pytest.fixture
async def sim() -> AsyncIterator[tuple[str, SimulatorStats, Mover]]:
    clock = FakeClock()
    fillers = [job(100 + n, f"filler-{n}", timeline=timeline("Running")) for n in range(FILLERS)]
    scenario = Scenario.model_validate(
        {
            "tasks": [
                job(1, "nightly-first"),  # the first of the list (ordered by created_at, id)
                job(2, "nightly-last", created_at="2030-01-01T00:00:00Z"),  # the last
                *fillers,
            ]
        }
    )
    app = build_app(scenario, clock)
    mover = Mover(clock)
    app.middlewares.append(mover.middleware)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[STATS], mover
    finally:
        await runner.cleanup()


async def test_a_job_ends_between_two_pages_of_a_sweep(
    tmp_path: Path, sim: tuple[str, SimulatorStats, Mover], enkwatch: Spawn
) -> None:
    url, stats, mover = sim
    doc = {
        "api": {"base_url": url, "timeout_seconds": 2},
        "polling": {"interval_seconds": 0.5, "jitter": 0, "max_requests_per_second": 0},
        "state": {"path": str(tmp_path / "s.db")},
        "discover": [{"kind": "redteam", "statuses": ["Running"], "every_seconds": 0.2,
                      "match": {"test_name": "nightly-*"}}],
    }  # fmt: skip
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(doc), encoding="utf-8")
    proc = await enkwatch("run", "--exit-when-done", "--config", str(cfg))
    for key in (FIRST, LAST):
        await proc.wait_for(is_transition(key, "Running"), f"{key} Running")
    # a few sweeps in which the lists stand for the jobs' own polls
    pages = len(mover.pages)
    await until(lambda: len(mover.pages) >= pages + 6, "three more sweeps")
    mover.armed = True
    assert await proc.wait_exit() == 0
    assert mover.moved
    # the sweep read page 1 again: page 2's total_count said the list had shrunk
    at = mover.pages.index(("Running", "2"), pages)
    assert mover.pages[at + 1] == ("Running", "1"), mover.pages[at - 2 : at + 4]

    for key in (FIRST, LAST):
        events = [e for e in proc.events if e.get("task_key") == key]
        assert [e["event"] for e in events] == [
            "task.discovered",
            "task.transition",
            "task.transition",
        ], events
        assert [e["seq"] for e in events] == [1, 2, 3]
        assert [e["status"] for e in events[1:]] == ["Running", "Finished"]
        assert events[2]["previous_status"] == "Running" and events[2]["terminal"] is True
        running, finished = events[1]["polls"], events[2]["polls"]
        assert 1 <= running < finished
        # polls counts observations: more than the job's own requests (lists named it)
        own = stats.by_task[key.removeprefix("redteam:")]
        assert own < finished, (key, own, finished)
    assert proc.named("task.poll_failed") == [] and proc.named("task.unknown_status") == []
    (done,) = proc.named("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (2, 0, 0)
