"""The requests-per-watched-job benchmark runs end to end (smoke: small N, time scaled x30)
and reports every figure, per configuration; no figure is asserted beyond its shape (the
benchmark measures, `python -m bench.jobs` or `python -m bench --quick`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_jobs_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "jobs.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.jobs", "--smoke", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=140,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["scale"] == 30 and result["budget_requests_per_interval"] == 150
    assert set(result["configs"]) == {"redteam+discovery", "dataset+discovery", "dataset per-job"}
    for config, figures in result["configs"].items():
        assert figures["jobs_within_budget"] > 0, config
        assert 0 < figures["requests_per_job_interval"] < 2, config
        (probe,) = figures["probes"]
        assert probe["requests"] > 0 and probe["active_jobs"] > 0, config
        assert probe["detected_share"] >= 0.9, (config, probe)
    # discovery costs a fraction of a request per job; polling each job on its own, one
    assert result["configs"]["redteam+discovery"]["requests_per_job_interval"] < 0.2
    assert result["configs"]["dataset per-job"]["requests_per_job_interval"] > 0.8
    assert "jobs within budget" in proc.stdout
