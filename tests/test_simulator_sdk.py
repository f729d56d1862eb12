"""The official SDK (`enkryptai-sdk`, a test dependency) reads the simulator's endpoints.

The SDK is synchronous (urllib3): each call runs in a thread while the simulator serves
from this test's event loop over real TCP on 127.0.0.1, on a fake clock the test moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from enkryptai_sdk import (
    DatasetClient,
    DatasetClientError,
    RedTeamClient,
    RedTeamClientError,
    RedTeamLegacyClient,
)

from enkwatch.clock import FakeClock
from enkwatch.simulator import STATS, Scenario, SimulatorStats, start_simulator

KEY = "sk-test-sdk"
RUN_ID = "rt-0c6f3b9e-5d2a-4e8b-9f71-3a4b5c6d7e8f"


def scenario() -> Scenario:
    def life(*pairs: tuple[str, float | None]) -> list[dict[str, Any]]:
        return [{"status": s, "seconds": sec} for s, sec in pairs]

    tasks: list[dict[str, Any]] = [
        {
            "task_id": "data-generation-1",
            "dataset": "Election2",
            "timeline": life(("Queued", 5), ("Running", 20), ("Finished", None)),
        },
        {
            "task_id": "data-generation-2",
            "dataset": "FinanceQA",
            "starts": "at_start",
            "timeline": life(("Running", 20), ("Failed", None)),
        },
        {
            "kind": "redteam",
            "task_id": "redteam-task-1",
            "test_name": "nightly-gpt",
            "model_name": "gpt-4o-mini",
            "model_config": {"system_prompt": "be helpful", "model_version": "v1"},
            "user_metadata": {"team": "qa"},
            "starts": "at_start",
            "timeline": life(("Running", 60), ("Finished", None)),
        },
        {
            "kind": "redteam",
            "task_id": "redteam-task-2",
            "test_name": "nightly-llama",
            "starts": "at_start",
            "timeline": life(("Queued", 30), ("Running", None)),
        },
        {
            "kind": "redteam_run",
            "run_id": RUN_ID,
            "fields": {"test_statuses": {"safety": {"completed": 3, "running": 1}}},
            "timeline": life(("Queued", 30), ("Running", 60), ("completed", None)),
        },
        {
            "kind": "redteam_run",
            "run_id": "eval-1",
            "id_field": "run_id",
            "timeline": life(("Running", 30), ("cancelled", None)),
        },
    ]
    return Scenario.model_validate({"api_key": KEY, "tasks": tasks})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=datetime(2026, 1, 1, tzinfo=UTC))


@pytest.fixture
async def served(clock: FakeClock) -> AsyncIterator[tuple[str, SimulatorStats]]:
    runner, port, app = await start_simulator(scenario(), "127.0.0.1", 0, clock)
    try:
        yield f"http://127.0.0.1:{port}", app[STATS]
    finally:
        await runner.cleanup()


async def test_datasets(served: tuple[str, SimulatorStats], clock: FakeClock) -> None:
    url, stats = served
    sdk = DatasetClient(api_key=KEY, base_url=url)

    task = await asyncio.to_thread(sdk.get_dataset_task, "Election2")
    assert (task.data.task_id, task.data.status) == ("data-generation-1", "Queued")
    assert task.data.created_at == "2026-01-01T00:00:00.000000+00:00"
    assert task.data.started_at == ""  # absent in the answer: the SDK's own default
    status = await asyncio.to_thread(sdk.get_dataset_task_status, "Election2")
    assert (status.dataset_name, status.status) == ("Election2", "Queued")

    clock.advance(5)
    task = await asyncio.to_thread(sdk.get_dataset_task, "Election2")
    assert task.data.status == "Running"
    assert task.data.started_at == "2026-01-01T00:00:05.000000+00:00"
    running = await asyncio.to_thread(sdk.list_datasets, "Running")
    assert running.datasets == ["Election2", "FinanceQA"]
    clock.advance(20)
    failed = await asyncio.to_thread(sdk.list_datasets, "Failed")
    assert failed.datasets == ["FinanceQA"]
    everything = await asyncio.to_thread(sdk.list_datasets)
    assert everything.datasets == ["Election2", "FinanceQA"]

    with pytest.raises(DatasetClientError, match="404"):
        await asyncio.to_thread(sdk.get_dataset_task, "Unknown")
    assert stats.by_endpoint["/datasets/list-tasks"] == 3


async def test_redteam_legacy(served: tuple[str, SimulatorStats], clock: FakeClock) -> None:
    url, _ = served
    sdk = RedTeamLegacyClient(api_key=KEY, base_url=url)

    by_name = await asyncio.to_thread(sdk.get_task, test_name="nightly-gpt")
    assert (by_name.task_id, by_name.status, by_name.model_name) == (
        "redteam-task-1",
        "Running",
        "gpt-4o-mini",
    )
    assert by_name.model_config is not None
    assert by_name.model_config.system_prompt == "be helpful"
    assert by_name.user_metadata == {"team": "qa"}
    by_id = await asyncio.to_thread(sdk.get_task, task_id="redteam-task-2")
    assert (by_id.test_name, by_id.status) == ("nightly-llama", "Queued")
    status = await asyncio.to_thread(sdk.status, task_id="redteam-task-1")
    assert status.status == "Running"

    listed = await asyncio.to_thread(sdk.get_task_list, "Running")
    assert [(t["test_name"], t["status"]) for t in listed.tasks] == [("nightly-gpt", "Running")]
    clock.advance(60)
    listed = await asyncio.to_thread(sdk.get_task_list, "Running")
    assert [t["test_name"] for t in listed.tasks] == ["nightly-llama"]
    listed = await asyncio.to_thread(sdk.get_task_list)
    assert {t["test_name"]: t["status"] for t in listed.tasks} == {
        "nightly-gpt": "Finished",
        "nightly-llama": "Running",
    }


async def test_runs(served: tuple[str, SimulatorStats], clock: FakeClock) -> None:
    url, stats = served
    sdk = RedTeamClient(api_key=KEY, base_url=url)
    loop = asyncio.get_running_loop()

    first = await asyncio.to_thread(sdk.get_run, RUN_ID)
    assert (first.run_id, first.state, first.is_terminal) == (RUN_ID, "queued", False)
    assert first.pillar_progress == {"safety": {"completed": 3, "running": 1}}

    states: list[str | None] = []

    def progressed(status: Any) -> None:
        # between two polls of the SDK, the run's time moves on by 30 s (its poll interval)
        states.append(status.state)
        loop.call_soon_threadsafe(clock.advance, 30)

    final = await asyncio.to_thread(
        sdk.wait_for_run, RUN_ID, poll_interval=0.01, timeout=30, on_progress=progressed
    )
    assert (final.state, final.is_terminal, final.status) == ("finished", True, "completed")
    assert states[0] == "queued"
    assert states[-1] == "finished"
    assert set(states) <= {"queued", "running", "finished"}

    other = await asyncio.to_thread(sdk.get_run, "eval-1")  # named `run_id` in its answer
    assert (other.run_id, other.state, other.is_terminal) == ("eval-1", "running", False)
    clock.advance(30)
    other = await asyncio.to_thread(sdk.get_run, "eval-1")
    assert (other.state, other.is_terminal) == ("cancelled", True)
    with pytest.raises(RedTeamClientError, match="404"):
        await asyncio.to_thread(sdk.get_run, "rt-unknown")
    assert stats.by_task[RUN_ID] == 1 + len(states)


async def test_a_wrong_key_is_refused(served: tuple[str, SimulatorStats]) -> None:
    url, stats = served
    sdk = DatasetClient(api_key="sk-wrong", base_url=url)
    with pytest.raises(DatasetClientError, match="401"):
        await asyncio.to_thread(sdk.get_dataset_task, "Election2")
    assert stats.by_task == {}
