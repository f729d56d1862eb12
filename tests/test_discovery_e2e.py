"""Discovery end to end (issue 10, items 2 and 6): the real command against the simulator.

Red-team tests matching a glob are found through the list pages, announced once by
`task.discovered`, watched to their end, and not found again after a restart; a 429 in
the middle of a sweep is retried, never fatal.
"""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from enkwatch.simulator import STATS, Scenario, SimulatorStats, build_app
from tests.kit import Spawn, free_port, timeline, until
from tests.test_e2e import is_transition

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

LIST = "/redteam/list-tasks"


def rt(n: int, name: str, phases: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "redteam",
        "task_id": f"rt-task-{n:04d}",
        "test_name": name,
        "timeline": phases,
        "starts": "at_start",
        "project_name": "safety",
    }


Serve = Callable[..., Awaitable[tuple[str, SimulatorStats]]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def start(**scenario: Any) -> tuple[str, SimulatorStats]:
        app = build_app(Scenario.model_validate(scenario))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}", app[STATS]

    yield start
    for runner in runners:
        await runner.cleanup()


async def discovery_counts(port: int) -> dict[str, float]:
    """The discovery counters of /metrics for kind redteam, by what they count."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition('_total{kind="redteam"} ')
        if name.startswith("enkwatch_discovery_") and value:
            out[name.removeprefix("enkwatch_discovery_")] = float(value)
    return out


def config(path: Path, url: str, state: str, admin_port: int | None = None, **discover: Any) -> str:
    doc: dict[str, Any] = {
        "api": {"base_url": url, "timeout_seconds": 2},
        "polling": {"interval_seconds": 0.05, "jitter": 0, "max_requests_per_second": 0,
                    "max_backoff_seconds": 0.5},
        "state": {"path": state},
        "discover": [
            {"kind": "redteam", "statuses": ["Queued", "Running"], "every_seconds": 0.2,
             "match": {"test_name": "nightly-*"}, "labels": {"found": "yes"}} | discover
        ],
    }  # fmt: skip
    if admin_port is not None:
        doc["admin"] = {"listen": f"127.0.0.1:{admin_port}"}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return str(path)


async def test_discovered_once_watched_to_the_end_and_not_again(
    tmp_path: Path,
    serve: Serve,
    enkwatch: Spawn,
) -> None:
    jobs = [
        # they outlast the Retry-After pause of the 429 (1 s)
        rt(1, "nightly-1", timeline("Running", 2.5, "Finished")),
        rt(2, "nightly-2", timeline("Queued", 2, "Running", 1, "Failed")),
        rt(3, "weekly-1", timeline("Running")),
        rt(4, "nightly-0", timeline("Finished")),  # ended before: never discovered
    ]
    # many filler jobs: several pages of 100, and a 429 on the second list request
    jobs += [rt(100 + n, f"filler-{n}", timeline("Running")) for n in range(230)]
    url, stats = await serve(
        tasks=jobs,
        list_faults={"redteam": [{"kind": "ok", "requests": 1},
                                 {"kind": "http_429", "requests": 1, "retry_after": 1}]},
    )  # fmt: skip
    state = str(tmp_path / "state.db")
    port = free_port()
    cfg = config(tmp_path / "c.yaml", url, state, port)
    first = await enkwatch("run", "--config", cfg)
    await first.wait_for(is_transition("redteam:rt-task-0001", "Finished"), "nightly-1 Finished")
    await first.wait_for(is_transition("redteam:rt-task-0002", "Failed"), "nightly-2 Failed")
    found = first.named("task.discovered")
    assert sorted(e["task_key"] for e in found) == ["redteam:rt-task-0001", "redteam:rt-task-0002"]
    for event in found:
        assert (event["kind"], event["source"], event["seq"]) == ("redteam", "discovered", 1)
        assert event["labels"] == {"found": "yes"}
        assert event["test_name"].startswith("nightly-")
    failed = first.named("discovery.failed")
    assert failed and failed[0]["http_status"] == 429
    assert failed[0]["retry_in_seconds"] >= 1
    counts = await discovery_counts(port)
    assert counts["failed_sweeps"] >= 1 and counts["sweeps"] >= 1
    assert counts["pages"] >= 6  # 3 pages of Running (230 fillers), 1 of Queued, the 429's
    assert counts["jobs_added"] == 2 and counts["jobs_found"] >= 2
    first.send(signal.SIGTERM)
    assert await first.wait_exit() == 0

    # a restart on the same state: the ended jobs are not discovered (nor polled) again
    lists = stats.by_endpoint.get(LIST, 0)
    second = await enkwatch("run", "--config", cfg)
    await until(lambda: stats.by_endpoint.get(LIST, 0) >= lists + 12, "two more sweeps")
    second.send(signal.SIGTERM)
    assert await second.wait_exit() == 0
    assert second.named("task.discovered") == []
    assert second.named("task.transition") == []
    assert stats.by_endpoint.get("/redteam/get-task", 0) == sum(
        stats.by_task.get(f"rt-task-{n:04d}", 0) for n in (1, 2)
    )


async def test_exit_when_done_waits_for_the_first_sweep(
    tmp_path: Path,
    serve: Serve,
    enkwatch: Spawn,
) -> None:
    # only `discover:` and a first sweep that fails twice: the empty watch list before it is
    # not "all done"; the daemon exits once the job that sweep finds has ended
    url, _ = await serve(
        tasks=[rt(1, "nightly-1", timeline("Running", 4, "Finished"))],
        list_faults={"redteam": [{"kind": "http_500", "requests": 2}]},
    )
    cfg = config(tmp_path / "c.yaml", url, str(tmp_path / "state.db"))
    proc = await enkwatch("run", "--exit-when-done", "--config", cfg)
    assert await proc.wait_exit() == 0
    assert len(proc.named("discovery.failed")) == 2
    assert [e["task_key"] for e in proc.named("task.discovered")] == ["redteam:rt-task-0001"]
    (done,) = proc.named("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (1, 0, 0)


async def test_exit_when_done_with_nothing_to_discover(
    tmp_path: Path,
    serve: Serve,
    enkwatch: Spawn,
) -> None:
    url, stats = await serve(tasks=[rt(1, "weekly-1", timeline("Running"))])
    cfg = config(tmp_path / "c.yaml", url, str(tmp_path / "state.db"))
    proc = await enkwatch("run", "--exit-when-done", "--config", cfg)
    assert await proc.wait_exit() == 0
    assert stats.by_endpoint.get(LIST, 0) >= 2  # both statuses read before "all done"
    assert proc.named("daemon.all_done")[0]["finished"] == 0
