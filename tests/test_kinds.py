"""The kinds of jobs (issue 10, item 1): config entries, keys, requests and answers."""

from __future__ import annotations

import orjson
import pytest

from enkwatch.client import parse_body
from enkwatch.config import TaskConfig, parse_config, validate_task_entry
from enkwatch.errors import ConfigError, InvalidResponse
from enkwatch.kinds import DATASET, KINDS, REDTEAM, REDTEAM_RUN
from enkwatch.kinds.redteam_run import fold_status


def test_keys_of_every_kind_and_datasets_unchanged() -> None:
    assert TaskConfig(task_id="t1").key == "t1"
    assert TaskConfig(dataset="D").key == "dataset:D"
    assert TaskConfig(kind="redteam", task_id="t1").key == "redteam:t1"
    assert TaskConfig(kind="redteam", test_name="n", task_id="t1").key == "redteam:t1"
    assert TaskConfig(kind="redteam", test_name="n").key == "redteam:test_name:n"
    assert TaskConfig(kind="redteam_run", run_id="rt-1").key == "redteam_run:rt-1"
    # an entry of today (no kind) is a dataset task, and its spec reads back the same
    old = validate_task_entry({"task_id": "t1", "labels": {"a": "b"}})
    assert (old.kind, old.key) == ("dataset", "t1")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"kind": "redteam"}, "a task of kind redteam needs at least one of task_id, test_name"),
        ({"kind": "redteam_run"}, "a task of kind redteam_run needs run_id"),
        ({"kind": "redteam_run", "run_id": "r", "task_id": "t"}, "task_id does not apply"),
        ({"kind": "redteam", "dataset": "D", "task_id": "t"}, "dataset does not apply"),
        ({"task_id": "t", "run_id": "r"}, "run_id does not apply to kind dataset"),
        (
            {"kind": "nightly", "task_id": "t"},
            "kind: must be 'dataset', 'redteam' or 'redteam_run'",
        ),
        ({"kind": "redteam_run", "run_id": "r\n1"}, "run_id: contains control characters"),
    ],
)
def test_bad_entries_name_what_is_wrong(entry: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"tasks": [entry]}, {})
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_the_same_job_twice_is_refused_per_kind() -> None:
    tasks = [
        {"kind": "redteam", "task_id": "t1"},
        {"task_id": "t1"},  # a dataset task of the same id: another job
        {"kind": "redteam", "task_id": "t1", "test_name": "n"},
        {"kind": "redteam_run", "run_id": "r"},
        {"kind": "redteam_run", "run_id": "r"},
    ]
    with pytest.raises(ConfigError) as err:
        parse_config({"tasks": tasks}, {})
    assert err.value.problems == [
        "tasks[2]: the task redteam:t1 is listed twice (also tasks[0])",
        "tasks[4]: the task redteam_run:r is listed twice (also tasks[3])",
    ]


def test_requests_of_every_kind() -> None:
    assert (DATASET.path("t", "D"), DATASET.headers("t", "D")) == (
        "/datasets/get-task",
        {"X-Enkrypt-Task-ID": "t", "X-Enkrypt-Dataset": "D"},
    )
    assert (REDTEAM.path("t", "n"), REDTEAM.headers(None, "n")) == (
        "/redteam/get-task",
        {"X-Enkrypt-Test-Name": "n"},
    )
    assert REDTEAM_RUN.path("rt-1/../x?y#z %", None) == "/rt/runs/rt-1%2F..%2Fx%3Fy%23z%20%25"
    assert REDTEAM_RUN.headers("rt-1", None) == {}
    assert set(KINDS) == {"dataset", "redteam", "redteam_run"}


@pytest.mark.parametrize(
    ("word", "status"),
    [
        ("completed", "Finished"),
        ("Complete", "Finished"),
        ("FINISHED", "Finished"),
        ("canceled", "Cancelled"),
        ("cancelled", "Cancelled"),
        ("error", "Error"),
        ("running", "Running"),
        ("Queued", "Queued"),
        ("paused", "paused"),
    ],
)
def test_run_statuses_are_folded(word: str, status: str) -> None:
    assert fold_status(word) == status


def test_run_answers() -> None:
    obs = parse_body(REDTEAM_RUN, b'{"run_id": "eval-1", "status": "canceled", "x": [1]}')
    assert (obs.task_id, obs.status, obs.known, obs.terminal) == ("eval-1", "Cancelled", 1, 1)
    assert "Cancelled" in REDTEAM_RUN.failed and "Error" in REDTEAM_RUN.failed
    odd = parse_body(REDTEAM_RUN, b'{"id": "rt-1", "status": "paused"}')
    assert (odd.known, odd.terminal) == (False, False)
    for body in (b'{"status": "running"}', b'{"id": "rt-1"}', b"[]", b'{"id": "r", "status": 3}'):
        with pytest.raises(InvalidResponse):
            parse_body(REDTEAM_RUN, body)


def test_redteam_answers() -> None:
    body = b'{"data": {"task_id": "t", "test_name": "n", "status": "Running", "model_name": "m"}}'
    obs = parse_body(REDTEAM, body)
    assert (obs.task_id, obs.dataset_name, obs.status, obs.created_at) == (
        "t",
        "n",
        "Running",
        None,
    )
    with pytest.raises(InvalidResponse, match="test_name"):
        parse_body(REDTEAM, b'{"data": {"task_id": "t", "status": "Running"}}')


def test_an_answer_about_another_job_is_invalid() -> None:
    run = b'{"id": "rt-2", "status": "running"}'
    assert parse_body(REDTEAM_RUN, run, 200, "rt-2", None).status == "Running"
    with pytest.raises(InvalidResponse, match="not the run asked for"):
        parse_body(REDTEAM_RUN, run, 200, "rt-1", None)
    test = b'{"data": {"task_id": "t2", "test_name": "n2", "status": "Running"}}'
    assert parse_body(REDTEAM, test, 200, "t2", "anything").task_id == "t2"
    with pytest.raises(InvalidResponse, match="not the task asked for"):
        parse_body(REDTEAM, test, 200, "t1", None)
    with pytest.raises(InvalidResponse, match="not the test asked for"):
        parse_body(REDTEAM, test, 200, None, "n1")


def test_odd_statuses_are_cleaned_and_cut() -> None:
    long = "x" * 100 + "\x1b[31m"
    run = parse_body(REDTEAM_RUN, orjson.dumps({"id": "r", "status": long}))
    assert len(run.status) == 64 and run.status.endswith("\u2026") and "\x1b" not in run.status
    body = b'{"data": {"task_id": "t", "test_name": "n", "status": "Paused\\r\\nX"}}'
    assert parse_body(REDTEAM, body).status == "PausedX"
    page = REDTEAM.parse_list({"tasks": [{"task_id": "t", "test_name": "n", "status": long}]}, "")
    assert len(page.items[0].status) == 64
    for bad in (b'{"id": "r", "status": "\\u0007"}',):
        with pytest.raises(InvalidResponse, match="printable"):
            parse_body(REDTEAM_RUN, bad)


def test_task_flags_pair_per_kind() -> None:
    from enkwatch.cli import pair_tasks

    flags = [("redteam_task", "T"), ("test_name", "N"), ("run", "R1"), ("run", "R2"),
             ("task_id", "A"), ("test_name", "M"), ("dataset", "X")]  # fmt: skip
    assert pair_tasks(flags) == [
        {"kind": "redteam", "task_id": "T", "test_name": "N"},
        {"kind": "redteam_run", "run_id": "R1"},
        {"kind": "redteam_run", "run_id": "R2"},
        {"task_id": "A"},  # a --test-name is not a dataset task's field: its own task
        {"kind": "redteam", "test_name": "M"},
        {"dataset": "X"},
    ]
