"""How the daemon is doing: liveness and readiness (/healthz, /readyz), and how a run ended."""

from __future__ import annotations

import asyncio
import enum
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from enkwatch.clock import Clock

# /healthz fails when the scheduler's watchdog job has not run for this long
WATCHDOG_EVERY_S: Final = 1.0  # how often the service's timers run Health.watchdog
STALL_LIMIT_S: Final = 15.0
# /healthz fails when lines have waited this long for the stdout reader (env var to change)
STDOUT_STALL_LIMIT_S: Final = 30.0
STDOUT_STALL_LIMIT_ENV: Final = "ENKWATCH_STDOUT_STALL_LIMIT_S"


def stdout_stall_limit_s(environ: dict[str, str] | None = None) -> float:
    """$ENKWATCH_STDOUT_STALL_LIMIT_S if it is a positive number, else STDOUT_STALL_LIMIT_S."""
    text = (os.environ if environ is None else environ).get(STDOUT_STALL_LIMIT_ENV, "")
    try:
        value = float(text)
    except ValueError:
        return STDOUT_STALL_LIMIT_S
    return value if 0 < value < 1e9 else STDOUT_STALL_LIMIT_S


# The collector's thresholds. Each poll allocates a few hundred short-lived containers: at
# the default (700, 10, 10) young collections ran hundreds of times a second and full ones,
# each walking the whole watch list, about once a second (40-125 ms at 10,000 tasks). The
# watch list is frozen out of the collector's sight after start-up; what stays in view and
# lives long (the heap of due times) is walked by a full collection, now every ~100 M
# allocations instead of every 5 M (a pause of 10-20 ms at 100,000 tasks).
GC_THRESHOLDS: Final = (50_000, 20, 100)


def tune_gc() -> None:
    """Freeze what lives after start-up out of the collector's sight; collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


class Health:
    """The watchdog's beat, readiness, and whether the API rejected the key."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._beat = clock.monotonic()
        self.ready = asyncio.Event()
        self.auth_failed = False
        self.stopping = False
        # how long event lines have waited for the stdout reader (set by the service)
        self.stdout_stalled_s: Callable[[], float] = lambda: 0.0
        self.stdout_stall_limit_s = stdout_stall_limit_s()

    async def watchdog(self) -> None:
        """The periodic job: the scheduler runs."""
        self._beat = self._clock.monotonic()

    def health(self) -> tuple[bool, str]:
        stalled = self._clock.monotonic() - self._beat
        if self.ready.is_set() and stalled > STALL_LIMIT_S:
            return False, f"the scheduler has not run for {stalled:.0f} s"
        waited = self.stdout_stalled_s()
        if waited > self.stdout_stall_limit_s:
            return False, f"stdout: the reader has not read for {waited:.0f} s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if self.auth_failed:
            return False, "the API rejected the key"
        if self.stopping:
            return False, "shutting down"
        if not self.ready.is_set():
            return False, "starting"
        return True, "ok"


class StopReason(enum.Enum):
    """Why the run ended (the `reason` of daemon.stopping, and what the exit code says)."""

    SIGNAL = "signal"
    ALL_DONE = "all_done"
    AUTH_FAILED = "auth_failed"
    CRASH = "internal_error"
    STOP_REQUESTED = "stop_requested"
    STDOUT_UNUSABLE = "stdout_unusable"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished run amounts to; `cli.exit_code` maps it to CONTRACT §6."""

    reason: StopReason
    auth_failed: bool
    finished: int = 0
    failed: int = 0
    gave_up: int = 0
    # why the run could not go on, for stderr (an unusable stdout)
    problem: str | None = None
