"""The kinds of Enkrypt jobs enkwatch can watch: one module each, behind `models.TaskKind`.

A new kind is one module here and one entry in KINDS; the client, the poller and the
scheduler stay as they are.
"""

from __future__ import annotations

from typing import Final

from enkwatch.kinds.dataset import DATASET, DATASET_LISTER
from enkwatch.kinds.redteam import REDTEAM
from enkwatch.kinds.redteam_run import REDTEAM_RUN
from enkwatch.models import Lister, TaskKind

KINDS: Final[dict[str, TaskKind]] = {k.name: k for k in (DATASET, REDTEAM, REDTEAM_RUN)}
DEFAULT_KIND: Final[TaskKind] = DATASET
# the kinds with a list call (discovery, status from list pages); a run has none
LISTERS: Final[dict[str, Lister]] = {DATASET_LISTER.name: DATASET_LISTER, REDTEAM.name: REDTEAM}
# every status word of every kind (metrics label them)
KNOWN_STATUSES: Final = frozenset().union(*(k.statuses for k in KINDS.values()))

__all__ = [
    "DATASET",
    "DEFAULT_KIND",
    "KINDS",
    "KNOWN_STATUSES",
    "LISTERS",
    "REDTEAM",
    "REDTEAM_RUN",
]
