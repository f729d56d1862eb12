"""The kinds of Enkrypt jobs enkwatch can watch: one module each, behind `models.TaskKind`.

A new kind is one module here and one entry in KINDS; the client, the poller and the
scheduler stay as they are.
"""

from __future__ import annotations

from typing import Final

from enkwatch.kinds.dataset import DATASET
from enkwatch.kinds.redteam import REDTEAM
from enkwatch.kinds.redteam_run import REDTEAM_RUN
from enkwatch.models import TaskKind

KINDS: Final[dict[str, TaskKind]] = {k.name: k for k in (DATASET, REDTEAM, REDTEAM_RUN)}
DEFAULT_KIND: Final[TaskKind] = DATASET
# every status word of every kind (metrics label them)
KNOWN_STATUSES: Final = frozenset().union(*(k.statuses for k in KINDS.values()))

__all__ = ["DATASET", "DEFAULT_KIND", "KINDS", "KNOWN_STATUSES", "REDTEAM", "REDTEAM_RUN"]
