"""Three replicas on one PostgreSQL at 10,000 tasks: polls/s and database commits per poll.

`python -m bench.replicas [--n 10000] [--replicas 3] [--window 10] [--json PATH]`

Starts the benchmark's API server and a throwaway PostgreSQL (initdb + pg_ctl in a temporary
directory, as the tests do), writes a JSON watch list of N tasks on a short interval, runs
the real `enkwatch run` as R processes against them, lets them balance the partitions, then
measures over a window: polls per second (from each replica's `/metrics`) and database
transactions committed (PostgreSQL's own `pg_stat_database.xact_commit`), first with every
task steady, then with one poll in ten a status change (the server flips the status).
Everything runs on this one machine: the server, PostgreSQL and the replicas share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
from tests.pgkit import HOW_TO_ENABLE, PgServer, find_bin_dir

API_KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counters(port: int) -> tuple[float, float]:
    """(polls, state commits) so far, from a replica's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    polls = commits = 0.0
    for line in text.splitlines():
        if line.startswith("enkwatch_polls_total{"):
            polls += float(line.split()[-1])
        elif line.startswith("enkwatch_state_commits_total "):
            commits += float(line.split()[-1])
    return polls, commits


async def _commits(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await conn.close()


async def _owners(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(DISTINCT owner) FROM enkwatch_partition_lease "
                "WHERE owner IS NOT NULL AND expires_at > now()"
            )
        )
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


def measure(n: int, replicas: int, window_s: float) -> dict[str, Any]:
    """Start everything, measure, stop everything."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        raise SystemExit(HOW_TO_ENABLE)
    tmp = Path(tempfile.mkdtemp(prefix="enkwatch-bench-replicas-"))
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.server", "--flip-every", "10"],
        stdout=subprocess.PIPE,
        text=True,
    )
    pg = PgServer(bin_dir)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        assert server.stdout is not None
        api_port = int(server.stdout.readline().split()[1])
        dsn = pg.start()
        config = {
            "api": {"base_url": f"http://127.0.0.1:{api_port}", "timeout_seconds": 10},
            # every task due all the time: the replicas poll as fast as they can
            "polling": {
                "interval_seconds": 0.05,
                "jitter": 0.1,
                "max_concurrency": 64,
                "max_requests_per_second": 0,
            },
            "state": {"path": dsn},
            "tasks": [{"task_id": f"data-generation-bench-{i:06d}"} for i in range(n)],
        }
        cfg = tmp / "watch.json"
        cfg.write_text(json.dumps(config))
        ports = [_free_port() for _ in range(replicas)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENKWATCH_")}
        env["ENKRYPTAI_API_KEY"] = API_KEY
        for port in ports:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "enkwatch", "run", "--config", str(cfg)],
                    env=env | {"ENKWATCH_ADMIN__LISTEN": f"127.0.0.1:{port}"},
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        runs = asyncio.run(_observe(dsn, ports, server, replicas, window_s, n))
        return {"n": n, "replicas": replicas, "window_s": window_s, "runs": runs}
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.terminate()
        pg.stop()


async def _observe(
    dsn: str,
    ports: list[int],
    server: subprocess.Popen[str],
    replicas: int,
    window_s: float,
    n_tasks: int,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 90
    while await _owners(dsn) < replicas:
        if time.monotonic() > deadline:
            raise SystemExit("the replicas did not balance within 90 s")
        await asyncio.sleep(0.5)
    # past the first round: every task's first transition is committed
    conn = await asyncpg.connect(dsn)
    try:
        while await conn.fetchval("SELECT count(*) FROM enkwatch_events") < n_tasks:
            if time.monotonic() > deadline + 120:
                raise SystemExit("the first round did not complete")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
    await asyncio.sleep(1)

    async def counters() -> tuple[float, float]:
        pairs = await asyncio.gather(*(asyncio.to_thread(_counters, p) for p in ports))
        return sum(p for p, _ in pairs), sum(c for _, c in pairs)

    async def window(label: str) -> dict[str, Any]:
        polls0, commits0 = await counters()
        xacts0 = await _commits(dsn)
        t0 = time.monotonic()
        await asyncio.sleep(window_s)
        polls1, commits1 = await counters()
        xacts = await _commits(dsn) - xacts0 - 2  # our own two reads
        wall = time.monotonic() - t0
        done = polls1 - polls0
        commits = commits1 - commits0
        return {
            "label": label,
            "polls_per_s": done / wall,
            # enkwatch's own write transactions (events, confirmations, leases, checkpoints)
            "commits_per_s": commits / wall,
            "commits_per_poll": commits / max(done, 1),
            # every transaction PostgreSQL counted, reads and the driver's resets included
            "pg_transactions_per_poll": xacts / max(done, 1),
        }

    steady = await window("steady")
    server.send_signal(signal.SIGUSR1)  # one answer in ten flips its task's status
    changing = await window("one poll in ten a transition")
    server.send_signal(signal.SIGUSR2)
    return [steady, changing]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    result = measure(args.n, args.replicas, args.window)
    for run in result["runs"]:
        print(
            f"{args.replicas} replicas, N={args.n:,}, {run['label']}: "
            f"{run['polls_per_s']:,.0f} polls/s, {run['commits_per_s']:,.1f} commits/s, "
            f"{run['commits_per_poll']:.4f} commits per poll "
            f"({run['pg_transactions_per_poll']:.3f} PostgreSQL transactions of any kind per poll)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
