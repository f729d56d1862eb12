"""The red-team run: `GET /rt/runs/{run_id}`, a loose object; status aliases folded."""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import quote

from enkwatch.kinds.dataset import FAILED, FINISHED, QUEUED, RUNNING, normalize_timestamp
from enkwatch.models import Observation, clean_text

PATH_PREFIX: Final = "/rt/runs/"
CANCELLED: Final = "Cancelled"
ERROR: Final = "Error"

# the spec's vocabulary, case folded: the documented words and the aliases some endpoints use
ALIASES: Final[dict[str, str]] = {
    "queued": QUEUED,
    "running": RUNNING,
    "finished": FINISHED,
    "completed": FINISHED,
    "complete": FINISHED,
    "failed": FAILED,
    "cancelled": CANCELLED,
    "canceled": CANCELLED,
    "error": ERROR,
}


def fold_status(value: str) -> str:
    """The canonical word of a run status (`completed` -> Finished); an unknown one as given."""
    return ALIASES.get(value.strip().lower(), value)


class RedteamRunKind:
    """A red-team run of the run API, by its run id (path-escaped)."""

    name = "redteam_run"
    statuses: frozenset[str] = frozenset({QUEUED, RUNNING, FINISHED, FAILED, CANCELLED, ERROR})
    terminal: frozenset[str] = frozenset({FINISHED, FAILED, CANCELLED, ERROR})
    # cancelled and error end a run without its result: they count like Failed
    failed: frozenset[str] = frozenset({FAILED, CANCELLED, ERROR})

    def path(self, task_id: str | None, dataset: str | None) -> str:
        # every byte that is not unreserved is escaped: `/`, `?`, `#`, `..` stay in the segment
        return PATH_PREFIX + quote(task_id or "", safe="")

    def headers(self, task_id: str | None, dataset: str | None) -> dict[str, str]:
        return {}

    def identity(self, task_id: str | None, name: str | None) -> dict[str, Any]:
        return {"task_id": task_id, "dataset": None, "run_id": task_id}

    def parse(self, payload: object, task_id: str | None, dataset: str | None) -> Observation:
        if not isinstance(payload, dict):
            raise ValueError(f"body is a JSON {type(payload).__name__}, not an object")
        run = payload.get("data") if isinstance(payload.get("data"), dict) else payload
        assert isinstance(run, dict)
        ident = run.get("id", run.get("run_id"))
        if not isinstance(ident, str) or not ident:
            raise ValueError("the run has no 'id' (or 'run_id') string")
        if task_id is not None and ident != task_id:
            raise ValueError(f"the run's id is {clean_text(ident)!r}, not the run asked for")
        raw = run.get("status")
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError("the run's 'status' is missing or not a string")
        # a status outside the vocabulary is shown in events as is, but cut and without controls
        status = clean_text(fold_status(raw))
        if not status:
            raise ValueError("the run's 'status' has no printable character")
        created = run.get("created_at")
        return Observation(
            task_id=ident,
            dataset_name=None,
            status=status,
            created_at=clean_text(created) if isinstance(created, str) else None,
            started_at=normalize_timestamp(run.get("started_at")),
            data=run,
            known=status in self.statuses,
            terminal=status in self.terminal,
        )


REDTEAM_RUN: Final = RedteamRunKind()
