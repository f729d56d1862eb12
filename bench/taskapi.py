"""The task API at scale: N POSTs one after the other, then /healthz during GET /tasks storms.

Run as `python -m bench.taskapi [--n 10000] [--json PATH]`. The real `enkwatch run` serves
the admin API (SQLite state in a file); `bench.server` is the Enkrypt API (every task
Running; each added task is polled on its interval of an hour). Figures:

* `post_total_s`: N POST /tasks, one after the other, on one keep-alive connection (each
  task is polled once when added, as in production);
* `healthz_p50_ms` / `healthz_p99_ms`: the latency of /healthz, asked every 10 ms while
  rounds of 20 concurrent GET /tasks (N tasks each) are under way;
* `get_tasks_round_s`: how long one such round of 20 took, on average.
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
from pathlib import Path
from typing import Any

import aiohttp

API_KEY = "sk-bench-taskapi"
TOKEN = "bench-admin-token"
STORM = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(n: int, rounds: int) -> dict[str, Any]:
    """Start the API and the daemon, measure, stop both."""
    tmp = Path(tempfile.mkdtemp(prefix="enkwatch-bench-taskapi-"))
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.server"], stdout=subprocess.PIPE, text=True
    )
    daemon: subprocess.Popen[bytes] | None = None
    try:
        assert server.stdout is not None
        api_port = int(server.stdout.readline().split()[1])
        port = _free_port()
        config = {
            "api": {"base_url": f"http://127.0.0.1:{api_port}", "timeout_seconds": 10},
            "polling": {"interval_seconds": 3600, "max_requests_per_second": 0},
            "state": {"path": str(tmp / "state.db")},
            "admin": {"listen": f"127.0.0.1:{port}"},
            "tasks": [],
        }
        cfg = tmp / "watch.json"
        cfg.write_text(json.dumps(config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENKWATCH_")}
        env |= {"ENKRYPTAI_API_KEY": API_KEY, "ENKWATCH_ADMIN_TOKEN": TOKEN}
        daemon = subprocess.Popen(
            [sys.executable, "-m", "enkwatch", "run", "--config", str(cfg)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return {"n": n, **asyncio.run(_observe(f"http://127.0.0.1:{port}", n, rounds))}
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
        server.terminate()
        server.wait(5)


async def _observe(base: str, n: int, rounds: int) -> dict[str, Any]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await _ready(http, base)
        started = time.perf_counter()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        for i in range(n):
            body = {"task_id": f"data-generation-bench-{i:06d}"}
            async with http.post(f"{base}/tasks", json=body, headers=headers) as resp:
                if resp.status != 201:
                    raise SystemExit(f"POST /tasks answered {resp.status}: {await resp.text()}")
        post_total_s = time.perf_counter() - started
        latencies: list[float] = []
        round_s: list[float] = []
        for _ in range(rounds):
            done = asyncio.Event()
            probe = asyncio.ensure_future(_probe(http, base, latencies, done))
            t0 = time.perf_counter()
            await asyncio.gather(*(_get_tasks(http, base, n) for _ in range(STORM)))
            round_s.append(time.perf_counter() - t0)
            done.set()
            await probe
    return {
        "post_total_s": round(post_total_s, 2),
        "post_mean_ms": round(post_total_s / n * 1000, 3),
        "healthz_samples": len(latencies),
        "healthz_p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
        "healthz_p99_ms": round(_percentile(latencies, 0.99) * 1000, 1),
        "get_tasks_round_s": round(sum(round_s) / len(round_s), 3),
    }


async def _ready(http: aiohttp.ClientSession, base: str) -> None:
    for _ in range(600):
        try:
            async with http.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("the daemon did not become ready")


async def _get_tasks(http: aiohttp.ClientSession, base: str, n: int) -> None:
    async with http.get(f"{base}/tasks") as resp:
        body = await resp.read()
    if resp.status != 200 or len(body) < n:
        raise SystemExit(f"GET /tasks answered {resp.status}")


async def _probe(
    http: aiohttp.ClientSession, base: str, latencies: list[float], done: asyncio.Event
) -> None:
    while not done.is_set():
        t0 = time.perf_counter()
        async with http.get(f"{base}/healthz") as resp:
            await resp.read()
        latencies.append(time.perf_counter() - t0)
        await asyncio.sleep(0.01)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.taskapi")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)
    result = measure(args.n, args.rounds)
    print(
        f"N={args.n:,}: {args.n:,} POST /tasks in {result['post_total_s']} s "
        f"({result['post_mean_ms']} ms each); /healthz during {STORM} concurrent GET /tasks: "
        f"p50 {result['healthz_p50_ms']} ms, p99 {result['healthz_p99_ms']} ms "
        f"({result['healthz_samples']} samples; a round took {result['get_tasks_round_s']} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
