"""The assembly: health and readiness, and a Service whose pieces start, then close in reverse."""

from __future__ import annotations

import asyncio
import gc
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.client import ApiClient
from enkwatch.clock import FakeClock
from enkwatch.config import TaskConfig
from enkwatch.delivery import DeliveryProcess
from enkwatch.errors import ConfigError
from enkwatch.health import STALL_LIMIT_S, Health, Outcome, StopReason
from enkwatch.schedule import Timers
from enkwatch.service import Service
from enkwatch.sinks import Outbox
from enkwatch.state.sqlite import SqliteStore
from tests.kit import API_KEY, StartSim, make_config, running, sim_task, until

# -- health ----------------------------------------------------------------------------------


async def test_readiness_follows_the_run() -> None:
    health = Health(FakeClock())
    assert health.readiness() == (False, "starting")
    health.ready.set()
    assert health.readiness() == (True, "ok")
    health.stopping = True
    assert health.readiness() == (False, "shutting down")
    health.auth_failed = True
    assert health.readiness() == (False, "the API rejected the key")


async def test_liveness_fails_when_the_scheduler_stalls() -> None:
    clock = FakeClock()
    health = Health(clock)
    clock.advance(STALL_LIMIT_S * 10)
    assert health.health() == (True, "ok")  # not ready yet: start-up may take its time
    health.ready.set()
    assert health.health()[0] is False
    assert "the scheduler has not run for" in health.health()[1]
    await health.watchdog()
    assert health.health() == (True, "ok")
    clock.advance(STALL_LIMIT_S - 1)
    assert health.health() == (True, "ok")


# -- the service's lifecycle -----------------------------------------------------------------


@pytest.fixture
def closes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The order in which the service's components are closed (their own code still runs)."""
    order: list[str] = []

    def spy(cls: type, name: str, label: str, is_async: bool = True) -> None:
        original = getattr(cls, name)
        if is_async:

            async def wrapped(self: Any, *args: Any) -> Any:
                order.append(label)
                return await original(self, *args)

            monkeypatch.setattr(cls, name, wrapped)
        else:

            def wrapped_sync(self: Any, *args: Any) -> Any:
                order.append(label)
                return original(self, *args)

            monkeypatch.setattr(cls, name, wrapped_sync)

    spy(SqliteStore, "close", "store")
    spy(ApiClient, "__aexit__", "client")
    spy(Timers, "shutdown", "timers", is_async=False)
    spy(Outbox, "close", "outbox")
    spy(DeliveryProcess, "close", "outbox")  # the outbox in a process of its own
    return order


async def test_a_stopped_service_closes_its_pieces_in_reverse(
    tmp_path: Path, simulate: StartSim, closes: list[str]
) -> None:
    sim = await simulate(sim_task("t1", ("Running", None)))
    config = make_config(
        sim.url, str(tmp_path / "s.db"), [{"task_id": "t1"}], admin={"listen": "127.0.0.1:0"}
    )
    with capture_logs() as logs:
        async with running(config) as svc:
            assert svc.running is not None and svc.admin_port is not None
            await until(lambda: any(e["event"] == ev.TASK_TRANSITION for e in logs))
            assert closes == []
            port = svc.admin_port
    # started store -> client -> timers -> outbox -> admin; closed the other way round
    assert closes == ["outbox", "timers", "client", "store"]
    names = [e["event"] for e in logs if e["event"].startswith("daemon.")]
    assert names == [ev.DAEMON_STARTED, ev.DAEMON_STOPPING, ev.DAEMON_STOPPED]
    stopping = next(e for e in logs if e["event"] == ev.DAEMON_STOPPING)
    assert stopping["reason"] == StopReason.STOP_REQUESTED.value
    with pytest.raises(aiohttp.ClientConnectionError):  # the admin server is closed too
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz"):
            pass
    assert not svc.health.readiness()[0]


async def test_run_returns_the_outcome(tmp_path: Path, simulate: StartSim) -> None:
    sim = await simulate(sim_task("t1", ("Finished", None)), sim_task("t2", ("Failed", None)))
    config = make_config(sim.url, ":memory:", [{"task_id": "t1"}, {"task_id": "t2"}])
    service = Service(config, API_KEY, exit_when_done=True, gc_tuning=False)
    with capture_logs():
        outcome = await asyncio.wait_for(service.run(install_signals=False), 20)
    assert outcome == Outcome(StopReason.ALL_DONE, False, finished=1, failed=1, gave_up=0)


async def test_a_sole_owner_keeps_no_task_entry_of_its_config(
    tmp_path: Path, simulate: StartSim
) -> None:
    # the watches hold what they need; the pydantic entries (~640 B each) were half the
    # memory per task at 100,000 tasks while the service kept the config it was given
    keys = ["let-go-1", "let-go-2"]
    sim = await simulate(*(sim_task(k, ("Running", None)) for k in keys))
    tasks = [{"task_id": k} for k in keys]
    service = Service(make_config(sim.url, str(tmp_path / "s.db"), tasks), API_KEY, gc_tuning=False)
    job = asyncio.ensure_future(service.run(install_signals=False))
    with capture_logs():
        await asyncio.wait_for(service.ready.wait(), 10)
        assert service.running is not None and sorted(service.running.watchlist.tasks) == keys
        gc.collect()
        kept = [o for o in gc.get_objects() if isinstance(o, TaskConfig) and o.task_id in keys]
        service.request_stop()
        await asyncio.wait_for(job, 15)
    assert kept == []


async def test_an_api_that_rejects_the_key_ends_the_run_with_auth_failed(
    simulate: StartSim,
) -> None:
    sim = await simulate(sim_task("t1", ("Running", None)), api_key="sk-other")
    config = make_config(sim.url, ":memory:", [{"task_id": "t1"}])
    service = Service(config, API_KEY, gc_tuning=False)
    with capture_logs() as logs:
        outcome = await asyncio.wait_for(service.run(install_signals=False), 20)
    assert outcome.reason is StopReason.AUTH_FAILED and outcome.auth_failed
    assert [e["event"] for e in logs].count(ev.API_AUTH_FAILED) == 1


async def test_a_failure_to_start_closes_what_had_started(
    tmp_path: Path, simulate: StartSim, closes: list[str]
) -> None:
    sim = await simulate(sim_task("t1", ("Running", None)))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(sim.url, ":memory:", [], admin={"listen": f"127.0.0.1:{port}"})
        service = Service(config, API_KEY, gc_tuning=False)
        with pytest.raises(ConfigError, match=r"admin\.listen: cannot listen"):
            await service.run(install_signals=False)
    assert closes == ["outbox", "timers", "client", "store"]
    assert not service.ready.is_set()
