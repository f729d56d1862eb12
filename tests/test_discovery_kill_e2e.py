"""Discovery through SIGKILL (issue 10, item 6): the daemon killed in the middle of a sweep
(a list page in flight), then again while the jobs it found are watched; each restart on
the same state goes on: every job is announced by `task.discovered` once, and its
transitions are written once each, in order, across the runs.
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.kit import Spawn, timeline, until
from tests.test_discovery_e2e import LIST, Serve, config, rt, serve  # noqa: F401
from tests.test_e2e import is_transition, merge_runs

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

NIGHTLY = ("redteam:rt-task-0001", "redteam:rt-task-0002")


async def test_sigkill_in_a_sweep_and_while_watching(
    tmp_path: Path,
    serve: Serve,  # noqa: F811
    enkwatch: Spawn,
) -> None:
    jobs = [
        rt(1, "nightly-1", timeline("Running", 9, "Finished")),
        rt(2, "nightly-2", timeline("Queued", 8, "Running", 3, "Finished")),
    ]
    jobs += [rt(100 + n, f"filler-{n}", timeline("Running")) for n in range(150)]
    # Queued (1 page) and Running page 1 answer; Running page 2 hangs until the kill
    url, stats = await serve(
        tasks=jobs,
        list_faults={"redteam": [{"kind": "ok", "requests": 2},
                                 {"kind": "slow", "seconds": 60, "requests": 1}]},
    )  # fmt: skip
    cfg = config(tmp_path / "c.yaml", url, str(tmp_path / "state.db"))

    first = await enkwatch("run", "--config", cfg)
    await until(lambda: stats.by_endpoint.get(LIST, 0) >= 3 and stats.in_flight >= 1, "page 2")
    first.kill()
    assert await first.wait_exit() == -signal.SIGKILL
    assert first.named("task.discovered") == []  # a sweep adds once it has read every page

    second = await enkwatch("run", "--config", cfg)
    await second.wait_for(is_transition(NIGHTLY[0], "Running"), "nightly-1 Running")
    await second.wait_for(is_transition(NIGHTLY[1], "Queued"), "nightly-2 Queued")
    lists = stats.by_endpoint.get(LIST, 0)
    await until(lambda: stats.by_endpoint.get(LIST, 0) > lists, "the next sweep's first page")
    second.kill()  # sweeps every 0.2 s: in the middle of one (of its pages, or between two)
    assert await second.wait_exit() == -signal.SIGKILL

    third = await enkwatch("run", "--exit-when-done", "--config", cfg)
    assert await third.wait_exit() == 0
    runs = (first, second, third)
    found = [e["task_key"] for run in runs for e in run.named("task.discovered")]
    assert sorted(set(found)) == list(NIGHTLY)
    expected_statuses = (["Running", "Finished"], ["Queued", "Running", "Finished"])
    for key, expected in zip(NIGHTLY, expected_statuses, strict=True):
        events = merge_runs(*runs, key=key)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[0]["event"] == "task.discovered"
        assert [e["status"] for e in events[1:]] == expected
        polls = [e["polls"] for e in events[1:]]
        assert polls == sorted(polls)
