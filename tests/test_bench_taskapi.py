"""The task-API benchmark runs end to end (tiny N) and reports every figure; no timing asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_taskapi_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "taskapi.json"
    subprocess.run(
        [sys.executable, "-m", "bench.taskapi", "--n", "50", "--rounds", "1", "--json", str(out)],
        cwd=ROOT,
        check=True,
        timeout=110,
        capture_output=True,
    )
    figures = json.loads(out.read_text())
    assert {
        "n",
        "post_total_s",
        "post_mean_ms",
        "healthz_p50_ms",
        "healthz_p99_ms",
        "get_tasks_round_s",
    } <= figures.keys()
    assert figures["n"] == 50
