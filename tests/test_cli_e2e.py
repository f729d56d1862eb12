"""The command line as a user meets it: the installed command as a subprocess.

Help with defaults, usage mistakes called usage, `watch`/`status` task flags paired as in the
config file, `check-config` refusing what `run` would refuse, and the console format on a
real pseudo-terminal (colour, NO_COLOR, the end-of-run table).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from enkwatch.cli import build_parser, pair_tasks
from tests.kit import Spawn, StartSim, finish, on_a_terminal, outputs, sim_task, write_yaml

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")
COMMANDS = (
    "run",
    "watch",
    "status",
    "check-config",
    "simulate",
    "demo",
    "migrate-state",
    "healthcheck",
)


def finishing_task(name: str) -> dict[str, Any]:
    return sim_task(name, ("Queued", 0.2), ("Running", 0.2), ("Finished", None))


# -- pairing of --task-id and --dataset ---------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "tasks"),
    [
        ([("task_id", "A"), ("dataset", "X")], [{"task_id": "A", "dataset": "X"}]),
        ([("dataset", "X"), ("task_id", "A")], [{"task_id": "A", "dataset": "X"}]),
        ([("task_id", "A"), ("task_id", "B")], [{"task_id": "A"}, {"task_id": "B"}]),
        ([("dataset", "X"), ("dataset", "Y")], [{"dataset": "X"}, {"dataset": "Y"}]),
        (
            [("task_id", "A"), ("dataset", "X"), ("dataset", "Y")],
            [{"task_id": "A", "dataset": "X"}, {"dataset": "Y"}],
        ),
        (
            [("task_id", "A"), ("dataset", "X"), ("task_id", "B"), ("dataset", "Y")],
            [{"task_id": "A", "dataset": "X"}, {"task_id": "B", "dataset": "Y"}],
        ),
        (
            [("task_id", "A"), ("task_id", "B"), ("dataset", "Y")],
            [{"task_id": "A"}, {"task_id": "B", "dataset": "Y"}],
        ),
    ],
)
def test_task_flags_pair_as_in_the_config_file(
    flags: Sequence[tuple[str, str]], tasks: list[dict[str, str]]
) -> None:
    assert pair_tasks(flags) == tasks


async def test_watch_with_a_task_id_and_its_dataset_watches_one_task(
    simulate: StartSim, enkwatch: Spawn
) -> None:
    url = (await simulate(finishing_task("a"))).url
    run = await finish(
        enkwatch,
        "watch",
        "--task-id",
        "a",
        "--dataset",
        "ds-a",
        "--interval",
        "0.05",
        ENKWATCH_API__BASE_URL=url,
    )
    assert run.rc == 0, run.stderr
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert events[0]["event"] == "daemon.started" and events[0]["tasks"] == 1
    keys = {e["task_key"] for e in events if e["event"] == "task.transition"}
    assert keys == {"a"}
    # status takes the same flags the same way, in either order
    for flags in (
        ["--task-id", "a", "--dataset", "ds-a"],
        ["--dataset", "ds-a", "--task-id", "a"],
    ):
        code, out, err = await outputs(enkwatch, "status", *flags, ENKWATCH_API__BASE_URL=url)
        assert code == 0, err
        assert json.loads(out)["task_id"] == "a"
    code, out, err = await outputs(
        enkwatch, "status", "--task-id", "a", "--task-id", "b", ENKWATCH_API__BASE_URL=url
    )
    assert (code, out) == (2, "")
    assert err.startswith("usage: enkwatch status")
    assert "status asks for one task; these flags name 2" in err


# -- usage mistakes are usage, config mistakes are configuration --------------------------------


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["watch", "--task-id", "a", "--interval", "0"], "--interval: must be greater than 0"),
        (["watch", "--task-id", "a", "--deadline", "-1"], "--deadline (the task): must be greater"),
        (["watch", "--interval", "1"], "name a task: --task-id ID and/or --dataset NAME"),
        (["watch", "--task-id", "a\rb"], "--task-id (the task): contains control characters"),
        (
            ["watch", "--task-id", "a", "--dataset", "b", "--dataset", "c\nd"],
            "--dataset (task 2 of 2): contains control characters",
        ),
        (["watch", "--interval", "soon"], "argument --interval: invalid float value"),
        (["run"], "no config file: pass --config PATH or set $ENKWATCH_CONFIG"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
        (["migrate-state", "--from", "nope.db", "--to", "postgresql://h/db"], "--from: nope.db"),
    ],
)
async def test_a_usage_mistake_says_usage(args: list[str], names: str, enkwatch: Spawn) -> None:
    code, out, err = await outputs(enkwatch, *args)
    assert (code, out) == (2, ""), err
    assert err.startswith("usage: enkwatch"), err
    assert names in err, err
    assert "invalid configuration" not in err


async def test_a_bad_environment_setting_is_configuration_not_usage(enkwatch: Spawn) -> None:
    code, _, err = await outputs(
        enkwatch,
        "watch",
        "--task-id",
        "a",
        ENKWATCH_POLLING__INTERVL="5",
        ENKWATCH_API__BASE_URL=None,
    )
    assert code == 2
    assert "invalid configuration" in err and "usage:" not in err
    assert "did you mean ENKWATCH_POLLING__INTERVAL_SECONDS?" in err


# -- check-config refuses what run refuses ------------------------------------------------------


async def test_check_config_reports_what_run_would_refuse_all_at_once(
    tmp_path: Path, enkwatch: Spawn
) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", state={"path": str(tmp_path / "no-dir" / "s.db")})
    for command in (["check-config", "--config", cfg], ["run", "--config", cfg]):
        code, out, err = await outputs(enkwatch, *command, ENKRYPTAI_API_KEY=None)
        assert (code, out) == (2, ""), (command, err)
        assert "no API key: set $ENKRYPTAI_API_KEY" in err
        assert f"state.path: {tmp_path / 'no-dir' / 's.db'}: the directory" in err
        assert "does not exist" in err
        assert "tasks: the watch list is empty and nothing can add to it" in err
    assert not (tmp_path / "no-dir").exists()
    # --file-only: the file alone (a lint away from where it runs)
    code, _, err = await outputs(
        enkwatch, "check-config", "--file-only", "--config", cfg, ENKRYPTAI_API_KEY=None
    )
    assert code == 0, err


async def test_check_config_checks_the_key_file_and_the_state_file(
    tmp_path: Path, enkwatch: Spawn
) -> None:
    (tmp_path / "a-dir.db").mkdir()
    (tmp_path / "not-sqlite.db").write_text("hello")
    for state, words in (
        ("a-dir.db", "is not a regular file"),
        ("not-sqlite.db", "is not a SQLite database"),
    ):
        cfg = write_yaml(
            tmp_path / "c.yaml",
            api={"api_key_file": str(tmp_path / "missing-key")},
            state={"path": str(tmp_path / state)},
            tasks=[{"task_id": "a"}],
        )
        code, _, err = await outputs(enkwatch, "check-config", "--config", cfg)
        assert code == 2
        assert "api.api_key_file: cannot read" in err
        assert words in err, err


async def test_check_config_creates_no_state_file(tmp_path: Path, enkwatch: Spawn) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", tasks=[{"task_id": "a"}])
    code, out, err = await outputs(enkwatch, "check-config", "--config", cfg)  # in tmp_path
    assert code == 0, err
    assert json.loads(out)["state"]["path"] == "enkwatch-state.db"
    assert sorted(os.listdir(tmp_path)) == ["c.yaml"]


async def test_an_empty_watch_list_is_fine_when_tasks_can_be_added(
    tmp_path: Path, enkwatch: Spawn
) -> None:
    cfg = write_yaml(tmp_path / "c.yaml", admin={"listen": "127.0.0.1:0"}, tasks=[])
    code, _, err = await outputs(enkwatch, "check-config", "--config", cfg)  # in tmp_path
    assert code == 0, err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
async def test_an_unwritable_state_directory(tmp_path: Path, enkwatch: Spawn) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cfg = write_yaml(
            tmp_path / "c.yaml", state={"path": str(locked / "s.db")}, tasks=[{"task_id": "a"}]
        )
        code, _, err = await outputs(enkwatch, "check-config", "--config", cfg)
        assert code == 2
        assert "is not writable" in err
    finally:
        locked.chmod(0o700)


# -- help shows defaults ------------------------------------------------------------------------


# options whose value the user must give (there is no default to show)
NO_DEFAULT = {"--task-id", "--dataset", "--from", "--to", "--help", "--version"}


def value_options(command: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    target = sub.choices[command]  # type: ignore[attr-defined]
    return [
        a.option_strings[-1]
        for a in target._actions
        if a.option_strings and a.nargs != 0 and a.option_strings[-1] not in NO_DEFAULT
    ]


def help_blocks(text: str) -> dict[str, str]:
    """Each option of a --help text -> its help, on one line."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current is not None and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    # a short option first ("-h, --help"): name the block by its long option too
    for block in list(blocks.values()):
        for word in block.split():
            if word.startswith("--"):
                blocks.setdefault(word.rstrip(","), block)
    return blocks


@pytest.mark.parametrize("command", COMMANDS)
async def test_help_shows_every_default(command: str, enkwatch: Spawn) -> None:
    code, out, _ = await outputs(enkwatch, command, "--help", COLUMNS="300")
    assert code == 0
    blocks = help_blocks(out)
    for option in value_options(command):
        line = blocks[option]
        assert "default" in line, (command, line)
        assert "None" not in line, line


async def test_help_of_watch_tells_the_pairing_rule(enkwatch: Spawn) -> None:
    _, out, _ = await outputs(enkwatch, "watch", "--help", COLUMNS="300")
    assert "next to each other" in out


# -- the console format on a terminal -----------------------------------------------------------


async def test_a_terminal_gets_the_console_format_in_colour_and_a_summary(
    simulate: StartSim, enkwatch: Spawn
) -> None:
    url = (await simulate(finishing_task("a"), finishing_task("b"))).url
    args = ("watch", "--task-id", "a", "--task-id", "b", "--interval", "0.05")
    run = await on_a_terminal(enkwatch, *args, ENKWATCH_API__BASE_URL=url)
    code, screen = run.rc, run.stdout
    assert code == 0, screen
    assert "\x1b[" in screen  # colour
    plain = ANSI.sub("", screen)
    assert "{" not in plain  # no JSON
    for repr_ in ("None", "False", "True", "{'"):
        assert repr_ not in plain
    lines = plain.splitlines()
    assert any(
        re.match(r"\d\d:\d\d:\d\d  START     enkwatch .*, watching 2 tasks", ln) for ln in lines
    )
    for key in ("a", "b"):
        assert any(
            re.search(rf"  FINISHED  ds-{key}  {key}  \w+ -> Finished  \d+ polls, ", ln)
            for ln in lines
        ), plain
    assert not any("event_id" in ln for ln in lines)
    # the end-of-run table: every task, its final status
    assert "final status" in plain
    rows = [ln for ln in lines if "│" in ln and "Finished" in ln]
    assert len(rows) == 2, plain

    run = await on_a_terminal(enkwatch, *args, ENKWATCH_API__BASE_URL=url, NO_COLOR="1")
    code, screen = run.rc, run.stdout
    assert code == 0
    assert "\x1b[" not in screen
    assert "FINISHED  ds-a  a" in screen and "final status" in screen

    run = await on_a_terminal(
        enkwatch, *args, "--log-level", "debug", ENKWATCH_API__BASE_URL=url, NO_COLOR="1"
    )
    assert run.rc == 0
    assert "event_id=a:" in run.stdout

    run = await on_a_terminal(enkwatch, *args, "--log-format", "json", ENKWATCH_API__BASE_URL=url)
    assert run.rc == 0
    events = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert events[-1]["event"] == "daemon.stopped"  # JSON lines only, no table


async def test_a_pipe_gets_json_and_no_table(simulate: StartSim, enkwatch: Spawn) -> None:
    url = (await simulate(finishing_task("a"))).url
    run = await finish(
        enkwatch, "watch", "--task-id", "a", "--interval", "0.05", ENKWATCH_API__BASE_URL=url
    )
    assert (run.rc, run.stderr) == (0, "")
    for line in run.stdout.splitlines():
        assert isinstance(json.loads(line), dict)


async def test_the_console_format_on_a_pipe_has_the_table_without_colour(
    simulate: StartSim, enkwatch: Spawn
) -> None:
    url = (await simulate(finishing_task("a"))).url
    code, out, _ = await outputs(
        enkwatch,
        "--log-format",
        "console",
        "watch",
        "--task-id",
        "a",
        "--interval",
        "0.05",
        ENKWATCH_API__BASE_URL=url,
    )
    assert code == 0
    assert "\x1b[" not in out
    assert "final status" in out
    with contextlib.suppress(ValueError):
        json.loads(out.splitlines()[0])
        raise AssertionError("a JSON line in the console format")
