"""The simulator's answers: each job's state and body shapes, and the faulty ways to answer."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from aiohttp import web

from enkwatch.clock import Clock
from enkwatch.simulator.scenario import Fault, ScenarioTask

QUEUED: Final = "Queued"  # the API's word for a job that has not started
LIST_STATUSES: Final = ("Queued", "Running", "Finished", "Failed")  # a list call's filters
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_GARBAGE: Final = "<html><body><h1>502 Bad Gateway</h1><p>upstream hiccup</p></body></html>"


def iso(moment: datetime) -> str:
    """An RFC 3339 date-time in UTC with microseconds, as the API writes them."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return aware.astimezone(UTC).isoformat(timespec="microseconds")


@dataclass
class Job:
    """One scenario task and where its timeline is; `requests` counts its own requests."""

    task: ScenarioTask
    requests: int = 0
    started: bool = False
    started_mono: float = 0.0
    started_wall: datetime = _EPOCH

    def start(self, clock: Clock) -> None:
        """Start the timeline now, unless it has started."""
        if not self.started:
            self.started = True
            self.started_mono = clock.monotonic()
            self.started_wall = clock.now()

    def status(self, now_mono: float) -> str:
        """The status at monotonic time `now_mono`; the first one until the timeline starts."""
        timeline = self.task.timeline
        if not self.started:
            return timeline[0].status
        elapsed = now_mono - self.started_mono
        offset = 0.0
        for phase in timeline:
            if phase.seconds is None or elapsed < offset + phase.seconds:
                return phase.status
            offset += phase.seconds
        return timeline[-1].status

    def created_at(self) -> str | None:
        """The scenario's `created_at`, else the timeline's start; None before it."""
        if self.task.created_at is not None:
            return iso(self.task.created_at)
        return iso(self.started_wall) if self.started else None

    def started_at(self) -> str:
        """When the first phase that is not Queued began (the timeline's start if none was)."""
        began = 0.0
        for phase in self.task.timeline:
            if phase.status != QUEUED:
                break
            began += phase.seconds or 0.0
        return iso(self.started_wall + timedelta(seconds=began))

    def fault(self) -> Fault | None:
        """The fault scripted for the job's latest request, if any."""
        return fault_for(self.task.faults, self.requests)


def fault_for(faults: list[Fault], request_number: int) -> Fault | None:
    """The fault covering the `request_number`-th request (1-based), or None past them all."""
    covered = 0
    for fault in faults:
        covered += fault.requests
        if request_number <= covered:
            return None if fault.kind == "ok" else fault
    return None


def dataset_data(job: Job, status: str) -> dict[str, Any]:
    """`data` of `GET /datasets/get-task`: every field of the spec (no started_at if Queued)."""
    task = job.task
    data: dict[str, Any] = {
        "dataset_name": task.dataset,
        "created_at": job.created_at(),
        "status": status,
        "system_description": task.system_description,
        "max_prompts": task.max_prompts,
        "scenarios": task.scenarios,
        "categories": task.categories,
        "depth": task.depth,
        "policy_description": task.policy_description,
        "project_name": task.project_name,
        "info_pdf_url": task.info_pdf_url,
        "tools": [tool.model_dump() for tool in task.tools],
        "task_id": task.task_id,
    }
    if status != QUEUED:
        data["started_at"] = job.started_at()
    return data


def redteam_data(job: Job, status: str) -> dict[str, Any]:
    """`data` of `GET /redteam/get-task`."""
    task = job.task
    return {
        "task_id": task.task_id,
        "test_name": task.test_name,
        "status": status,
        "created_at": job.created_at(),
        "created_by": task.created_by,
        "project_name": task.project_name,
        "model_name": task.model_name,
        "model_saved_name": task.model_saved_name,
        "model_config": dict(task.model_config_),
        "user_metadata": dict(task.user_metadata),
    }


def redteam_item(job: Job, status: str) -> dict[str, Any]:
    """One item of `GET /redteam/list-tasks`, with its own status (created_at once known)."""
    task = job.task
    item: dict[str, Any] = {
        "task_id": task.task_id,
        "test_name": task.test_name,
        "status": status,
        "model_name": task.model_name,
        "project_name": task.project_name,
    }
    created_at = job.created_at()
    if created_at is not None:
        item["created_at"] = created_at
    return item


def run_body(job: Job, status: str) -> dict[str, Any]:
    """The loose object of `GET /rt/runs/{run_id}`: the scenario's `fields`, id, status."""
    task = job.task
    return {
        **task.fields,
        task.id_field: task.run_id,
        "status": status,
        "created_at": job.created_at(),
    }


def pagination(total: int, page: int, per_page: int) -> dict[str, Any]:
    """The spec's pagination object for page `page` of `total` items."""
    pages = math.ceil(total / per_page)
    return {
        "page": page,
        "per_page": per_page,
        "total_count": total,
        "total_pages": pages,
        "has_next": page < pages,
        "has_previous": page > 1,
    }


def _without(body: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `body` lacking the field at `path` (nested objects copied on the way)."""
    copy = dict(body)
    inner = copy
    for key in path[:-1]:
        inner[key] = dict(inner[key])
        inner = inner[key]
    inner.pop(path[-1], None)
    return copy


async def respond(
    fault: Fault | None, body: dict[str, Any], main: tuple[str, ...], not_found: str
) -> web.StreamResponse:
    """Answer `body` as JSON, or in the scripted faulty way; `main` is what missing_field drops.

    The body is made on arrival, before any delay: a backend that stalls before it answers.
    """
    if fault is None:
        return web.json_response(body)
    kind = fault.kind
    if kind in ("http_503", "http_429"):
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after))
        status = 503 if kind == "http_503" else 429
        detail = "Service unavailable" if status == 503 else "Too many requests"
        return web.json_response({"detail": detail}, status=status, headers=headers)
    if kind == "http_500":
        return web.json_response({"detail": "Internal server error"}, status=500)
    if kind == "http_401":
        return web.json_response({"detail": "Invalid API key"}, status=401)
    if kind == "not_found":
        return web.json_response({"detail": not_found}, status=404)
    if kind == "error_200":
        return web.json_response({"error": "Internal error while fetching task"})
    if kind == "garbage":
        return web.Response(text=_GARBAGE, content_type="text/html")
    if kind == "missing_field":
        return web.json_response(_without(body, main))
    if kind == "truncated":
        text = json.dumps(body)
        return web.Response(text=text[: len(text) // 2], content_type="application/json")
    await asyncio.sleep(fault.seconds or 0.0)  # slow
    return web.json_response(body)
