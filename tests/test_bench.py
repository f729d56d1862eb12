"""The benchmark harness runs end to end (in its smallest mode) and reports every figure.

No timing is asserted here: the figures depend on the machine. `python -m bench` (or
`--quick`) is what measures; this only proves the harness works.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUN_KEYS = {
    "n",
    "polls_per_s_ratio",
    "cpu_per_poll_ratio",
    "lateness_p99_ms",
    "rss_bytes_per_task",
    "overload_rss_ratio",
    "startup_s",
    "idle_core_fraction",
    "event_cpu_share",
    # a few of the raw figures they come from
    "bare_requests_per_s",
    "polls_per_s",
    "cpu_per_poll_us",
    "bare_cpu_per_request_us",
    "first_round_s",
    "add_us_p99",
}


@pytest.mark.timeout(200)
def test_smoke_run_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=190,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"cores", "versions", "runs", "design", "render", "targets"} <= result.keys()
    assert result["cores"] >= 1
    assert result["versions"]["enkwatch"]
    (run,) = result["runs"]
    assert run.keys() >= RUN_KEYS
    assert run["polls_per_s"] > 0
    assert run["first_round_complete"] is True
    assert run["exit_code"] == 0
    assert result["design"]["aps_polls_per_s"] > 0
    assert result["render"]["events"] > 0
    assert result["sinks"]["events_per_s_sinks"] > 0
    assert result["sinks"]["deliveries_per_s"] > 0
    jobs = result["jobs"]["configs"]
    for config in ("redteam+discovery", "dataset+discovery", "dataset per-job"):
        assert jobs[config]["jobs_within_budget"] > 0
        assert jobs[config]["requests_per_job_interval"] > 0
    assert any(v["target"].startswith("redteam + discovery") for v in result["targets"])
    # the tables went to stdout, beside the JSON
    assert "polls/s ratio to bare" in proc.stdout
    assert "jobs within budget" in proc.stdout


DELIVERIES_SMOKE = ("--events", "60", "--rounds", "1", "--profile", "--floor")


@pytest.mark.timeout(120)
def test_the_deliveries_harness_reports_each_phase_and_the_floors() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.deliveries", *DELIVERIES_SMOKE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["best"]["deliveries"] == 180
    assert {"select rows", "render", "aiohttp POST + answer", "delete rows"} <= set(
        result["phases_us_per_delivery"]
    )
    assert len(result["floor_cpu_per_post_us"]) == len(result["raw_protocol_cpu_per_post_us"]) == 1
