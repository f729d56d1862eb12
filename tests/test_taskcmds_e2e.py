"""`enkwatch tasks`, `add`, `remove`, `forget`: the installed command against a running
daemon (a subprocess beside the simulator, on 127.0.0.1), then against its state alone."""

from __future__ import annotations

import json
import signal
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.kit import Spawn, StartSim, finish, free_port, outputs, sim_task, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

TOKEN = "admin-token-SECRET-cmds"


async def listed(enkwatch: Spawn, *args: str) -> dict[str, dict[str, Any]]:
    code, out, err = await outputs(enkwatch, "tasks", "--json", *args)
    assert code == 0, err
    return {t["task_key"]: t for t in json.loads(out)["tasks"]}


async def test_the_task_commands_through_a_daemon_then_on_its_state(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(
        sim_task("t1", ("Running", 0.3), ("Finished", None)),
        sim_task("t2", ("Running", None)),
        sim_task("t3", ("Running", 0.2), ("Finished", None)),
    )
    port = free_port()
    cfg = write_config(
        tmp_path / "enkwatch.yaml",
        sim,
        [{"task_id": "t1", "labels": {"team": "safety"}}, {"task_id": "t2"}],
        state=str(tmp_path / "state.db"),
        admin={"listen": f"127.0.0.1:{port}"},
    )

    daemon = await enkwatch("run", "--config", cfg, ENKWATCH_ADMIN_TOKEN=TOKEN)
    await daemon.wait_event("task.transition", task_key="t1", status="Finished")
    tasks = await listed(enkwatch, "--config", cfg)
    assert tasks["t1"]["status"] == "Finished" and tasks["t1"]["status_since"]
    assert tasks["t1"]["labels"] == {"team": "safety"} and tasks["t2"]["status"] == "Running"
    code, out, _ = await outputs(enkwatch, "tasks", "--config", cfg)
    assert code == 0 and "from the daemon at http://127.0.0.1" in out
    assert "Finished" in out and "Running" in out and "{" not in out

    # add: the token from the environment; a task twice is refused
    code, out, err = await outputs(
        enkwatch, "add", "--config", cfg, "--task-id", "t3", "--label", "env=dev",
        ENKWATCH_ADMIN_TOKEN=TOKEN,
    )  # fmt: skip
    assert (code, out.strip()) == (0, "t3: watching"), err
    await daemon.wait_event("task.transition", task_key="t3", status="Finished")
    assert (await daemon.wait_event("task.transition", task_key="t3"))["labels"] == {"env": "dev"}
    code, _, err = await outputs(
        enkwatch, "add", "--config", cfg, "--task-id", "t3", ENKWATCH_ADMIN_TOKEN=TOKEN
    )
    assert code == 1 and "already watched" in err
    code, _, err = await outputs(enkwatch, "add", "--config", cfg, "--task-id", "t4")
    assert code == 2 and "ENKWATCH_ADMIN_TOKEN" in err
    code, _, err = await outputs(
        enkwatch, "add", "--config", cfg, "--task-id", "t4", ENKWATCH_ADMIN_TOKEN="wrong"
    )
    assert code == 2 and "401" not in err and "bearer token" in err

    # forget: a finished task is watched again, as new; its seq goes on
    code, out, err = await outputs(
        enkwatch, "forget", "--config", cfg, "t1", ENKWATCH_ADMIN_TOKEN=TOKEN
    )
    assert (code, out.strip()) == (0, "t1: watching again"), err
    again = await daemon.wait_event("task.transition", task_key="t1", seq=3)
    assert again["previous_status"] is None and again["status"] == "Finished"
    code, _, err = await outputs(
        enkwatch, "forget", "--config", cfg, "t2", ENKWATCH_ADMIN_TOKEN=TOKEN
    )
    assert code == 1 and "has not ended" in err

    # remove
    code, out, err = await outputs(
        enkwatch, "remove", "--config", cfg, "t3", "nope", ENKWATCH_ADMIN_TOKEN=TOKEN
    )
    assert code == 3 and out.strip() == "t3: stopped watching" and "nope" in err
    assert set(await listed(enkwatch, "--url", f"http://127.0.0.1:{port}")) == {"t1", "t2"}
    daemon.send(signal.SIGTERM)
    assert await daemon.wait_exit() == 0

    # no daemon: `tasks` reads the state, `forget` changes it
    code, out, err = await outputs(enkwatch, "tasks", "--json", "--config", cfg)
    assert code == 0 and "reading the state instead" in err
    tasks = {t["task_key"]: t for t in json.loads(out)["tasks"]}
    assert set(tasks) == {"t1", "t2"}  # t3 was removed
    assert tasks["t1"]["status"] == "Finished" and tasks["t1"]["status_since"]
    code, out, err = await outputs(enkwatch, "forget", "--config", cfg, "t1")
    assert code == 0 and "forgotten in the state" in out, err
    state = await listed(enkwatch, "--state", str(tmp_path / "state.db"))
    assert state["t1"]["status"] is None and state["t1"]["polls"] == 0
    code, _, err = await outputs(enkwatch, "forget", "--state", str(tmp_path / "state.db"), "t2")
    assert code == 1 and "has not ended" in err
    code, _, err = await outputs(enkwatch, "tasks", "--url", f"http://127.0.0.1:{port}")
    assert code == 5 and "no daemon answers at http://127.0.0.1" in err
    code, _, err = await outputs(enkwatch, "tasks", "--state", str(tmp_path / "missing.db"))
    assert code == 2 and "no state file there" in err
    assert not (tmp_path / "missing.db").exists()


async def test_forget_on_a_state_that_refuses_the_change(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    """A state another program holds locked (past the 5 s busy timeout): one line, exit 5
    (before: `internal error, please report it` with a traceback)."""
    sim = await simulate(sim_task("t1", ("Finished", None)))
    state = tmp_path / "state.db"
    cfg = write_config(tmp_path / "enkwatch.yaml", sim, [{"task_id": "t1"}], state=str(state))
    assert (await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")).rc == 0
    holder = sqlite3.connect(state, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held
        code, out, err = await outputs(enkwatch, "forget", "--state", str(state), "t1")
    finally:
        holder.close()
    assert code == 5 and out == "", err
    assert "Traceback" not in err and "nothing was changed" in err
    code, out, err = await outputs(enkwatch, "forget", "--state", str(state), "t1")
    assert code == 0 and "forgotten in the state" in out, err


@pytest.mark.parametrize("command", ["tasks", "add", "remove", "forget"])
async def test_help_shows_the_defaults(command: str, enkwatch: Spawn) -> None:
    code, out, _ = await outputs(enkwatch, command, "--help")
    assert code == 0 and "--url" in out and "default" in out


async def test_changes_without_a_daemon_to_ask_are_usage_errors(enkwatch: Spawn) -> None:
    code, _, err = await outputs(enkwatch, "remove", "t1", ENKWATCH_CONFIG=None)
    assert code == 2 and "--url" in err


async def test_demo_ends_with_the_table_in_console_format(enkwatch: Spawn) -> None:
    code, out, _ = await outputs(enkwatch, "demo", "--log-format", "console")
    assert code == 0
    table = out[out.index("the tasks of this run") :]
    for words in ("final status", "Finished", "Failed", "FinanceQA"):
        assert words in table
    run = await finish(enkwatch, "demo", "--log-format", "json")  # events, each checked
    assert run.rc == 0 and all(line.startswith("{") for line in run.stdout.splitlines())
