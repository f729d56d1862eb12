"""Every kind of job end to end: the real command against the simulator (issue 10, item 1).

`redteam` (by task id and by test name) and `redteam_run` (a run id that needs escaping in
the path, a status alias, `cancelled` counted as Failed) through `run` with a state file,
SIGKILL and restart, `watch` and `status`.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.kit import Spawn, StartSim, finish, timeline, write_config
from tests.test_e2e import is_transition, merge_runs, seqs, statuses

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

RT_ID = "redteam-task-0001"
RUN_ID = "rt-5f1c 9/a?b#c"  # a space, a slash, a query and a fragment: all escaped


def rt_task(task_id: str, test_name: str, phases: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "redteam", "task_id": task_id, "test_name": test_name, "timeline": phases}


def run_job(run_id: str, phases: list[dict[str, Any]], id_field: str = "id") -> dict[str, Any]:
    return {"kind": "redteam_run", "run_id": run_id, "timeline": phases, "id_field": id_field}


async def test_every_kind_through_run_with_a_restart(
    tmp_path: Path,
    simulate: StartSim,
    enkwatch: Spawn,
) -> None:
    sim = await simulate(
        rt_task(RT_ID, "nightly-1", timeline("Queued", 0.3, "Running", 1.2, "Finished")),
        rt_task("redteam-task-0002", "nightly-2", timeline("Running", 0.2, "Failed")),
        run_job(RUN_ID, timeline("queued", 0.2, "running", 0.3, "completed")),
        run_job("eval-2", timeline("Running", 0.2, "cancelled"), id_field="run_id"),
    )
    tasks = [
        {"kind": "redteam", "task_id": RT_ID},
        {"kind": "redteam", "test_name": "nightly-2", "labels": {"team": "red"}},
        {"kind": "redteam_run", "run_id": RUN_ID},
        {"kind": "redteam_run", "run_id": "eval-2"},
    ]
    state = str(tmp_path / "state.db")
    cfg = write_config(tmp_path / "c.yaml", sim, tasks, state=state)
    first = await enkwatch("run", "--config", cfg)
    key = f"redteam:{RT_ID}"
    await first.wait_for(is_transition(key, "Running"), "the red-team task Running")
    first.kill()
    assert await first.wait_exit() == -signal.SIGKILL
    second = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert second.rc == 1, second.stdout  # a Failed test and a cancelled run

    events = merge_runs(first, second, key=key)
    assert seqs(events) == list(range(1, len(events) + 1))
    assert statuses(events) == [(None, "Queued"), ("Queued", "Running"), ("Running", "Finished")]
    assert {(e["kind"], e["task_id"], e["test_name"], e["dataset"]) for e in events} == {
        ("redteam", RT_ID, "nightly-1", None)
    }
    named = merge_runs(first, second, key="redteam:test_name:nightly-2")
    assert statuses(named)[-1] == ("Running", "Failed")
    assert named[-1]["level"] == "warning"
    assert named[-1]["task_id"] == "redteam-task-0002"  # what the API said
    assert named[-1]["labels"] == {"team": "red"}

    run = merge_runs(first, second, key=f"redteam_run:{RUN_ID}")
    assert [e["status"] for e in run][-1] == "Finished"  # `completed` folded
    assert {e["status"] for e in run} <= {"Queued", "Running", "Finished"}
    assert {(e["kind"], e["run_id"], e["task_id"]) for e in run} == {
        ("redteam_run", RUN_ID, RUN_ID)
    }
    cancelled = merge_runs(first, second, key="redteam_run:eval-2")
    assert cancelled[-1]["status"] == "Cancelled"
    assert cancelled[-1]["terminal"] is True
    assert cancelled[-1]["level"] == "warning"
    done = second.one("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (2, 2, 0)
    assert sim.stats.by_endpoint.get("/datasets/get-task", 0) == 0


async def test_watch_and_status_of_every_kind(
    tmp_path: Path,
    simulate: StartSim,
    enkwatch: Spawn,
) -> None:
    sim = await simulate(
        rt_task(RT_ID, "nightly-1", timeline("Queued", 0.2, "Finished")),
        run_job(RUN_ID, timeline("Running", 0.2, "error")),
    )
    env = {"ENKWATCH_API__BASE_URL": sim.url}
    watched = await finish(
        enkwatch, "watch", "--redteam-task", RT_ID, "--run", RUN_ID, "--interval", "0.05", **env
    )
    assert watched.rc == 1, watched.stdout + watched.stderr  # `error` counts as Failed
    assert statuses(watched.transitions(f"redteam:{RT_ID}"))[-1] == ("Queued", "Finished")
    assert watched.transitions(f"redteam_run:{RUN_ID}")[-1]["status"] == "Error"

    by_name = await finish(enkwatch, "status", "--test-name", "nightly-1", json_lines=False, **env)
    assert by_name.rc == 0, by_name.stderr
    assert json.loads(by_name.stdout)["task_id"] == RT_ID
    run = await finish(enkwatch, "status", "--run", RUN_ID, json_lines=False, **env)
    assert run.rc == 0, run.stderr
    assert json.loads(run.stdout)["id"] == RUN_ID
    unknown = await finish(enkwatch, "status", "--run", "rt-unknown", json_lines=False, **env)
    assert unknown.rc == 3
    mixed = await finish(
        enkwatch, "status", "--run", RUN_ID, "--dataset", "X", json_lines=False, **env
    )
    assert mixed.rc == 2
    assert "status asks for one task" in mixed.stderr
