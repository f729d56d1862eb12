"""Status from list pages (issue 10, item 3): the real command against the simulator.

A sweep's list answer is an observation of every watched job it names; the job's next
poll uses it instead of a request, so every rule of a poll holds (in order, exactly once,
`polls` counted). A job that left the lists is confirmed with one get-task of its own.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kit import Spawn, timeline, until
from tests.test_discovery_e2e import Serve, rt, serve  # noqa: F401  (serve: the fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def config(
    path: Path, url: str, state: str, polling: dict[str, Any] | None = None, **doc: Any
) -> str:
    base = {
        "api": {"base_url": url, "timeout_seconds": 2},
        "polling": {"interval_seconds": 0.8, "jitter": 0, "max_requests_per_second": 0}
        | (polling or {}),
        "state": {"path": state},
    }
    path.write_text(yaml.safe_dump(base | doc), encoding="utf-8")
    return str(path)


def statuses(events: list[dict[str, Any]], key: str) -> list[Any]:
    return [e["status"] for e in events if e["task_key"] == key]


async def test_redteam_statuses_come_from_the_list_pages(
    tmp_path: Path,
    serve: Serve,  # noqa: F811
    enkwatch: Spawn,
) -> None:
    jobs = [rt(1, "nightly-1", timeline("Queued", 3, "Running", 3, "Finished"))]
    jobs += [rt(100 + n, f"filler-{n}", timeline("Running")) for n in range(150)]
    url, stats = await serve(tasks=jobs)
    discover = {"kind": "redteam", "statuses": ["Queued", "Running"], "every_seconds": 0.2,
                "match": {"test_name": "nightly-*"}}  # fmt: skip
    cfg = config(tmp_path / "c.yaml", url, str(tmp_path / "s.db"), discover=[discover])
    proc = await enkwatch("run", "--exit-when-done", "--config", cfg)
    assert await proc.wait_exit() == 0
    moves = proc.named("task.transition")
    assert statuses(moves, "redteam:rt-task-0001") == ["Queued", "Running", "Finished"]
    polls = [e["polls"] for e in moves]
    assert polls == sorted(polls) and len(set(polls)) == 3  # counted, in order
    # its one own request: the Finished confirmed once it left the lists; every other poll,
    # the first one too (the list that found it named it Queued), came from a list page
    own = stats.by_task.get("rt-task-0001", 0)
    assert 1 <= own <= 2 < polls[-1], (own, polls)


async def test_a_dataset_in_the_running_list_is_observed_running(
    tmp_path: Path,
    serve: Serve,  # noqa: F811
    enkwatch: Spawn,
) -> None:
    job = {"task_id": "data-generation-1", "dataset": "ds-1", "starts": "at_start",
           "timeline": timeline("Running", 4, "Finished")}  # fmt: skip
    url, stats = await serve(tasks=[job])
    discover = {"kind": "dataset", "statuses": ["Running"], "every_seconds": 0.2}
    cfg = config(
        tmp_path / "c.yaml", url, str(tmp_path / "s.db"),
        tasks=[{"dataset": "ds-1"}], discover=[discover],
    )  # fmt: skip
    proc = await enkwatch("run", "--exit-when-done", "--config", cfg)
    assert await proc.wait_exit() == 0
    moves = proc.named("task.transition")
    assert statuses(moves, "dataset:ds-1") == ["Running", "Finished"]
    assert proc.named("task.discovered") == []  # already watched: not added again
    own = stats.by_task.get("data-generation-1", 0)
    assert 2 <= own <= 3 < moves[-1]["polls"], (own, moves[-1]["polls"])


async def test_a_job_every_sweep_names_costs_no_request_of_its_own(
    tmp_path: Path,
    serve: Serve,  # noqa: F811
    enkwatch: Spawn,
) -> None:
    # swept as often as polled (jitter: some polls come before the next sweep has ended):
    # each poll takes the latest list's observation or, if it took that one already, waits
    # for the next sweep; the job never costs a get-task while the lists name it
    jobs = [rt(1, "nightly-1", timeline("Queued", 1.5, "Running"))]
    jobs += [rt(100 + n, f"filler-{n}", timeline("Running")) for n in range(150)]
    url, stats = await serve(tasks=jobs)
    discover = {"kind": "redteam", "statuses": ["Queued", "Running"], "every_seconds": 0.3,
                "match": {"test_name": "nightly-*"}}  # fmt: skip
    polling = {"interval_seconds": 0.3, "jitter": 0.3}
    cfg = config(tmp_path / "c.yaml", url, str(tmp_path / "s.db"), polling, discover=[discover])
    proc = await enkwatch("run", "--config", cfg)
    await proc.wait_for(lambda e: e.get("status") == "Running", "nightly-1 Running")
    lists = stats.by_endpoint.get("/redteam/list-tasks", 0)
    await until(lambda: stats.by_endpoint.get("/redteam/list-tasks", 0) >= lists + 30, "sweeps")
    proc.send(signal.SIGTERM)
    assert await proc.wait_exit() == 0
    assert statuses(proc.named("task.transition"), "redteam:rt-task-0001") == ["Queued", "Running"]
    assert stats.by_task.get("rt-task-0001", 0) == 0


async def test_a_dataset_found_by_discovery_costs_one_request_while_listed(
    tmp_path: Path,
    serve: Serve,  # noqa: F811
    enkwatch: Spawn,
) -> None:
    # its first poll asks the API (the list gives no task id); from then on the sweep that
    # found it covers it, even before the next sweep names it again (polled twice as often)
    job = {"task_id": "data-generation-1", "dataset": "ds-1", "starts": "at_start",
           "timeline": timeline("Running")}  # fmt: skip
    url, stats = await serve(tasks=[job])
    discover = {"kind": "dataset", "statuses": ["Running"], "every_seconds": 0.6}
    polling = {"interval_seconds": 0.3, "jitter": 0.1}
    cfg = config(tmp_path / "c.yaml", url, str(tmp_path / "s.db"), polling, discover=[discover])
    proc = await enkwatch("run", "--config", cfg)
    await proc.wait_for(lambda e: e.get("status") == "Running", "ds-1 Running")
    lists = stats.by_endpoint.get("/datasets/list-tasks", 0)
    await until(lambda: stats.by_endpoint.get("/datasets/list-tasks", 0) >= lists + 8, "sweeps")
    proc.send(signal.SIGTERM)
    assert await proc.wait_exit() == 0
    assert stats.by_task.get("data-generation-1", 0) == 1
