"""End to end: the real `enkwatch` command as a subprocess against the simulated API.

The simulator runs in the test's event loop (its own aiohttp app, plus a middleware that
records when each request arrived and for which task); the daemon is `python -m enkwatch`
in a child process whose stdout is read line by line (both from
tests/kit.py). Tests wait for events or server-side conditions with a deadline, never for
a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from enkwatch import __version__
from enkwatch.simulator import max_in_window
from tests.kit import (
    Run,
    Spawn,
    StartSim,
    finish,
    free_port,
    sim_task,
    tid,
    timeline,
    until,
    write_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def statuses(events: Iterable[dict[str, Any]]) -> list[tuple[str | None, str]]:
    return [(e["previous_status"], e["status"]) for e in events]


def seqs(events: Iterable[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def task_events(run: Run, key: str) -> list[dict[str, Any]]:
    return [e for e in run.events if e.get("task_key") == key]


def is_transition(key: str, status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (
        e["event"] == "task.transition" and e["task_key"] == key and e["status"] == status
    )


# -- 1. a run to the end -------------------------------------------------------------------


async def test_run_to_finished(tmp_path: Path, simulate: StartSim, enkwatch: Spawn) -> None:
    by_id, by_name = tid(1), tid(2)
    sim = await simulate(
        sim_task(
            1,
            "Election2",
            timeline("Queued", 0.3, "Running", 0.3, "Finished"),
            {"kind": "http_500"},
        ),
        sim_task(
            2,
            "MedicalAdvice",
            timeline("Queued", 0.2, "Running", 0.2, "Finished"),
            {"kind": "http_500"},
        ),
    )
    cfg = write_config(
        tmp_path / "c.yaml",
        sim,
        [
            {"task_id": by_id, "labels": {"team": "safety", "tier": 1}},
            {"dataset": "MedicalAdvice"},
        ],
    )
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 0, run.stderr

    started = run.events[0]
    assert started["event"] == "daemon.started"
    assert (started["level"], started["version"], started["tasks"]) == ("info", __version__, 2)

    for key, task_id, dataset, labels in (
        (by_id, by_id, "Election2", {"team": "safety", "tier": "1"}),
        ("dataset:MedicalAdvice", by_name, "MedicalAdvice", None),
    ):
        events = task_events(run, key)
        assert seqs(events) == list(range(1, len(events) + 1))
        for event in events:
            assert event["event_id"] == f"{key}:{event['seq']}"
            assert event.get("labels") == labels  # copied into every event, absent if unset
        # before the first observation only the configured identity is known
        failed = events[0]
        assert failed["event"] == "task.poll_failed"
        if key == by_id:
            assert (failed["task_id"], failed["dataset"]) == (by_id, None)
        else:
            assert (failed["task_id"], failed["dataset"]) == (None, "MedicalAdvice")
        moves = run.transitions(key)
        assert statuses(moves) == [(None, "Queued"), ("Queued", "Running"), ("Running", "Finished")]
        assert [e["terminal"] for e in moves] == [False, False, True]
        assert {e["level"] for e in moves} == {"info"}
        polls = [e["polls"] for e in moves]
        assert polls == sorted(set(polls))
        assert polls[0] >= 2
        for event in moves:
            # the missing half of the identity comes from the API
            assert (event["task_id"], event["dataset"]) == (task_id, dataset)
            assert isinstance(event["created_at"], str)
            assert event["watched_seconds"] >= 0
        assert moves[0]["started_at"] is None
        assert isinstance(moves[1]["started_at"], str)
        # a terminal task is never polled again: every request is counted in `polls`
        assert (
            sim.count(
                task_id=by_id if key == by_id else None, dataset=None if key == by_id else dataset
            )
            == moves[-1]["polls"]
        )

    tail = [e["event"] for e in run.events[-3:]]
    assert tail == ["daemon.all_done", "daemon.stopping", "daemon.stopped"]
    done = run.one("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (2, 0, 0)
    assert run.one("daemon.stopping")["reason"] == "all_done"
    assert run.one("daemon.stopped")["reason"] == "all_done"


# -- 2. exit codes -------------------------------------------------------------------------


async def test_exit_1_when_a_task_failed(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(
        sim_task(1, "Good", timeline("Queued", 0.1, "Finished")),
        sim_task(2, "Bad", timeline("Queued", 0.1, "Failed")),
    )
    cfg = write_config(tmp_path / "c.yaml", sim, [{"task_id": tid(1)}, {"task_id": tid(2)}])
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 1
    failed = run.transitions(tid(2))[-1]
    assert (failed["status"], failed["level"], failed["terminal"]) == ("Failed", "warning", True)
    assert run.transitions(tid(1))[-1]["level"] == "info"
    done = run.one("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (1, 1, 0)


@pytest.mark.parametrize("case", ["deadline", "not_found", "both_and_failed"])
async def test_exit_3_when_given_up(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn, case: str
) -> None:
    sim = await simulate(
        sim_task(1, "Forever", timeline("Running")),
        sim_task(2, "Bad", timeline("Failed")),
    )
    tasks = {
        "deadline": [{"task_id": tid(1), "deadline_seconds": 0.4}],
        "not_found": [{"task_id": tid(99)}],
        "both_and_failed": [
            {"task_id": tid(1), "deadline_seconds": 0.4},
            {"task_id": tid(99)},
            {"task_id": tid(2)},
        ],
    }[case]
    cfg = write_config(tmp_path / "c.yaml", sim, tasks, polling={"not_found_attempts": 2})
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 3, run.stdout

    if case != "not_found":
        gave_up = run.one("task.gave_up", tid(1))
        assert (gave_up["reason"], gave_up["last_status"]) == ("deadline_exceeded", "Running")
        assert gave_up["level"] == "error"
        assert 0.3 <= gave_up["watched_seconds"] < 3
        assert statuses(run.transitions(tid(1))) == [(None, "Running")]
    if case != "deadline":
        gave_up = run.one("task.gave_up", tid(99))
        assert (gave_up["reason"], gave_up["last_status"]) == ("not_found", None)
        assert gave_up["level"] == "error"
        # two consecutive "not found" answers, then no more requests
        assert sim.count(task_id=tid(99)) == 2
        first = run.one("task.poll_failed", tid(99))
        assert (first["http_status"], first["attempt"]) == (404, 1)
    if case == "both_and_failed":
        assert run.transitions(tid(2))[-1]["status"] == "Failed"
    done = run.one("daemon.all_done")
    expected = {"deadline": (0, 0, 1), "not_found": (0, 0, 1), "both_and_failed": (0, 1, 2)}
    assert (done["finished"], done["failed"], done["gave_up"]) == expected[case]


async def test_exit_4_when_the_key_is_rejected(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(sim_task(1, "Election2", timeline("Running")), api_key="sk-other")
    cfg = write_config(tmp_path / "c.yaml", sim, [{"task_id": tid(1)}])
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 4
    auth = run.one("api.auth_failed")
    assert (auth["level"], auth["http_status"]) == ("critical", 401)
    assert "ENKRYPTAI_API_KEY" in auth["hint"]
    # confirmed by exactly one second request, and nothing after it
    assert sim.count(task_id=tid(1)) == 2
    assert sim.stats.requests == 2
    assert run.named("task.poll_failed") == []
    assert run.one("daemon.stopping")["reason"] == "auth_failed"
    assert run.events[-1]["event"] == "daemon.stopped"


async def test_exit_4_wins_over_all(tmp_path: Path, simulate: StartSim, enkwatch: Spawn) -> None:
    sim = await simulate(
        sim_task(1, "Revoked", timeline("Running"), {"kind": "http_401", "requests": 2}),
        sim_task(2, "Bad", timeline("Failed")),
    )
    tasks = [{"task_id": tid(1)}, {"task_id": tid(2)}, {"task_id": tid(99)}]
    cfg = write_config(tmp_path / "c.yaml", sim, tasks, polling={"not_found_attempts": 1})
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 4
    assert run.transitions(tid(2))[-1]["status"] == "Failed"
    assert run.one("task.gave_up", tid(99))["reason"] == "not_found"
    assert run.one("api.auth_failed")["http_status"] == 401
    assert sim.count(task_id=tid(1)) == 2


async def test_exit_2_bad_usage_polls_nothing(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(sim_task(1, "Election2", timeline("Running", 0.1, "Finished")))
    good = write_config(tmp_path / "good.yaml", sim, [{"task_id": tid(1)}])
    bad = write_config(
        tmp_path / "bad.yaml",
        sim,
        [{"task_id": tid(1)}, {"task_id": tid(1), "deadline_seconds": -1}],
    )
    url = {"ENKWATCH_API__BASE_URL": sim.url}
    # case: (arguments, environment, what stderr must name)
    cases: dict[str, tuple[list[str], dict[str, str | None], list[str]]] = {
        "bad config": (
            ["run", "--config", bad],
            {},
            ["tasks[1]: the task", "tasks[1].deadline_seconds"],
        ),
        "no API key": (
            ["run", "--config", good],
            {"ENKRYPTAI_API_KEY": None},
            ["ENKRYPTAI_API_KEY"],
        ),
        "no config path": (["run"], {}, ["ENKWATCH_CONFIG"]),
        "unreadable": (["run", "--config", str(tmp_path / "missing.yaml")], {}, ["missing.yaml"]),
        "CR/LF in watch --task-id": (
            ["watch", "--task-id", "task\r\nX-Evil: 1"],
            url,
            ["--task-id", "control characters"],
        ),
        "LF in watch --task-id": (["watch", "--task-id", "task\nid"], url, ["--task-id"]),
        "CR in status --task-id": (["status", "--task-id", "task\rid"], url, ["--task-id"]),
        "unknown option": (["run", "--config", good, "--bogus"], {}, ["--bogus"]),
    }
    runs = await asyncio.gather(
        *(
            finish(enkwatch, *args, "--exit-when-done", **env)
            if args[0] == "run"
            else finish(enkwatch, *args, **env)
            for args, env, _ in cases.values()
        )
    )
    for (case, (_, _, names)), run in zip(cases.items(), runs, strict=True):
        assert run.rc == 2, (case, run.stdout, run.stderr)
        assert run.stdout == "", case
        for text in names:
            assert text in run.stderr, (case, run.stderr)
    assert sim.stats.requests == 0


# -- status --------------------------------------------------------------------------------


async def test_status(simulate: StartSim, enkwatch: Spawn) -> None:
    sim = await simulate(
        sim_task(1, "Election2", timeline("Running")),
        sim_task(2, "Broken", timeline("Running"), {"kind": "garbage", "requests": 100}),
        sim_task(3, "Slow", timeline("Running"), {"kind": "slow", "seconds": 1}),
    )
    rejecting = await simulate(sim_task(1, "Election2", timeline("Running")), api_key="sk-x")
    nobody = f"http://127.0.0.1:{free_port()}"

    def status(*args: str, url: str = sim.url, **env: str) -> Awaitable[Run]:
        return finish(
            enkwatch, "status", *args, json_lines=False, ENKWATCH_API__BASE_URL=url, **env
        )

    # independent one-shot runs: side by side
    ok, by_name, unknown, garbage, slow, down, rejected, two = await asyncio.gather(
        status("--task-id", tid(1)),
        status("--dataset", "Election2"),
        status("--task-id", tid(99)),
        status("--task-id", tid(2)),
        status("--task-id", tid(3), ENKWATCH_API__TIMEOUT_SECONDS="0.3"),
        status("--task-id", tid(1), url=nobody),
        status("--task-id", tid(1), url=rejecting.url),
        status("--task-id", tid(1), "--task-id", tid(2)),
    )
    assert ok.rc == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert (data["task_id"], data["dataset_name"]) == (tid(1), "Election2")
    assert data["status"] == "Running"
    assert {"created_at", "started_at", "max_prompts", "tools"} <= set(data)
    assert by_name.rc == 0
    assert json.loads(by_name.stdout)["task_id"] == tid(1)

    assert (unknown.rc, unknown.stdout) == (3, "")
    assert (garbage.rc, garbage.stdout) == (5, "")
    assert "invalid_response" in garbage.stderr
    assert (slow.rc, slow.stdout) == (5, "")
    assert "timeout" in slow.stderr
    assert (down.rc, down.stdout) == (5, "")
    assert "connection" in down.stderr
    assert (rejected.rc, rejected.stdout) == (4, "")
    assert (two.rc, two.stdout) == (2, "")


# -- 3. unknown statuses -------------------------------------------------------------------


async def test_unknown_status_once_per_change(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(
        sim_task(
            1,
            "Election2",
            timeline("Queued", 0.2, "Paused", 0.4, "Suspended", 0.3, "Running", 0.2, "Finished"),
        )
    )
    cfg = write_config(tmp_path / "c.yaml", sim, [{"task_id": tid(1)}])
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 0
    unknown = run.named("task.unknown_status", tid(1))
    assert [e["status"] for e in unknown] == ["Paused", "Suspended"]
    assert {e["level"] for e in unknown} == {"warning"}
    moves = run.transitions(tid(1))
    # not transitions: the next one comes from the last known status
    assert statuses(moves) == [(None, "Queued"), ("Queued", "Running"), ("Running", "Finished")]
    # polling went on through 0.7 s of unknown statuses
    assert moves[1]["polls"] - moves[0]["polls"] >= 6
    events = task_events(run, tid(1))
    assert seqs(events) == list(range(1, len(events) + 1))
    assert [e["event"] for e in events] == [
        "task.transition",
        "task.unknown_status",
        "task.unknown_status",
        "task.transition",
        "task.transition",
    ]


# -- 4. every fault of the simulator -------------------------------------------------------

# kind, fault options, expected (error, http_status) per failed attempt
FAULTS: list[tuple[str, dict[str, Any], list[tuple[str, int | None]]]] = [
    ("http_500", {"requests": 2}, [("http_status", 500)] * 2),
    ("http_503", {"retry_after": 1}, [("http_status", 503)]),
    ("http_429", {"retry_after": 1}, [("rate_limited", 429)]),
    ("slow", {"seconds": 0.8}, [("timeout", None)]),
    ("garbage", {"requests": 2}, [("invalid_response", 200)] * 2),
    ("truncated", {"requests": 2}, [("invalid_response", 200)] * 2),
    ("missing_field", {"requests": 2}, [("invalid_response", 200)] * 2),
    ("error_200", {"requests": 2}, [("invalid_response", 200)] * 2),
    ("http_401", {}, [("http_status", 401)]),  # not confirmed: an ordinary failure
]


async def test_every_fault_is_reported_then_recovered(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(
        *(
            sim_task(
                10 + i, f"Faulty{i}", timeline("Queued", 2.5, "Finished"), {"kind": kind, **opts}
            )
            for i, (kind, opts, _) in enumerate(FAULTS)
        )
    )
    # odd ones by dataset only: the identity half-known before the first observation
    tasks = [
        {"dataset": f"Faulty{i}"} if i % 2 else {"task_id": tid(10 + i)} for i in range(len(FAULTS))
    ]
    cfg = write_config(tmp_path / "c.yaml", sim, tasks, api={"timeout_seconds": 0.3})
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 0, run.stdout

    for i, (kind, opts, expected) in enumerate(FAULTS):
        key = f"dataset:Faulty{i}" if i % 2 else tid(10 + i)
        failures = run.named("task.poll_failed", key)
        assert [(e["error"], e["http_status"]) for e in failures] == expected, kind
        assert [e["attempt"] for e in failures] == list(range(1, len(expected) + 1)), kind
        for event in failures:
            assert event["level"] == "warning"
            if "retry_after" in opts:
                assert event["retry_in_seconds"] >= opts["retry_after"], kind
            elif kind == "http_401":
                assert 0.5 <= event["retry_in_seconds"] <= 1.5  # retried within about a second
            else:
                assert 0 < event["retry_in_seconds"] <= 0.5, kind  # max_backoff_seconds
        moves = run.transitions(key)
        assert statuses(moves) == [(None, "Queued"), ("Queued", "Finished")], kind
        events = task_events(run, key)
        assert seqs(events) == list(range(1, len(events) + 1))
        assert events[0]["event"] == "task.poll_failed"
    assert run.named("api.auth_failed") == []
    assert run.named("task.gave_up") == []


# -- 5. Retry-After holds every task -------------------------------------------------------


async def test_retry_after_pauses_other_tasks(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    # A answers its first request slowly (B keeps polling meanwhile), then a 429
    sim = await simulate(
        sim_task(
            1,
            "Limited",
            timeline("Queued", 1.8, "Finished"),
            {"kind": "slow", "seconds": 0.3},
            {"kind": "http_429", "retry_after": 1},
        ),
        sim_task(2, "Bystander", timeline("Queued", 1.8, "Finished")),
    )
    cfg = write_config(tmp_path / "c.yaml", sim, [{"task_id": tid(1)}, {"task_id": tid(2)}])
    run = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert run.rc == 0
    failed = run.one("task.poll_failed", tid(1))
    assert (failed["error"], failed["http_status"]) == ("rate_limited", 429)

    limited, bystander = sim.of(task_id=tid(1)), sim.of(task_id=tid(2))
    hit = limited[1]  # the 429's arrival
    assert any(t < hit for t in bystander), "B did not poll before the pause"
    # B's requests already sent when the 429 came back may land just after it
    during = [round(t - hit, 3) for t in bystander if hit + 0.1 < t < hit + 0.95]
    assert during == [], f"B polled during A's Retry-After pause at +{during} s"
    assert any(t >= hit + 0.95 for t in bystander), "B never resumed"
    assert limited[2] >= hit + 0.95
    assert run.transitions(tid(2))[-1]["status"] == "Finished"


# -- 6. limits measured at the server ------------------------------------------------------


async def test_rate_limit_at_the_server(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    sim = await simulate(*(sim_task(i, f"Busy{i}", timeline("Running")) for i in range(20)))
    cfg = write_config(
        tmp_path / "c.yaml",
        sim,
        [{"task_id": tid(i)} for i in range(20)],
        polling={"interval_seconds": 0.02, "max_requests_per_second": 10},
    )
    run = await enkwatch("run", "--config", cfg)
    await until(lambda: sim.stats.requests >= 22, "22 requests")
    term = time.monotonic()
    run.send(signal.SIGTERM)
    assert await run.wait_exit() == 0
    times = [a.at for a in sim.arrivals]
    # polls held by the rate limit at SIGTERM are dropped, not sent during the drain
    assert [round(t - term, 3) for t in times if t > term + 0.1] == []
    assert run.elapsed - (term - run.started) < 1.0
    assert sim.stats.max_in_window(1.0) <= 11
    assert max_in_window(times) <= 11
    assert max_in_window(times) >= 9  # the limit, not the workload, was what bound
    span = times[21] - times[0]
    assert span >= 1.9, f"22 requests in {span:.2f} s"


async def test_concurrency_cap_at_the_server(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    slow = {"kind": "slow", "seconds": 0.2, "requests": 1000}
    sim = await simulate(*(sim_task(i, f"Slow{i}", timeline("Running"), slow) for i in range(9)))
    cfg = write_config(
        tmp_path / "c.yaml",
        sim,
        [{"task_id": tid(i)} for i in range(9)],
        polling={"max_concurrency": 3},
    )
    run = await enkwatch("run", "--config", cfg)
    await until(lambda: sim.stats.requests >= 15, "15 requests")
    run.send(signal.SIGTERM)
    assert await run.wait_exit() == 0
    assert sim.stats.max_in_flight == 3


# -- 7. SIGKILL and restart on a state file ------------------------------------------------


def merge_runs(*runs: Run, key: str) -> list[dict[str, Any]]:
    """A task's events across runs, an event written twice (same event_id) counted once."""
    by_id: dict[str, dict[str, Any]] = {}
    for run in runs:
        for event in task_events(run, key):
            seen = by_id.setdefault(event["event_id"], event)
            assert seen == event, f"two different events under {event['event_id']}"
    return sorted(by_id.values(), key=lambda e: e["seq"])


@pytest.mark.parametrize("kill_after", ["Queued", "Running"])
async def test_sigkill_and_restart(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn, kill_after: str
) -> None:
    long, quick = tid(1), tid(2)
    sim = await simulate(
        sim_task(1, "Long", timeline("Queued", 1, "Running", 1.5, "Finished")),
        sim_task(2, "Quick", timeline("Queued", 0.1, "Finished")),
    )
    state = tmp_path / "state.db"
    cfg = write_config(
        tmp_path / "c.yaml", sim, [{"task_id": long}, {"task_id": quick}], state=str(state)
    )
    first = await enkwatch("run", "--config", cfg)
    await first.wait_for(is_transition(quick, "Finished"), "Quick Finished")
    await first.wait_for(is_transition(long, kill_after), f"Long {kill_after}")
    first.kill()
    assert await first.wait_exit() == -signal.SIGKILL
    quick_polls = sim.count(task_id=quick)

    second = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert second.rc == 0, second.stderr
    assert sim.count(task_id=quick) == quick_polls, "a Finished task was polled after restart"

    for key, expected in (
        (long, [(None, "Queued"), ("Queued", "Running"), ("Running", "Finished")]),
        (quick, [(None, "Queued"), ("Queued", "Finished")]),
    ):
        events = merge_runs(first, second, key=key)
        assert seqs(events) == list(range(1, len(events) + 1)), key
        assert statuses(e for e in events if e["event"] == "task.transition") == expected, key

    before = first.transitions(long)
    assert before[-1]["status"] == kill_after
    new = [e for e in second.transitions(long) if e["seq"] > before[-1]["seq"]]
    assert new[0]["previous_status"] == kill_after
    assert new[-1]["status"] == "Finished"
    done = second.one("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (2, 0, 0)

    if kill_after == "Running":
        # once more on the same state: nothing left to poll, nothing emitted again
        requests = sim.stats.requests
        third = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
        assert third.rc == 0
        assert sim.stats.requests == requests
        assert [e["event"] for e in third.events] == [
            "daemon.started",
            "daemon.all_done",
            "daemon.stopping",
            "daemon.stopped",
        ]


# -- 8. SIGTERM / SIGINT -------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_cleanly_with_a_poll_in_flight(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn, sig: signal.Signals
) -> None:
    sim = await simulate(
        sim_task(1, "Steady", timeline("Running")),
        sim_task(2, "Stuck", timeline("Running"), {"kind": "slow", "seconds": 1.5, "requests": 9}),
    )
    cfg = write_config(
        tmp_path / "c.yaml",
        sim,
        [{"task_id": tid(1)}, {"task_id": tid(2)}],
        api={"timeout_seconds": 1},
    )
    run = await enkwatch("run", "--config", cfg)
    await run.wait_for(is_transition(tid(1), "Running"), "a transition")
    await until(lambda: sim.stats.in_flight >= 1, "a poll in flight")
    signalled = time.monotonic()
    run.send(sig)
    rc = await run.wait_exit(within=15)
    took = time.monotonic() - signalled
    assert rc == 0
    assert took < 10
    assert took < 1 + 2.5  # the request timeout, plus start-up slack
    stopping = run.one("daemon.stopping")
    stopped = run.one("daemon.stopped")
    assert stopping["reason"] == stopped["reason"] == f"signal:{sig.name}"
    assert run.events.index(stopping) < run.events.index(stopped)
    assert run.events[-1] is stopped
    assert run.named("daemon.all_done") == []


# -- 9. watch, check-config, --version, console logs, demo ---------------------------------


async def test_watch(simulate: StartSim, enkwatch: Spawn) -> None:
    sim = await simulate(
        sim_task(1, "WatchA", timeline("Queued", 0.2, "Finished")),
        sim_task(2, "WatchB", timeline("Running", 0.2, "Failed")),
        sim_task(3, "Forever", timeline("Running")),
    )

    def watch(*args: str) -> Awaitable[Run]:
        return finish(enkwatch, "watch", *args, ENKWATCH_API__BASE_URL=sim.url)

    # independent runs side by side (distinct tasks); a --task-id and the --dataset next to
    # it are one task, as in the config file
    both, late, unknown, nothing, zero = await asyncio.gather(
        watch(
            "--task-id", tid(1), "--dataset", "WatchA", "--dataset", "WatchB", "--interval", "0.1"
        ),
        watch("--dataset", "Forever", "--interval", "0.1", "--deadline", "0.4"),
        watch("--task-id", tid(99), "--interval", "0.05"),
        watch("--interval", "0.1"),
        watch("--task-id", tid(98), "--interval", "0"),
    )
    assert both.rc == 1, both.stdout + both.stderr
    assert both.events[0]["event"] == "daemon.started"
    assert both.events[0]["tasks"] == 2
    assert statuses(both.transitions(tid(1))) == [(None, "Queued"), ("Queued", "Finished")]
    assert {e["dataset"] for e in both.transitions(tid(1))} == {"WatchA"}
    b = both.transitions("dataset:WatchB")
    assert statuses(b) == [(None, "Running"), ("Running", "Failed")]
    assert {(e["task_id"], e["dataset"]) for e in b} == {(tid(2), "WatchB")}
    done = both.one("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (1, 1, 0)

    assert late.rc == 3
    assert late.one("task.gave_up", "dataset:Forever")["reason"] == "deadline_exceeded"
    assert unknown.rc == 3
    assert unknown.one("task.gave_up", tid(99))["reason"] == "not_found"
    assert sim.count(task_id=tid(99)) == 3  # not_found_attempts' default

    assert (nothing.rc, nothing.stdout) == (2, "")
    assert (zero.rc, zero.stdout) == (2, "")
    assert "--interval" in zero.stderr
    assert sim.count(task_id=tid(98)) == 0

    # no state file by default (:memory:): a new watch starts from scratch
    again = await watch("--task-id", tid(1), "--interval", "0.1")
    assert again.rc == 0
    assert statuses(again.transitions(tid(1))) == [(None, "Finished")]


async def test_check_config(tmp_path: Path, enkwatch: Spawn) -> None:
    good = write_config(
        tmp_path / "good.yaml",
        "https://api.example.test",
        [
            {"task_id": tid(1), "labels": {"team": "safety"}, "interval_seconds": 5},
            {"dataset": "Election2", "deadline_seconds": 60},
        ],
    )
    ok = await finish(enkwatch, "check-config", json_lines=False, ENKWATCH_CONFIG=good)
    assert ok.rc == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["tasks"] == [
        {
            "task_key": tid(1),
            "kind": "dataset",
            "task_id": tid(1),
            "dataset": None,
            "interval_seconds": 5.0,
            "deadline_seconds": None,
            "labels": {"team": "safety"},
        },
        {
            "task_key": "dataset:Election2",
            "kind": "dataset",
            "task_id": None,
            "dataset": "Election2",
            "interval_seconds": 0.05,
            "deadline_seconds": 60.0,
            "labels": {},
        },
    ]
    assert out["api"]["base_url"] == "https://api.example.test"

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": "ftp://example.test", "timeout_seconds": -1},
                "polling": {"interval_seconds": 0, "bogus": 1},
                "tasks": [
                    {"task_id": "a"},
                    {"labels": {"team": "x"}},
                    {"task_id": "a"},
                    {"dataset": "bad\r\nX-Evil: 1"},
                    {"task_id": "b", "deadline_seconds": -5},
                ],
            }
        ),
        encoding="utf-8",
    )
    fail = await finish(enkwatch, "check-config", "--config", str(bad), json_lines=False)
    assert fail.rc == 2
    assert fail.stdout == ""
    problem_lines = [line.strip() for line in fail.stderr.splitlines()]
    for path in (
        "api.base_url",
        "api.timeout_seconds",
        "polling.interval_seconds",
        "polling.bogus",
        "tasks[1]",
        "tasks[2]",
        "tasks[3].dataset",
        "tasks[4].deadline_seconds",
    ):
        assert any(line.startswith(f"{path}:") for line in problem_lines), (path, fail.stderr)


async def test_version(enkwatch: Spawn) -> None:
    run = await finish(enkwatch, "--version", json_lines=False)
    assert run.rc == 0
    assert run.stdout.strip() == f"enkwatch {__version__}"


@pytest.mark.parametrize("where", ["before", "after"])
async def test_console_log_format(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn, where: str
) -> None:
    sim = await simulate(sim_task(1, "Election2", timeline("Finished")))
    cfg = write_config(tmp_path / "c.yaml", sim, [{"task_id": tid(1)}])
    fmt = ["--log-format", "console"]
    args = [*fmt, "run", "--config", cfg] if where == "before" else ["run", *fmt, "--config", cfg]
    run = await enkwatch(*args, "--exit-when-done", json_lines=False)
    assert await run.wait_exit() == 0
    assert run.events == []  # no line is a JSON object
    assert any(
        "FINISHED" in line and "Election2" in line and "first seen Finished" in line
        for line in run.lines
    ), run.stdout
    assert any("START" in line and "watching 1 task" in line for line in run.lines)
    assert "\x1b[" not in run.stdout  # a pipe: no colour


async def test_log_level(tmp_path: Path, simulate: StartSim, enkwatch: Spawn) -> None:
    sim = await simulate(sim_task(1, "Election2", timeline("Queued", 0.1, "Failed")))
    cfg = write_config(tmp_path / "c.yaml", sim, [{"task_id": tid(1)}])
    run = await finish(
        enkwatch, "run", "--config", cfg, "--exit-when-done", "--log-level", "warning"
    )
    assert run.rc == 1
    assert [(e["event"], e["status"]) for e in run.events] == [("task.transition", "Failed")]


async def test_demo(enkwatch: Spawn) -> None:
    run = await finish(enkwatch, "demo")
    assert run.rc == 0, run.stderr
    assert run.elapsed < 30
    seen = {e["status"] for e in run.named("task.transition")}
    assert {"Queued", "Running", "Finished", "Failed"} <= seen
    assert run.named("task.poll_failed")  # the flaky task of the demo scenario
    assert run.events[-1]["event"] == "daemon.stopped"


# -- 10. a deadline that passed while the daemon was down ----------------------------------


async def test_deadline_passed_while_down(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn
) -> None:
    # 1 stays Running; 2 finishes while the daemon is down
    sim = await simulate(
        sim_task(1, "Forever", timeline("Running")),
        sim_task(2, "Done", timeline("Running", 0.8, "Finished")),
    )
    cfg = write_config(
        tmp_path / "c.yaml",
        sim,
        [{"task_id": tid(1), "deadline_seconds": 1}, {"task_id": tid(2), "deadline_seconds": 1}],
        state=str(tmp_path / "state.db"),
        polling={"interval_seconds": 0.1},
    )
    first = await enkwatch("run", "--config", cfg)
    seen = await first.wait_for(is_transition(tid(1), "Running"), "the first transition")
    await first.wait_for(is_transition(tid(2), "Running"), "the first transition")
    first.kill()
    await first.wait_exit()
    assert first.named("task.gave_up") == []
    assert first.named("task.transition", tid(2))[-1]["status"] == "Running"

    stamp = datetime.fromisoformat(seen["timestamp"].replace("Z", "+00:00"))
    deadline = stamp.timestamp() - seen["watched_seconds"] + 1
    await until(lambda: time.time() > deadline + 0.05, "the deadline", within=1.5)
    polls = {n: sim.count(task_id=tid(n)) for n in (1, 2)}

    second = await finish(enkwatch, "run", "--config", cfg, "--exit-when-done")
    assert second.rc == 3, second.stdout
    for n in (1, 2):
        assert sim.count(task_id=tid(n)) == polls[n] + 1  # polled exactly once
    already = {e["event_id"] for e in first.events if "event_id" in e}
    new = {
        n: [e for e in task_events(second, tid(n)) if e["event_id"] not in already] for n in (1, 2)
    }
    assert [e["event"] for e in new[1]] == ["task.gave_up"]
    gave_up = new[1][0]
    assert (gave_up["reason"], gave_up["last_status"]) == ("deadline_exceeded", "Running")
    assert gave_up["seq"] == max(e["seq"] for e in task_events(first, tid(1))) + 1
    # a terminal status found on that one poll is emitted as its transition
    assert statuses(new[2]) == [("Running", "Finished")]
    done = second.one("daemon.all_done")
    assert (done["finished"], done["failed"], done["gave_up"]) == (1, 0, 1)
