"""The dataset-generation task: `GET /datasets/get-task` (the spec's DatasetsGetTaskResponse)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

from enkwatch.models import ListedJob, ListPage, Observation, clean_text

QUEUED: Final = "Queued"
RUNNING: Final = "Running"
FINISHED: Final = "Finished"
FAILED: Final = "Failed"

PATH: Final = "/datasets/get-task"
LIST_PATH: Final = "/datasets/list-tasks"
TASK_ID_HEADER: Final = "X-Enkrypt-Task-ID"
DATASET_HEADER: Final = "X-Enkrypt-Dataset"
REQUIRED_FIELDS: Final = ("dataset_name", "created_at", "status", "task_id")

# the one string object of each known status: 100,000 watched tasks then share four strings
# instead of holding a copy each, as every parsed answer would give them
_CANONICAL: Final[dict[str, str]] = {s: s for s in (QUEUED, RUNNING, FINISHED, FAILED)}


def normalize_timestamp(value: object) -> str | None:
    """An ISO 8601 date-time string as given, or None when empty or malformed."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    return value


class DatasetKind:
    """Today's (and the default) kind of task."""

    name = "dataset"
    statuses: frozenset[str] = frozenset({QUEUED, RUNNING, FINISHED, FAILED})
    terminal: frozenset[str] = frozenset({FINISHED, FAILED})
    failed: frozenset[str] = frozenset({FAILED})

    def path(self, task_id: str | None, dataset: str | None) -> str:
        return PATH

    def headers(self, task_id: str | None, dataset: str | None) -> dict[str, str]:
        headers = {}
        if task_id is not None:
            headers[TASK_ID_HEADER] = task_id
        if dataset is not None:
            headers[DATASET_HEADER] = dataset
        return headers

    def identity(self, task_id: str | None, name: str | None) -> dict[str, Any]:
        return {"task_id": task_id, "dataset": name}

    def parse(self, payload: object, task_id: str | None, dataset: str | None) -> Observation:
        obs = parse_observation(payload)
        check_identity(obs, task_id, dataset)
        return obs


DATASET: Final = DatasetKind()


def check_identity(obs: Observation, task_id: str | None, dataset: str | None) -> None:
    """An answer about another task than the one asked is no observation of ours: the task id
    when one was asked, else the dataset name (the API's own mistake, or a proxy's cache)."""
    if task_id is not None:
        if obs.task_id != task_id:
            raise ValueError(f"data.task_id is {_shown(obs.task_id)}, not the task asked for")
    elif dataset is not None and obs.dataset_name != dataset:
        shown = _shown(obs.dataset_name or "")
        raise ValueError(f"data.dataset_name is {shown}, not the dataset asked for")


def _shown(value: str) -> str:
    return repr(clean_text(value))


def parse_observation(payload: object) -> Observation:
    """Parse a decoded JSON body; raise ValueError naming what is wrong."""
    if not isinstance(payload, dict):
        raise ValueError(f"body is a JSON {type(payload).__name__}, not an object")
    if "error" in payload:
        raise ValueError(f"error: {str(payload['error'])[:200]}")
    data = payload.get("data")
    if not isinstance(data, dict):
        raise ValueError("'data' is missing or not an object")
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise ValueError(f"'data' lacks required field(s): {', '.join(missing)}")
    for field in REQUIRED_FIELDS:
        if not isinstance(data[field], str):
            raise ValueError(f"data.{field} is not a string")
    status: str = data["status"]
    if not status:
        raise ValueError("data.status is empty")
    # a status outside the vocabulary is shown in events as is, but cut and without controls
    status = _CANONICAL.get(status) or clean_text(status)
    if not status:
        raise ValueError("data.status has no printable character")
    return Observation(
        task_id=data["task_id"],
        dataset_name=data["dataset_name"],
        status=status,
        created_at=clean_text(data["created_at"]),
        started_at=normalize_timestamp(data.get("started_at")),
        data=data,
        known=status in DatasetKind.statuses,
        terminal=status in DatasetKind.terminal,
    )


def parse_pagination(payload: dict[str, Any]) -> tuple[bool, int | None]:
    """(has_next, total_count) of a list answer; an answer without pagination is one page."""
    pages = payload.get("pagination")
    if pages is None:
        return False, None
    if not isinstance(pages, dict):
        raise ValueError("'pagination' is not an object")
    has_next = pages.get("has_next", False)
    if not isinstance(has_next, bool):
        raise ValueError("pagination.has_next is not a boolean")
    total = pages.get("total_count")
    return has_next, total if isinstance(total, int) and not isinstance(total, bool) else None


class DatasetLister:
    """`GET /datasets/list-tasks`: dataset names only; the status is the filter."""

    name = "dataset"
    list_path = LIST_PATH
    match_fields: frozenset[str] = frozenset({"dataset"})

    def parse_list(self, payload: object, status: str) -> ListPage:
        if not isinstance(payload, dict):
            raise ValueError(f"body is a JSON {type(payload).__name__}, not an object")
        names = payload.get("datasets")
        if not isinstance(names, list):
            raise ValueError("'datasets' is missing or not a list")
        items = [
            ListedJob(None, n, _CANONICAL.get(status, status), {"dataset": n})
            for n in names
            if isinstance(n, str) and n
        ]
        has_next, total = parse_pagination(payload)
        return ListPage(items, has_next, total)


DATASET_LISTER: Final = DatasetLister()
