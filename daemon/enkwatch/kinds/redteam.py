"""The red-team task: `GET /redteam/get-task` (headers X-Enkrypt-Task-ID, X-Enkrypt-Test-Name)."""

from __future__ import annotations

from typing import Any, Final

from enkwatch.kinds.dataset import (
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    normalize_timestamp,
    parse_pagination,
)
from enkwatch.models import ListedJob, ListPage, Observation, clean_text

PATH: Final = "/redteam/get-task"
LIST_PATH: Final = "/redteam/list-tasks"
TASK_ID_HEADER: Final = "X-Enkrypt-Task-ID"
TEST_NAME_HEADER: Final = "X-Enkrypt-Test-Name"
REQUIRED_FIELDS: Final = ("task_id", "test_name", "status")
MATCH_FIELDS: Final = frozenset({"task_id", "test_name", "model_name", "project_name"})

_CANONICAL: Final[dict[str, str]] = {s: s for s in (QUEUED, RUNNING, FINISHED, FAILED)}


class RedteamKind:
    """A red-team test of the task API: a task id and/or a test name."""

    name = "redteam"
    list_path = LIST_PATH
    match_fields: frozenset[str] = MATCH_FIELDS
    statuses: frozenset[str] = frozenset({QUEUED, RUNNING, FINISHED, FAILED})
    terminal: frozenset[str] = frozenset({FINISHED, FAILED})
    failed: frozenset[str] = frozenset({FAILED})

    def path(self, task_id: str | None, dataset: str | None) -> str:
        return PATH

    def headers(self, task_id: str | None, dataset: str | None) -> dict[str, str]:
        # `dataset` is the kind's name field: the test name
        headers = {}
        if task_id is not None:
            headers[TASK_ID_HEADER] = task_id
        if dataset is not None:
            headers[TEST_NAME_HEADER] = dataset
        return headers

    def identity(self, task_id: str | None, name: str | None) -> dict[str, Any]:
        return {"task_id": task_id, "dataset": None, "test_name": name}

    def parse(self, payload: object, task_id: str | None, dataset: str | None) -> Observation:
        if not isinstance(payload, dict):
            raise ValueError(f"body is a JSON {type(payload).__name__}, not an object")
        data = payload.get("data")
        if not isinstance(data, dict):
            raise ValueError("'data' is missing or not an object")
        obs = observe_item(data, "data")
        check_identity(obs, task_id, dataset)
        return obs

    def parse_list(self, payload: object, status: str) -> ListPage:
        """A `list-tasks` page: each item carries its own status (an item not usable is skipped)."""
        if not isinstance(payload, dict):
            raise ValueError(f"body is a JSON {type(payload).__name__}, not an object")
        raw = payload.get("tasks")
        if not isinstance(raw, list):
            raise ValueError("'tasks' is missing or not a list")
        items = []
        for item in raw:
            try:
                obs = observe_item(item, "item") if isinstance(item, dict) else None
            except ValueError:
                obs = None
            if obs is not None:
                fields = {k: v for k in MATCH_FIELDS if isinstance(v := item.get(k), str)}
                items.append(ListedJob(obs.task_id, obs.dataset_name, obs.status, fields, obs))
        has_next, total = parse_pagination(payload)
        return ListPage(items, has_next, total)


def observe_item(data: dict[str, Any], where: str) -> Observation:
    """An Observation from a red-team task object (`data` or a list item)."""
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise ValueError(f"'{where}' lacks required field(s): {', '.join(missing)}")
    for field in REQUIRED_FIELDS:
        if not isinstance(data[field], str):
            raise ValueError(f"{where}.{field} is not a string")
    status: str = data["status"]
    if not status:
        raise ValueError(f"{where}.status is empty")
    # a status outside the vocabulary is shown in events as is, but cut and without controls
    status = _CANONICAL.get(status) or clean_text(status)
    if not status:
        raise ValueError(f"{where}.status has no printable character")
    created = data.get("created_at")
    return Observation(
        task_id=data["task_id"],
        dataset_name=data["test_name"],
        status=status,
        created_at=clean_text(created) if isinstance(created, str) else None,
        started_at=normalize_timestamp(data.get("started_at")),
        data=data,
        known=status in RedteamKind.statuses,
        terminal=status in RedteamKind.terminal,
    )


REDTEAM: Final = RedteamKind()


def check_identity(obs: Observation, task_id: str | None, test_name: str | None) -> None:
    """An answer about another test than the one asked is no observation of ours: the task
    id when one was asked, else the test name."""
    if task_id is not None:
        if obs.task_id != task_id:
            shown = repr(clean_text(obs.task_id))
            raise ValueError(f"data.task_id is {shown}, not the task asked for")
    elif test_name is not None and obs.dataset_name != test_name:
        shown = repr(clean_text(obs.dataset_name or ""))
        raise ValueError(f"data.test_name is {shown}, not the test asked for")
