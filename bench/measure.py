"""Small measuring helpers shared by the benchmark's processes."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """This process's resident set size now (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_s() -> float:
    """CPU seconds (user + system) of this process, every thread included."""
    return time.process_time()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest rank; NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def task_id(i: int) -> str:
    """A task id shaped like the API's (`data-generation-<uuid>`)."""
    return f"data-generation-{i:08x}-ac8a-4a3d-8da3-b9b68b28e668"
