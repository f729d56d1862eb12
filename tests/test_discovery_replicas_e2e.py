"""Discovery on 3 replicas sharing one real PostgreSQL (issue 10, item 6): real `enkwatch
run` processes. One replica sweeps (the lease of `discover:0`); every job it finds is
stored once and polled by whichever replica holds the job's partition, which announces
it: over all the replicas' outputs, each job has exactly one `task.discovered`, and each
of its transitions is written once.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml
from aiohttp import web

from enkwatch.simulator import Scenario, build_app
from tests.kit import Run, Spawn, free_port, timeline, until
from tests.pgkit import HOW_TO_ENABLE, find_bin_dir
from tests.test_replicas_e2e import Replica

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(find_bin_dir() is None, reason=HOW_TO_ENABLE),
    pytest.mark.timeout(120),
]

LIST = "/redteam/list-tasks"
N_JOBS = 30  # matching jobs, each found once
FILLERS = 120  # Running jobs that do not match: the Running list has two pages
KEYS = [f"redteam:rt-task-{n:04d}" for n in range(1, N_JOBS + 1)]


class ListGate:
    """Answers 503 to the list calls until opened: the jobs are found only once every
    replica holds its share of the partitions (no handover while they are watched)."""

    def __init__(self) -> None:
        self.open = False

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == LIST and not self.open:
            return web.json_response({"detail": "not yet"}, status=503)
        response: web.StreamResponse = await handler(request)
        return response


def rt(n: int, name: str, phases: list[dict[str, Any]]) -> dict[str, Any]:
    return {"kind": "redteam", "task_id": f"rt-task-{n:04d}", "test_name": name, "timeline": phases}


@pytest.fixture
async def sim() -> AsyncIterator[tuple[str, ListGate]]:
    jobs = [rt(n, f"nightly-{n}", timeline("Queued", 1, "Running", 1.5, "Finished"))
            for n in range(1, N_JOBS + 1)]  # fmt: skip
    fillers = [
        rt(1000 + n, f"filler-{n}", timeline("Running")) | {"starts": "at_start"}
        for n in range(FILLERS)
    ]
    app = build_app(Scenario.model_validate({"tasks": jobs + fillers}))
    gate = ListGate()
    app.middlewares.append(gate.middleware)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", gate
    finally:
        await runner.cleanup()


async def query(dsn: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(sql))
    except asyncpg.UndefinedTableError:
        return []  # no replica has created the tables yet
    finally:
        await conn.close()


async def sweeps(port: int) -> float:
    """The successful sweeps of this replica (enkwatch_discovery_sweeps_total)."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    prefix = 'enkwatch_discovery_sweeps_total{kind="redteam"} '
    return sum(
        float(line.removeprefix(prefix)) for line in text.splitlines() if line.startswith(prefix)
    )


async def test_three_replicas_add_each_discovered_job_once(
    tmp_path: Path, dsn: str, sim: tuple[str, ListGate], enkwatch: Spawn
) -> None:
    url, gate = sim
    doc = {
        "api": {"base_url": url, "timeout_seconds": 2},
        "polling": {"interval_seconds": 0.2, "jitter": 0.1, "max_requests_per_second": 0,
                    "max_backoff_seconds": 0.5},
        "state": {"path": dsn, "lease_seconds": 3.0},
        "discover": [{"kind": "redteam", "statuses": ["Queued", "Running"],
                      "every_seconds": 0.3, "match": {"test_name": "nightly-*"}}],
    }  # fmt: skip
    cfg = tmp_path / "replica.yaml"
    cfg.write_text(yaml.safe_dump(doc), encoding="utf-8")
    runs: list[Run] = []
    replicas = [Replica(enkwatch, cfg, free_port(), runs) for _ in range(3)]
    for replica in replicas:
        await replica.start()
    for replica in replicas:
        await replica.wait_started()

    async def balanced() -> bool:
        rows = await query(
            dsn,
            "SELECT count(DISTINCT owner) AS n FROM enkwatch_partition_lease "
            "WHERE expires_at > now() AND owner IS NOT NULL",
        )
        return bool(rows) and rows[0]["n"] == 3

    await until(balanced, "three replicas sharing the partitions", 60, every=0.1)
    gate.open = True

    async def all_done() -> bool:
        rows = await query(
            dsn, "SELECT count(*) AS n FROM enkwatch_tasks WHERE outcome IS NOT NULL"
        )
        return bool(rows) and rows[0]["n"] >= N_JOBS

    await until(all_done, "every job found and finished", 60, every=0.1)
    swept = [await sweeps(r.admin_port) for r in replicas]
    for replica in replicas:
        assert await replica.stop() == 0

    # the shared state: each job stored once, found by discovery, its journal without gaps
    tasks = await query(dsn, "SELECT task_key, spec, outcome FROM enkwatch_tasks")
    assert sorted(t["task_key"] for t in tasks) == sorted(KEYS)
    for task in tasks:
        assert json.loads(task["spec"])["source"] == "discovered"
        assert task["outcome"] == "Finished"
    rows = await query(dsn, "SELECT task_key, seq, status FROM enkwatch_events ORDER BY 1, 2")
    for key, group in itertools.groupby(rows, key=lambda r: r["task_key"]):
        journal = list(group)
        assert [r["seq"] for r in journal] == [1, 2, 3, 4], key
        assert [r["status"] for r in journal] == [None, "Queued", "Running", "Finished"], key

    # every replica's stdout: one task.discovered per job, each transition once
    events = [e for run in runs for e in run.events]
    discovered = Counter(e["task_key"] for e in events if e["event"] == "task.discovered")
    assert discovered == Counter(KEYS), discovered
    moves = Counter((e["task_key"], e["status"]) for e in events if e["event"] == "task.transition")
    expected = {(k, s) for k in KEYS for s in ("Queued", "Running", "Finished")}
    assert set(moves) == expected and set(moves.values()) == {1}, moves
    # the jobs were polled (and announced) by more than one replica; one replica swept
    announcers = {
        i for i, run in enumerate(runs) if any(e["event"] == "task.discovered" for e in run.events)
    }
    assert len(announcers) >= 2, announcers
    assert sum(1 for n in swept if n > 0) == 1, swept
