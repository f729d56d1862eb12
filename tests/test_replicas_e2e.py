"""Several replicas on one real PostgreSQL, as real processes, under chaos.

After each scenario the database and the replicas' stdout must show: no duplicate
(task, seq), no gap in seq, no repeated consecutive status, every task's last event equal
to its stored status, every committed event written to some stdout (the same event_id
written twice only with the same content), and the webhook outbox delivered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from tests.kit import (
    SECRET,
    Receiver,
    Run,
    Spawn,
    StartReceiver,
    StartSim,
    free_port,
    sim_task,
    until,
)
from tests.pgkit import HOW_TO_ENABLE, find_bin_dir

BIN = find_bin_dir()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(BIN is None, reason=HOW_TO_ENABLE)]

TOKEN = "admin-token-replicas"
LEASE_S = 3.0  # renew every 1 s, stop polling 2 s after the last renewal
N_TASKS = 30


class Replica:
    """One `enkwatch run` process, started through the kit (its stdout kept by `Run`)."""

    def __init__(self, spawn: Spawn, cfg: Path, admin_port: int, runs: list[Run]) -> None:
        self.spawn = spawn
        self.runs = runs
        self.cfg = cfg
        self.admin_port = admin_port
        self.run: Run | None = None

    async def start(self) -> None:
        self.run = await self.spawn(
            "run",
            "--config",
            str(self.cfg),
            ENKWATCH_ADMIN_TOKEN=TOKEN,
            ENKWATCH_ADMIN__LISTEN=f"127.0.0.1:{self.admin_port}",
        )
        self.runs.append(self.run)

    async def wait_emitted(self, within_s: float = 30.0) -> None:
        """Until the replica has written at least one transition of its own."""
        assert self.run is not None
        await self.run.wait_for(lambda e: e["event"] == "task.transition", "a transition", within_s)

    async def wait_started(self, within_s: float = 30.0) -> None:
        """Until the replica has written `daemon.started` (signals and admin are set up)."""
        assert self.run is not None
        await self.run.wait_for(lambda e: e["event"] == "daemon.started", "its start", within_s)

    @property
    def pid(self) -> int:
        assert self.run is not None
        return self.run.proc.pid

    @property
    def running(self) -> bool:
        return self.run is not None and self.run.proc.returncode is None

    async def stop(self) -> int:
        assert self.run is not None
        if self.run.proc.returncode is None:
            self.run.send(signal.SIGTERM)
        return await self.run.wait_exit(15)

    async def kill(self) -> None:
        assert self.run is not None
        self.run.kill()
        await self.run.wait_exit()


class Cluster:
    def __init__(
        self, spawn: Spawn, tmp: Path, dsn: str, base_url: str, hook_url: str, n: int = 3
    ) -> None:
        self.spawn = spawn
        self.tmp = tmp
        self.dsn = dsn
        self.runs: list[Run] = []  # every replica ever started, for their stdout
        cfg = {
            "api": {"base_url": base_url, "timeout_seconds": 2},
            "polling": {
                "interval_seconds": 0.1,
                "jitter": 0.1,
                "max_requests_per_second": 0,
                "max_backoff_seconds": 0.5,
            },
            "state": {"path": dsn, "lease_seconds": LEASE_S},
            "sinks": {"webhooks": [{"url": hook_url, "events": ["task.transition"]}]},
            "tasks": [{"task_id": f"t{i:02d}"} for i in range(N_TASKS)],
        }
        self.cfg = tmp / "replica.yaml"
        self.cfg.write_text(yaml.safe_dump(cfg))
        self.replicas = [self.new_replica(i) for i in range(n)]

    def new_replica(self, i: int) -> Replica:
        return Replica(self.spawn, self.cfg, free_port(), self.runs)

    async def start(self) -> None:
        for replica in self.replicas:
            await replica.start()
        for replica in self.replicas:
            await replica.wait_started()

    async def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def wait_until(self, sql: str, predicate: Any, within_s: float = 60.0) -> None:
        async def holds() -> bool:
            try:
                return bool(predicate(await self.query(sql)))
            except asyncpg.UndefinedTableError:
                return False  # no replica has created the tables yet

        await until(holds, sql, within_s, every=0.1)

    async def wait_balanced(self) -> None:
        """Until every running replica holds a share of the partitions."""
        n = sum(1 for r in self.replicas if r.running)
        await self.wait_until(
            "SELECT count(DISTINCT owner) AS n FROM enkwatch_partition_lease "
            "WHERE expires_at > now() AND owner IS NOT NULL",
            lambda r: r[0]["n"] == n,
        )

    async def wait_events(self, at_least: int) -> None:
        await self.wait_until(
            "SELECT count(*) AS n FROM enkwatch_events", lambda r: r[0]["n"] >= at_least
        )

    async def wait_all_done(self, n_tasks: int = N_TASKS) -> None:
        await self.wait_until(
            "SELECT count(*) AS n FROM enkwatch_tasks WHERE outcome IS NOT NULL AND NOT removed",
            lambda r: r[0]["n"] >= n_tasks,
        )

    async def stop_all(self) -> list[int]:
        """SIGTERM to every replica, once the running ones have delivered the outbox.

        A SIGTERM does not wait for the outbox (what is left is delivered on the next start),
        so the deliveries are awaited while the replicas still run.
        """
        await self.wait_delivered()
        codes = [await r.stop() for r in self.replicas]
        for replica in self.replicas:
            assert replica.run is not None
            assert "Traceback" not in replica.run.stderr, replica.run.stderr
        return codes

    async def wait_delivered(self) -> None:
        await self.wait_until(
            "SELECT count(*) AS n FROM enkwatch_outbox WHERE state = 'pending'",
            lambda r: r[0]["n"] == 0,
        )

    def stdout_events(self) -> list[dict[str, Any]]:
        events = []
        for run in self.runs:
            for line in run.lines:
                assert SECRET not in line
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    # a process killed mid-line leaves a torn last line; nothing else may be
                    assert line == run.lines[-1]
        return events

    async def check_invariants(self, receiver: Receiver) -> None:
        for run in self.runs:
            await run.wait_exit()  # every process is gone: its stdout is complete
        rows = await self.query(
            "SELECT task_key, seq, status, body, written FROM enkwatch_events "
            "ORDER BY task_key, seq"
        )
        tasks = {
            r["task_key"]: r
            for r in await self.query("SELECT task_key, seq, last_status FROM enkwatch_tasks")
        }
        by_task: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_task.setdefault(row["task_key"], []).append(row)
        for key, events in by_task.items():
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(1, len(seqs) + 1)), (key, seqs)  # no gap, no duplicate
            assert tasks[key]["seq"] == seqs[-1]
            statuses = [e["status"] for e in events if e["status"] is not None]
            assert all(a != b for a, b in itertools.pairwise(statuses)), statuses
            if statuses:
                assert statuses[-1] == tasks[key]["last_status"]
            assert all(e["written"] for e in events), key
        # every committed event reached some stdout; a repeat only with the same content
        printed: dict[str, dict[str, Any]] = {}
        for event in self.stdout_events():
            if "event_id" not in event:
                continue
            if event["event_id"] in printed:
                assert printed[event["event_id"]] == event
            printed[event["event_id"]] = event
        for row in rows:
            event_id = f"{row['task_key']}:{row['seq']}"
            assert event_id in printed, f"{event_id} was committed but never written"
            assert printed[event_id] == json.loads(row["body"])
        # the webhook outbox was delivered (at least once each) before the replicas stopped
        pending = await self.query(
            "SELECT count(*) AS n FROM enkwatch_outbox WHERE state = 'pending'"
        )
        assert pending[0]["n"] == 0
        delivered = {b["event_id"] for b in receiver.bodies}
        transitions = {f"{r['task_key']}:{r['seq']}" for r in rows if r["status"] is not None}
        assert transitions <= delivered


@pytest.fixture
async def env(
    tmp_path: Path, dsn: str, simulate: StartSim, enkwatch: Spawn, hooks: StartReceiver
) -> tuple[Cluster, Receiver]:
    tasks = [
        sim_task(
            f"t{i:02d}",
            ("Queued", 1.5),
            ("Running", 6.0),
            ("Failed" if i % 5 == 0 else "Finished", None),
        )
        for i in range(N_TASKS)
    ]
    tasks.append(sim_task("extra", ("Queued", 1.0), ("Running", 1.0), ("Finished", None)))
    receiver = await hooks(status=200)
    sim = await simulate(*tasks)
    # what is left running at the end is killed by the `enkwatch` fixture
    return Cluster(enkwatch, tmp_path, dsn, sim.url, receiver.url), receiver


@pytest.mark.timeout(120)
async def test_kill_9_of_a_replica(env: tuple[Cluster, Receiver]) -> None:
    cluster, receiver = env
    await cluster.start()
    await cluster.wait_balanced()
    await cluster.wait_events(N_TASKS // 2)
    victim = cluster.replicas[0]
    await victim.wait_emitted()
    await victim.kill()
    cluster.replicas = cluster.replicas[1:]
    await cluster.wait_all_done()
    # the survivors' metrics show the takeover
    takeovers = 0.0
    owned = 0.0
    async with aiohttp.ClientSession() as http:
        for replica in cluster.replicas:
            async with http.get(f"http://127.0.0.1:{replica.admin_port}/metrics") as resp:
                for line in (await resp.text()).splitlines():
                    if line.startswith("enkwatch_partition_takeover_seconds_count"):
                        takeovers += float(line.split()[-1])
                    if line.startswith("enkwatch_partitions_owned "):
                        owned += float(line.split()[-1])
    assert takeovers >= 1, (takeovers, owned)
    assert owned == 64
    assert await cluster.stop_all() == [0, 0]
    await cluster.check_invariants(receiver)


@pytest.mark.timeout(120)
async def test_a_frozen_replica_past_its_lease_does_not_split_the_brain(
    env: tuple[Cluster, Receiver],
) -> None:
    cluster, receiver = env
    await cluster.start()
    await cluster.wait_balanced()
    await cluster.wait_events(N_TASKS // 2)
    frozen = cluster.replicas[1]
    await frozen.wait_emitted()
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        # the others take its partitions over once its lease has expired
        await asyncio.sleep(LEASE_S + 1.5)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    await cluster.wait_all_done()
    assert await cluster.stop_all() == [0, 0, 0]
    await cluster.check_invariants(receiver)


@pytest.mark.timeout(150)
async def test_rolling_sigterm_restarts(env: tuple[Cluster, Receiver]) -> None:
    cluster, receiver = env
    await cluster.start()
    await cluster.wait_balanced()
    for i in range(len(cluster.replicas)):
        assert await cluster.replicas[i].stop() == 0
        cluster.replicas[i] = cluster.new_replica(10 + i)
        await cluster.replicas[i].start()
        await cluster.replicas[i].wait_started()
        await cluster.wait_balanced()
    await cluster.wait_all_done()
    assert await cluster.stop_all() == [0, 0, 0]
    await cluster.check_invariants(receiver)


@pytest.mark.timeout(120)
async def test_terminated_database_connections(env: tuple[Cluster, Receiver]) -> None:
    cluster, receiver = env
    await cluster.start()
    await cluster.wait_events(N_TASKS // 3)
    for replica in cluster.replicas[:2]:
        await cluster.query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
            f"%-{replica.pid}-%",
        )
    await cluster.wait_all_done()
    assert await cluster.stop_all() == [0, 0, 0]
    await cluster.check_invariants(receiver)


@pytest.mark.timeout(120)
async def test_tasks_added_and_removed_at_run_time_reach_every_replica(
    env: tuple[Cluster, Receiver],
) -> None:
    cluster, receiver = env
    await cluster.start()
    await cluster.wait_events(5)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    first, _, last = cluster.replicas
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{first.admin_port}/tasks"
        async with http.post(url, json={"task_id": "extra"}, headers=auth) as resp:
            assert resp.status == 201, await resp.text()
        # whichever replica owns its partition polls it to the end
        await cluster.wait_until(
            "SELECT outcome FROM enkwatch_tasks WHERE task_key = 'extra'",
            lambda r: r and r[0]["outcome"] == "Finished",
        )
        # removed through another replica: the shared list no longer has it
        url = f"http://127.0.0.1:{last.admin_port}/tasks/t00"
        async with http.delete(url, headers=auth) as resp:
            assert resp.status == 204
        async with http.get(f"http://127.0.0.1:{first.admin_port}/tasks") as resp:
            listed = {t["task_key"] for t in (await resp.json())["tasks"]}
        assert "extra" in listed and "t00" not in listed
    await cluster.wait_all_done(N_TASKS - 1)
    assert await cluster.stop_all() == [0, 0, 0]
    await cluster.check_invariants(receiver)
