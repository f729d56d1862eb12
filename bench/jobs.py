"""Requests per watched job: `python -m bench.jobs [--quick | --smoke] [--json PATH]`.

The real `enkwatch run` watches N jobs that come and go (`bench/jobserver.py`: about N
active at any time, each Queued for minutes, then Running for hours (red-team) or about
half an hour (dataset), then Finished; new ones created at the rate old ones end), at the
default budget: 5 requests/s, a 30 s interval, 150 requests per interval. Configurations:

- `redteam+discovery`: a `discover:` entry of kind redteam (Queued and Running, every 60 s,
  the default);
- `dataset+discovery`: the same for kind dataset;
- `dataset per-job`: every job listed under `tasks:` by its task id, polled on its own.

Time is scaled by `scale` (the interval, the sweep period, the jobs' phases divided by it,
the rate multiplied by it), which keeps the budget of 150 requests per interval. The daemon
first takes in the jobs without a rate limit (the first sweep, the first polls), then a
reload sets the budget; after it settles, a window of W intervals is measured:

- `requests_per_job_interval`: the API requests the server counted in the window, per
  active job per interval;
- `detected_share`: the share of the window's transitions (a job created, Queued ->
  Running, Running -> Finished) whose `task.transition` came within one interval plus one
  sweep: `interval x (1 + jitter) + every_seconds + the time a sweep takes at the rate
  (its pages / rate) + 10% of an interval` (for per-job polling: without the sweep terms);
- `jobs_within_budget`: the largest N probed whose share is >= 99%. The search starts at
  the target N, goes 1.3 times up (or down) until one N passes and one fails, then halves
  the gap: 2 probes per configuration with `--quick`, 3 in the full run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from bench.jobserver import GET_PATHS, LIST_PATHS, Job, name, population, task_id
from bench.measure import percentile

ROOT: Final = Path(__file__).resolve().parent.parent
INTERVAL_S: Final = 30.0
RATE: Final = 5.0
SWEEP_S: Final = 60.0  # discover: every_seconds, its default
JITTER: Final = 0.1
BUDGET: Final = RATE * INTERVAL_S  # requests per interval
SHARE: Final = 0.99
SLACK: Final = 0.1  # of an interval: a request's own time, the machine's pauses
API_KEY: Final = "bench-jobs-key"
SEED: Final = 10
CONFIGS: Final = ("redteam+discovery", "dataset+discovery", "dataset per-job")
TARGETS: Final = {"redteam+discovery": 10_000, "dataset+discovery": 2_000, "dataset per-job": 150}


@dataclass(frozen=True)
class JobsPlan:
    scale: float  # time runs this many times faster than the wall clock
    settle_intervals: float  # after the budget is set, before the window
    window_intervals: float  # with discovery (many transitions per interval)
    perjob_window_intervals: float  # per-job polling: ~150 jobs, few transitions each interval
    probes: int  # per configuration: the first N, then up or down, then halfway
    starts: dict[str, int]  # the first N probed, per configuration


PLANS: Final = {
    "full": JobsPlan(10.0, 2.0, 8.0, 15.0, 3, dict(TARGETS)),
    "quick": JobsPlan(15.0, 2.0, 5.0, 15.0, 2, dict(TARGETS)),
    # seconds: proves the harness works (tests/test_bench_jobs.py), measures nothing
    "smoke": JobsPlan(
        30.0,
        1.0,
        3.0,
        3.0,
        1,
        {"redteam+discovery": 300, "dataset+discovery": 200, "dataset per-job": 20},
    ),
}
# the next N after a first probe: this many times more (it passed) or less (it did not)
STEP: Final = 1.3


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENKWATCH_")}
    env["ENKRYPTAI_API_KEY"] = API_KEY
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


class Events:
    """The daemon's stdout, read by a thread: each transition's (task_key, status) -> time."""

    def __init__(self, stream: Any) -> None:
        self.seen: dict[tuple[str, str], float] = {}
        self.keys: set[str] = set()
        self.reloaded = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            name_ = event.get("event")
            if name_ == "task.transition":
                at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                self.seen.setdefault((event["task_key"], event["status"]), at.timestamp())
                self.keys.add(event["task_key"])
            elif name_ == "config.reloaded":
                self.reloaded.set()

    def join(self) -> None:
        self._thread.join(10)


def _stats(port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as resp:
        counts: dict[str, int] = json.loads(resp.read())
    return counts


def _config(kind: str, discovery: bool, port: int, rate: float, scale: float,
            state: Path, tasks: list[dict[str, str]]) -> dict[str, Any]:  # fmt: skip
    doc: dict[str, Any] = {
        "api": {"base_url": f"http://127.0.0.1:{port}", "timeout_seconds": 10},
        "polling": {
            "interval_seconds": INTERVAL_S / scale,
            "jitter": JITTER,
            "max_requests_per_second": rate,
            "max_backoff_seconds": INTERVAL_S / scale,
        },
        "state": {"path": str(state)},
        "tasks": tasks,
    }
    if discovery:
        doc["discover"] = [
            {"kind": kind, "statuses": ["Queued", "Running"], "every_seconds": SWEEP_S / scale}
        ]
    return doc


def _key(kind: str, discovery: bool, job: Job) -> str:
    if kind == "redteam":
        return f"redteam:{task_id(kind, job.i)}"
    return f"dataset:{name(kind, job.i)}" if discovery else task_id(kind, job.i)


def _transitions(job: Job) -> list[tuple[str, float]]:
    """Each status the job enters and when (real seconds from t0)."""
    return [("Queued", job.created), ("Running", job.running), ("Finished", job.finished)]


def probe(config: str, n: int, plan: JobsPlan, tmp: Path) -> dict[str, Any]:
    """One N of one configuration: start the server and the daemon, measure, stop both."""
    kind = "redteam" if config.startswith("redteam") else "dataset"
    discovery = "discovery" in config
    k = plan.scale
    interval = INTERVAL_S / k
    # enough jobs for the warm-up (at most 2 minutes), the settling, the window and its tail
    window = plan.window_intervals if discovery else plan.perjob_window_intervals
    horizon_s = (120.0 + (plan.settle_intervals + window + 4.0) * interval) * k
    t0 = time.time()
    spec = {"kind": kind, "n": n, "seed": SEED, "scale": k, "t0": t0, "horizon_s": horizon_s}
    jobs = population(kind, n, SEED, horizon_s)
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.jobserver", json.dumps(spec)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env(),
    )  # fmt: skip
    daemon: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        # per-job polling: the jobs active at the start, by task id (none come later)
        tasks = (
            [] if discovery else [{"task_id": task_id(kind, j.i)} for j in jobs if j.created <= 0]
        )
        state = tmp / f"{config.replace(' ', '-')}-{n}.db"
        cfg = tmp / f"{config.replace(' ', '-')}-{n}.json"
        cfg.write_text(json.dumps(_config(kind, discovery, port, 0, k, state, tasks)))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "enkwatch", "run", "--config", str(cfg)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(),
        )  # fmt: skip
        events = Events(daemon.stdout)
        # warm-up, without a rate limit: every active job found (or first polled)
        warm_began = time.monotonic()
        while time.monotonic() - warm_began < 120:
            now = (time.time() - t0) * k
            active = sum(1 for j in jobs if j.created <= now < j.finished)
            if len(events.keys) >= 0.98 * active:
                break
            time.sleep(0.2)
        warm_up_s = time.monotonic() - warm_began
        cfg.write_text(json.dumps(_config(kind, discovery, port, RATE * k, k, state, tasks)))
        daemon.send_signal(signal.SIGHUP)
        if not events.reloaded.wait(30):
            raise RuntimeError("the daemon did not reload its config")
        time.sleep(plan.settle_intervals * interval)
        w0, before = time.time(), _stats(port)
        time.sleep(window * interval)
        w1, after = time.time(), _stats(port)
        lists = after.get(LIST_PATHS[kind], 0) - before.get(LIST_PATHS[kind], 0)
        gets = after.get(GET_PATHS[kind], 0) - before.get(GET_PATHS[kind], 0)
        intervals = (w1 - w0) / interval
        sweeps = (w1 - w0) / (SWEEP_S / k)
        sweep_s = lists / sweeps / (RATE * k) if discovery else 0.0
        bound = interval * (1 + JITTER) + SLACK * interval
        if discovery:
            bound += SWEEP_S / k + sweep_s
        time.sleep(bound)  # the detections of the window's last transitions
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        events.join()
    finally:
        for proc in (daemon, server):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    watched = [j for j in jobs if discovery or j.created <= 0]
    active = sum(
        1 for j in watched if j.created <= (w0 - t0) * k < j.finished
    )  # at the window's start
    latencies: list[float] = []
    missed = 0
    for job in watched:
        key = _key(kind, discovery, job)
        for status, at_s in _transitions(job):
            at = t0 + at_s / k
            if not w0 <= at < w1:
                continue
            seen = events.seen.get((key, status))
            if seen is None:
                missed += 1
            else:
                latencies.append(max(0.0, seen - at))
    in_bound = sum(1 for lat in latencies if lat <= bound)
    total = len(latencies) + missed
    ordered = sorted(latencies)
    return {
        "n": n,
        "active_jobs": active,
        "requests": lists + gets,
        "list_requests": lists,
        "get_requests": gets,
        "requests_per_job_interval": (lists + gets) / max(active, 1) / intervals,
        "requests_per_interval": (lists + gets) / intervals,
        "transitions": total,
        "detected_share": in_bound / total if total else 1.0,
        "missed": missed,
        # in real (unscaled) seconds
        "bound_s": bound * k,
        "sweep_s": sweep_s * k,
        "latency_p50_s": percentile(ordered, 50) * k,
        "latency_p99_s": percentile(ordered, 99) * k,
        "latency_max_s": (ordered[-1] if ordered else float("nan")) * k,
        "warm_up_s": warm_up_s,
    }


def search(config: str, plan: JobsPlan, tmp: Path, log: Any) -> list[dict[str, Any]]:
    """The probes of one configuration: the first N, then STEP times more (or less) until
    one passes and one fails, then halfway between them."""
    probes: list[dict[str, Any]] = []
    n = plan.starts[config]
    for _ in range(plan.probes):
        print(f"requests per job: {config}, N = {n:,} ...", file=log, flush=True)
        probes.append(probe(config, n, plan, tmp))
        good = [p["n"] for p in probes if p["detected_share"] >= SHARE]
        bad = [p["n"] for p in probes if p["detected_share"] < SHARE]
        lo, hi = max(good, default=None), min(bad, default=None)
        if lo is not None and hi is not None:
            n = (lo + hi) // 2
        else:
            n = round(n * STEP) if hi is None else round(n / STEP)
        n = max(10, round(n, -1) if n < 1000 else round(n, -2))
        if n in (p["n"] for p in probes):
            break
    return probes


def run(plan: JobsPlan, log: Any = None) -> dict[str, Any]:
    """Every configuration's ladder; returns the figures (JSON-ready)."""
    out: dict[str, Any] = {
        "scale": plan.scale,
        "interval_s": INTERVAL_S,
        "max_requests_per_second": RATE,
        "budget_requests_per_interval": BUDGET,
        "scaled_interval_s": INTERVAL_S / plan.scale,
        "scaled_max_requests_per_second": RATE * plan.scale,
        "window_intervals": plan.window_intervals,
        "perjob_window_intervals": plan.perjob_window_intervals,
        "configs": {},
    }
    with tempfile.TemporaryDirectory(prefix="enkwatch-bench-jobs-") as tmp:
        for config in CONFIGS:
            probes = search(config, plan, Path(tmp), log or sys.stderr)
            passed = [p for p in probes if p["detected_share"] >= SHARE]
            best = max(passed, key=lambda p: p["n"]) if passed else None
            out["configs"][config] = {
                "jobs_within_budget": best["n"] if best is not None else 0,
                "requests_per_job_interval": (best or probes[0])["requests_per_job_interval"],
                "detected_share": (best or probes[0])["detected_share"],
                "probes": probes,
            }
    return out


def table(result: dict[str, Any]) -> str:
    lines = [
        f"requests per watched job (5 requests/s, 30 s interval: 150 requests per interval; "
        f"time scaled x{result['scale']:g}: interval {result['scaled_interval_s']:g} s, "
        f"{result['scaled_max_requests_per_second']:g} requests/s)"
    ]
    for config, figures in result["configs"].items():
        lines.append(
            f"  {config:<18} jobs within budget {figures['jobs_within_budget']:>7,}   "
            f"{figures['requests_per_job_interval']:.4f} requests/job/interval"
        )
        for p in figures["probes"]:
            lines.append(
                f"    N={p['n']:>6,}: {p['requests_per_interval']:6.1f} req/interval, "
                f"{p['requests_per_job_interval']:.4f} req/job/interval, detected "
                f"{p['detected_share']:.1%} of {p['transitions']} within {p['bound_s']:.0f} s "
                f"(p50/p99/max {p['latency_p50_s']:.0f}/{p['latency_p99_s']:.0f}/"
                f"{p['latency_max_s']:.0f} s)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.jobs", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer N, time scaled x15 (~3 min)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "quick" if args.quick else "full"]
    result = run(plan)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
