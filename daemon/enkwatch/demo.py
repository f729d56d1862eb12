"""`enkwatch demo`: the simulator and the daemon together on the bundled demo config."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources

import yaml

from enkwatch.config import Config, parse_config
from enkwatch.watch import TaskWatch

DEMO_API_KEY = "demo-key-not-a-secret"


def demo_config(base_url: str) -> Config:
    """The bundled demo config (enkwatch/data/demo.yaml) pointed at `base_url`."""
    text = resources.files("enkwatch").joinpath("data/demo.yaml").read_text(encoding="utf-8")
    raw = yaml.safe_load(text)
    raw["api"]["base_url"] = base_url
    # the demo is self-contained: no environment override applies to it
    return parse_config(raw, environ={}, source="enkwatch/data/demo.yaml")


def demo_ok(tasks: Iterable[TaskWatch]) -> bool:
    """Every task of the demo ended as the scenario scripts it."""
    expected_failed = {"data-generation-0f1c2d3e-0002-4a5b-9c8d-000000000002"}
    return all(
        t.record.outcome == ("Failed" if t.key in expected_failed else "Finished") for t in tasks
    )
