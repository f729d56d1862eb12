"""The kinds of Enkrypt jobs enkwatch can watch: one module each, behind `models.TaskKind`.

A new kind (e.g. `redteam`, `redteam_run` of the spec) is one module here and one entry
in KINDS; the client, the poller and the scheduler stay as they are.
"""

from __future__ import annotations

from typing import Final

from enkwatch.kinds.dataset import DATASET
from enkwatch.models import TaskKind

KINDS: Final[dict[str, TaskKind]] = {DATASET.name: DATASET}
DEFAULT_KIND: Final[TaskKind] = DATASET
# every status word of every kind (metrics label them)
KNOWN_STATUSES: Final = frozenset().union(*(k.statuses for k in KINDS.values()))

__all__ = ["DATASET", "DEFAULT_KIND", "KINDS", "KNOWN_STATUSES"]
