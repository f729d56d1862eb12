"""Start-up and RSS per watched task alone, in a minute or two: `python -m bench.startmem`.

The full benchmark's N = 100,000 run takes ~9 minutes; this runs only the parts its
`startup_s` and `rss_bytes_per_task` come from, with the same worker (`bench.worker`): a
fresh enkwatch process with N tasks against `bench.server`, start-up (config parsed, state
loaded, all scheduled), the first round of polls, a short saturation window, then a window
at 70% of that rate, whose RSS peak less the RSS before the tasks, over N, is the figure.

To measure older code (bisecting), `--tree /old/worktree` runs that tree's own
`bench.worker` and `bench.server` on its own `enkwatch` package (their command protocol is
the same since the benchmark began; the worker of this tree does not drive older code).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import bench.run
from bench.run import LOAD_FRACTION, POOL, TINY_INTERVAL_S, Child, Server


def _use_tree(tree: Path) -> None:
    """Children started from now on import `bench` and `enkwatch` from `tree`.

    `Child` runs `python -m` in `bench.run.ROOT` with it first on PYTHONPATH."""
    bench.run.ROOT = tree
    os.environ["PYTHONPATH"] = str(tree / "daemon")


def measure(n: int, window_s: float, load_window_s: float) -> dict[str, Any]:
    """One fresh enkwatch process of `n` tasks: start-up, first round, RSS at 70% load."""
    server = Server()
    enk = Child("bench.worker", "enkwatch")
    try:
        with tempfile.TemporaryDirectory(prefix="enkwatch-startmem-") as tmp:
            start = enk.call(
                "start",
                n=n,
                port=server.port,
                pool=POOL,
                state_path=str(Path(tmp) / "state.db"),
                events_path=str(Path(tmp) / "events.jsonl"),
            )
            first = enk.call("first_round", answer_within_s=200, timeout_s=180)
            enk.call("schedule", interval_s=TINY_INTERVAL_S, spread_s=0.0)
            sat = enk.call("saturate", window_s=window_s)
            rate = sat["count"] / sat["wall_s"]
            interval = n / (LOAD_FRACTION * rate)
            enk.call("schedule", interval_s=interval, spread_s=interval)
            load = enk.call("load", window_s=load_window_s, settle_s=0.5)
            enk.call("stop", answer_within_s=60)
            enk.proc.wait(10)
    finally:
        enk.kill()
        server.close()
    before = start["rss_before_bytes"]
    return {
        "n": n,
        "startup_s": start["startup_s"],
        "config_parse_s": start["config_parse_s"],
        "service_ready_s": start["service_ready_s"],
        "first_round_s": first["first_round_s"],
        "rss_before_bytes": before,
        "rss_bytes_per_task_first_round": (first["rss_bytes"] - before) / n,
        "rss_bytes_per_task": (load["rss_bytes"] - before) / n,
        "polls_per_s": rate,
        "load_polls_per_s": load["count"] / load["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startmem", description=__doc__)
    parser.add_argument("--n", type=int, default=100_000, help="watched tasks (100,000)")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes, one after another")
    parser.add_argument("--window", type=float, default=1.5, help="saturation window, s")
    parser.add_argument("--load-window", type=float, default=4.0, help="70%% load window, s")
    parser.add_argument("--json", action="store_true", help="one JSON line per run")
    parser.add_argument("--tree", type=Path, help="measure the code of this worktree instead")
    args = parser.parse_args(argv)
    if args.tree is not None:
        _use_tree(args.tree.resolve())
    for _ in range(args.runs):
        load_before = os.getloadavg()[0]
        out = measure(args.n, args.window, args.load_window)
        out["loadavg_1m"] = [load_before, os.getloadavg()[0]]
        if args.json:
            print(json.dumps(out), flush=True)
            continue
        print(
            f"N={out['n']:,}  start-up {out['startup_s']:.2f} s "
            f"(parse {out['config_parse_s']:.2f} + ready {out['service_ready_s']:.2f})  "
            f"RSS/task {out['rss_bytes_per_task']:,.0f} B at 70% load "
            f"({out['rss_bytes_per_task_first_round']:,.0f} B after the first round, "
            f"{out['first_round_s']:.1f} s)  {out['polls_per_s']:,.0f} polls/s  "
            f"load avg {load_before:.2f} -> {out['loadavg_1m'][1]:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
