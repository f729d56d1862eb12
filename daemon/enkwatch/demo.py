"""`enkwatch demo`: the simulator and the daemon together on the bundled demo config."""

from __future__ import annotations

from importlib import resources

import yaml

from enkwatch.config import Config, parse_config
from enkwatch.service import EXIT_OK, Service
from enkwatch.simulator import default_scenario, start_simulator

DEMO_API_KEY = "demo-key-not-a-secret"


def demo_config(base_url: str) -> Config:
    """The bundled demo config (enkwatch/data/demo.yaml) pointed at `base_url`."""
    text = resources.files("enkwatch").joinpath("data/demo.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    raw["api"]["base_url"] = base_url
    # the demo is self-contained: no environment override applies to it
    return parse_config(raw, environ={}, source="enkwatch/data/demo.yaml")


async def run_demo() -> int:
    """Run the demo; 0 when every task ended as the scenario scripts it."""
    runner, port, _ = await start_simulator(default_scenario(), "127.0.0.1", 0)
    try:
        config = demo_config(f"http://127.0.0.1:{port}")
        service = Service(config, DEMO_API_KEY, exit_when_done=True)
        await service.run()
    finally:
        await runner.cleanup()
    outcomes = {t.key: t.record.outcome for t in service.tasks.values()}
    expected_failed = {"data-generation-0f1c2d3e-0002-4a5b-9c8d-000000000002"}
    ok = all(
        outcome == ("Failed" if key in expected_failed else "Finished")
        for key, outcome in outcomes.items()
    )
    return EXIT_OK if ok else 1
