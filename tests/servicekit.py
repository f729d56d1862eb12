"""Helpers to run the real Service in-process against the real simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from enkwatch.config import Config, parse_config
from enkwatch.service import Service
from enkwatch.simulator import Scenario, start_simulator

API_KEY = "sk-test-SECRET-service"


def scenario(*tasks: dict[str, Any], api_key: str | None = None) -> Scenario:
    return Scenario.model_validate({"api_key": api_key, "tasks": list(tasks)})


def sim_task(name: str, *phases: tuple[str, float | None], **extra: Any) -> dict[str, Any]:
    timeline = [{"status": s, "seconds": sec} for s, sec in phases]
    return {"task_id": name, "dataset": f"ds-{name}", "timeline": timeline, **extra}


@asynccontextmanager
async def simulator(scn: Scenario) -> AsyncIterator[tuple[str, web.Application]]:
    runner, port, app = await start_simulator(scn, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        await runner.cleanup()


def make_config(base_url: str, state: str, tasks: list[dict[str, Any]], **extra: Any) -> Config:
    raw: dict[str, Any] = {
        "api": {"base_url": base_url, "timeout_seconds": 2},
        "polling": {
            "interval_seconds": 0.05,
            "jitter": 0,
            "max_requests_per_second": 0,
            "max_backoff_seconds": 0.2,
        },
        "state": {"path": state},
        "tasks": tasks,
    }
    for key, value in extra.items():
        raw[key] = value
    return parse_config(raw, environ={})


@asynccontextmanager
async def running(config: Config, **kw: Any) -> AsyncIterator[Service]:
    """A started Service; stopped (and its exit code checked as 0) on leaving."""
    kw.setdefault("gc_tuning", False)  # the test process's collector is not ours to tune
    service = Service(config, API_KEY, **kw)
    job = asyncio.ensure_future(service.run(install_signals=False))
    ready = asyncio.ensure_future(service.ready.wait())
    await asyncio.wait({job, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if job.done():
        ready.cancel()
        job.result()  # raises what failed
        raise AssertionError("the service stopped before it was ready")
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(job, 15)


async def until(predicate: Callable[[], bool], within_s: float = 10.0) -> None:
    """Wait for a condition other code makes true, with a deadline (no fixed sleeps)."""
    async with asyncio.timeout(within_s):
        while not predicate():  # noqa: ASYNC110 - the condition is not an Event
            await asyncio.sleep(0.01)


def events_named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]
