"""The Discoverer with replicas: a sweep goes on only while this replica holds the lease of
its entry (`discover:<i>`), asked before every attempt and every page, so that one replica
sweeps at a time. The simulator is a real aiohttp server; the client is the daemon's own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from aiohttp import web

from enkwatch import events as ev
from enkwatch.client import ApiClient
from enkwatch.clock import FakeClock, SystemClock
from enkwatch.config import Config, parse_config
from enkwatch.discovery import Discoverer
from enkwatch.limits import RequestGate
from enkwatch.models import ListedJob
from enkwatch.simulator import STATS, Scenario, SimulatorStats, build_app
from tests.kit import SECRET, timeline

LIST = "/redteam/list-tasks"


class Found:
    """Where the jobs found go (the watch list's part of the protocol)."""

    def __init__(self) -> None:
        self.added: list[dict[str, Any]] = []
        self.swept_entries: list[int] = []
        self.clock = SystemClock()

    async def known_keys(self) -> set[str]:
        return set()

    async def discover(self, entry: dict[str, Any], job: object = None) -> bool:
        self.added.append(entry)
        return True

    def swept(self, entry: int) -> None:
        self.swept_entries.append(entry)

    def monotonic(self) -> float:
        return self.clock.monotonic()

    def unlisted(self, kind: str, since: float) -> None:
        pass

    def listed(
        self, kind: str, jobs: Iterable[ListedJob], requested_mono: float, covered_s: float = 0.0
    ) -> int:
        return 0


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, SimulatorStats]]:
    # 150 jobs: two pages of 100; the first list request answers 503
    jobs = [
        {"kind": "redteam", "task_id": f"rt-{n}", "test_name": f"t-{n}",
         "timeline": timeline("Running"), "starts": "at_start"}
        for n in range(150)
    ]  # fmt: skip
    faults = {"redteam": [{"kind": "http_503", "requests": 1}]}
    app = build_app(Scenario.model_validate({"tasks": jobs, "list_faults": faults}))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[STATS]
    finally:
        await runner.cleanup()


def config(url: str) -> Config:
    raw = {
        "api": {"base_url": url},
        "discover": [{"kind": "redteam", "statuses": ["Running"]}],
    }
    return parse_config(raw, environ={"ENKWATCH_API_KEY": SECRET})


async def test_a_failed_sweep_is_not_retried_once_the_lease_is_gone(
    api: tuple[str, SimulatorStats],
) -> None:
    url, stats = api
    held = [True]

    async def backoff(seconds: float) -> None:
        held[0] = False  # the lease moved to another replica during the backoff

    found = Found()
    async with ApiClient(url, SECRET, 5, RequestGate(0)) as client:
        finder = Discoverer(
            config(url), client, found, ev.EventWriter(SystemClock()),
            may_sweep=lambda key: held[0], sleep=backoff,
        )  # fmt: skip
        await finder.run(0)
    assert stats.by_endpoint[LIST] == 1  # the 503; no retry by a replica without the lease
    assert finder.stats.failed == 1 and finder.stats.sweeps == 0
    assert found.added == [] and found.swept_entries == [0]


async def test_a_sweep_stops_between_pages_when_the_lease_is_lost(
    api: tuple[str, SimulatorStats],
) -> None:
    url, stats = api

    async def backoff(seconds: float) -> None:
        pass

    found = Found()
    async with ApiClient(url, SECRET, 5, RequestGate(0)) as client:
        # the lease is lost once page 1 has been read (the 503, then page 1)
        finder = Discoverer(
            config(url), client, found, ev.EventWriter(SystemClock()),
            may_sweep=lambda key: stats.by_endpoint.get(LIST, 0) < 2, sleep=backoff,
        )  # fmt: skip
        await finder.run(0)
    assert stats.by_endpoint[LIST] == 2  # page 2 is not read
    assert finder.stats.sweeps == 0 and found.added == [] and found.swept_entries == [0]


async def test_the_lease_holder_sweeps_every_page(api: tuple[str, SimulatorStats]) -> None:
    url, stats = api

    async def backoff(seconds: float) -> None:
        pass

    found = Found()
    async with ApiClient(url, SECRET, 5, RequestGate(0)) as client:
        finder = Discoverer(
            config(url), client, found, ev.EventWriter(SystemClock()),
            may_sweep=lambda key: key == "discover:0", sleep=backoff,
        )  # fmt: skip
        await finder.run(0)
    assert stats.by_endpoint[LIST] == 3  # the 503, then pages 1 and 2
    assert finder.stats.sweeps == 1 and len(found.added) == 150


async def test_a_list_that_shrinks_while_read_costs_one_page_more_and_loses_nothing() -> None:
    # job 0 (first of the list) ends just before page 2 is served: every job behind it moves
    # up, and the first one of page 2 onto page 1, which is read again (not the whole list)
    clock = FakeClock()
    jobs = [
        {"kind": "redteam", "task_id": f"rt-{n:03d}", "test_name": f"t-{n:03d}",
         "timeline": timeline("Running", 10, "Finished") if n == 0 else timeline("Running"),
         "starts": "at_start"}
        for n in range(151)
    ]  # fmt: skip
    app = build_app(Scenario.model_validate({"tasks": jobs}), clock)
    pages: list[str] = []

    @web.middleware
    async def move(request: web.Request, handler: Any) -> web.StreamResponse:
        pages.append(request.query["page"])
        if pages == ["1", "2"]:
            clock.advance(11)
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(move)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    found = Found()
    try:
        async with ApiClient(url, SECRET, 5, RequestGate(0)) as client:
            finder = Discoverer(config(url), client, found, ev.EventWriter(SystemClock()))
            await finder.run(0)
    finally:
        await runner.cleanup()
    assert pages == ["1", "2", "1"]
    assert finder.stats.reread_pages == 1
    # every job the list named, the one that moved up a page included (rt-100)
    assert {e["task_id"] for e in found.added} == {f"rt-{n:03d}" for n in range(151)}
