"""A simulated Enkrypt API: every job-status endpoint of the spec, scripted by a scenario.

`scenario` (the YAML file's model and loading), `answers` (job state, body shapes, faults),
`app` (HTTP: auth, lookups, list pages, lifecycle), `stats` (what the simulator saw).
"""

from __future__ import annotations

from enkwatch.simulator.app import build_app, serve, start_simulator
from enkwatch.simulator.scenario import (
    Fault,
    ListFaults,
    Phase,
    Scenario,
    ScenarioTask,
    Tool,
    default_scenario,
    load_scenario,
)
from enkwatch.simulator.stats import ARRIVALS_KEPT, STATS, SimulatorStats, max_in_window

__all__ = [
    "ARRIVALS_KEPT",
    "STATS",
    "Fault",
    "ListFaults",
    "Phase",
    "Scenario",
    "ScenarioTask",
    "SimulatorStats",
    "Tool",
    "build_app",
    "default_scenario",
    "load_scenario",
    "max_in_window",
    "serve",
    "start_simulator",
]
