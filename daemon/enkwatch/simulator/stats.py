"""What the simulator has seen: request counts, concurrency and arrival times."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from aiohttp import web

ARRIVALS_KEPT: Final = 100_000


def max_in_window(times: list[float], window_s: float = 1.0) -> int:
    """The most of `times` within any half-open window of `window_s` seconds."""
    ordered = sorted(times)
    best = start = 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


@dataclass
class SimulatorStats:
    """Counts (in all, per task, per endpoint), concurrency, arrival times (monotonic)."""

    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    arrivals: list[float] = field(default_factory=list)
    by_task: dict[str, int] = field(default_factory=dict)
    by_endpoint: dict[str, int] = field(default_factory=dict)

    def record_arrival(self, at: float) -> None:
        """Count one request arriving at monotonic time `at`; keep arrivals bounded."""
        self.requests += 1
        self.arrivals.append(at)
        if len(self.arrivals) > ARRIVALS_KEPT:
            # drop a tenth at once so trimming stays cheap per request
            del self.arrivals[: len(self.arrivals) - ARRIVALS_KEPT * 9 // 10]

    def max_in_window(self, window_s: float = 1.0) -> int:
        """The most arrivals within any half-open window of `window_s` seconds."""
        return max_in_window(self.arrivals, window_s)


STATS: Final = web.AppKey("STATS", SimulatorStats)
