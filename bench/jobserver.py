"""The API of the requests-per-watched-job benchmark: jobs that come and go, on a clock.

`python -m bench.jobserver SPEC_JSON` prints `PORT <n>` once listening and serves until
SIGTERM (or until its parent is gone). SPEC is `{"kind", "n", "seed", "scale", "t0",
"horizon_s"}`: `population()` makes the jobs from it (the benchmark makes the same ones to
know when each transition happened). Time is scaled: a job's phase of `s` seconds lasts
`s / scale` seconds of the wall clock from `t0` (`time.time()`).

It serves `GET /redteam/list-tasks`, `/redteam/get-task`, `/datasets/list-tasks` and
`/datasets/get-task` as the API does (pages of `per_page`, `pagination.has_next`, a job
absent before it is created), and `GET /_stats`, the requests counted by endpoint. A
status list is computed once per 20 ms at most and shared by the pages read meanwhile, so
the server stays far from being the limit (the daemon reads at most a few hundred pages a
second here).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from aiohttp import web

# each kind's phases, in real (unscaled) seconds: Queued, then Running, uniform in [lo, hi]
PHASES: Final[dict[str, tuple[tuple[float, float], tuple[float, float]]]] = {
    # red-team tests run for hours
    "redteam": ((300.0, 900.0), (5_400.0, 9_000.0)),
    # dataset generation: minutes to an hour
    "dataset": ((60.0, 180.0), (1_200.0, 2_400.0)),
}
CACHE_S: Final = 0.02
LIST_PATHS: Final = {"redteam": "/redteam/list-tasks", "dataset": "/datasets/list-tasks"}
GET_PATHS: Final = {"redteam": "/redteam/get-task", "dataset": "/datasets/get-task"}


@dataclass(frozen=True, slots=True)
class Job:
    """One job: created, Running from, Finished from (real seconds from t0)."""

    i: int
    created: float
    running: float
    finished: float

    def status(self, at: float) -> str | None:
        if at < self.created:
            return None
        if at < self.running:
            return "Queued"
        return "Running" if at < self.finished else "Finished"


def task_id(kind: str, i: int) -> str:
    return f"{'rt' if kind == 'redteam' else 'data-generation'}-{i:07d}"


def name(kind: str, i: int) -> str:
    return f"{'nightly' if kind == 'redteam' else 'ds'}-{i:07d}"


def population(kind: str, n: int, seed: int, horizon_s: float) -> list[Job]:
    """Jobs created at a steady rate such that about `n` are active (Queued or Running) at
    any time from 0 to `horizon_s`; those that ended before 0 are left out. By creation."""
    (q_lo, q_hi), (r_lo, r_hi) = PHASES[kind]
    mean_life = (q_lo + q_hi) / 2 + (r_lo + r_hi) / 2
    longest = q_hi + r_hi
    span = longest + horizon_s
    count = max(1, round(n / mean_life * span))
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        created = -longest + span * (i + rng.random()) / count
        running = created + rng.uniform(q_lo, q_hi)
        finished = running + rng.uniform(r_lo, r_hi)
        if finished > 0:
            jobs.append(Job(len(jobs), created, running, finished))
    return jobs


class JobApi:
    """The handlers; statuses from the scaled clock."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.kind: str = spec["kind"]
        self.scale: float = spec["scale"]
        self.t0: float = spec["t0"]
        self.jobs = population(self.kind, spec["n"], spec["seed"], spec["horizon_s"])
        self._created = [j.created for j in self.jobs]
        self._longest = sum(hi for _, hi in PHASES[self.kind])
        self._by_id = {task_id(self.kind, j.i): j for j in self.jobs}
        self._by_name = {name(self.kind, j.i): j for j in self.jobs}
        self._cache: dict[str, tuple[float, list[Job]]] = {}
        self.counts: dict[str, int] = {}
        self.per_job: dict[int, int] = {}

    def now(self) -> float:
        return (time.time() - self.t0) * self.scale

    def created_at(self, job: Job) -> str:
        moment = datetime.fromtimestamp(self.t0 + job.created / self.scale, UTC)
        return moment.isoformat()

    def listed(self, status: str) -> list[Job]:
        wall = time.monotonic()
        cached = self._cache.get(status)
        if cached is not None and wall - cached[0] < CACHE_S:
            return cached[1]
        at = self.now()
        lo = bisect.bisect_left(self._created, at - self._longest)
        hi = bisect.bisect_right(self._created, at)
        jobs = [j for j in self.jobs[lo:hi] if j.status(at) == status]
        self._cache[status] = (wall, jobs)
        return jobs

    def count(self, endpoint: str) -> None:
        self.counts[endpoint] = self.counts.get(endpoint, 0) + 1

    async def list_tasks(self, request: web.Request) -> web.Response:
        self.count(request.path)
        status = request.query.get("status", "Running")
        page = int(request.query.get("page", "1"))
        per_page = min(int(request.query.get("per_page", "10")), 100)
        jobs = self.listed(status)
        shown = jobs[(page - 1) * per_page : page * per_page]
        pages = math.ceil(len(jobs) / per_page)
        pagination = {
            "page": page,
            "per_page": per_page,
            "total_count": len(jobs),
            "total_pages": pages,
            "has_next": page < pages,
            "has_previous": page > 1,
        }
        body: dict[str, Any]
        if self.kind == "dataset":
            body = {"datasets": [name(self.kind, j.i) for j in shown]}
        else:
            body = {"tasks": [self.item(j, status) for j in shown]}
        body["pagination"] = pagination
        return web.json_response(body)

    def item(self, job: Job, status: str) -> dict[str, Any]:
        return {
            "task_id": task_id(self.kind, job.i),
            "test_name": name(self.kind, job.i),
            "status": status,
            "project_name": "bench",
            "model_name": "gpt-4o-mini",
            "created_at": self.created_at(job),
        }

    async def get_task(self, request: web.Request) -> web.Response:
        self.count(request.path)
        ident = request.headers.get("X-Enkrypt-Task-ID")
        by_name = request.headers.get(
            "X-Enkrypt-Dataset" if self.kind == "dataset" else "X-Enkrypt-Test-Name"
        )
        job = self._by_id.get(ident) if ident else self._by_name.get(by_name or "")
        if job is not None:
            self.per_job[job.i] = self.per_job.get(job.i, 0) + 1
        status = job.status(self.now()) if job is not None else None
        if job is None or status is None:
            return web.json_response({"detail": "Task not found"}, status=404)
        data: dict[str, Any] = {
            "task_id": task_id(self.kind, job.i),
            "created_at": self.created_at(job),
            "status": status,
        }
        data["dataset_name" if self.kind == "dataset" else "test_name"] = name(self.kind, job.i)
        if status != "Queued":
            moment = datetime.fromtimestamp(self.t0 + job.running / self.scale, UTC)
            data["started_at"] = moment.isoformat()
        return web.json_response({"data": data})

    async def stats(self, request: web.Request) -> web.Response:
        if "per_job" in request.query:
            return web.json_response(self.per_job)
        return web.json_response(self.counts)


def build_app(spec: dict[str, Any]) -> web.Application:
    api = JobApi(spec)
    app = web.Application()
    app.router.add_get(LIST_PATHS[api.kind], api.list_tasks)
    app.router.add_get(GET_PATHS[api.kind], api.get_task)
    app.router.add_get("/_stats", api.stats)
    return app


async def _until_orphaned(parent: int, stop: asyncio.Event) -> None:
    # the benchmark dying without SIGTERM must not leave a server behind
    while os.getppid() == parent:  # noqa: ASYNC110 (no event to wait on: a poll)
        await asyncio.sleep(1.0)
    stop.set()


async def serve(spec: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    runner = web.AppRunner(build_app(spec), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    print(f"PORT {runner.addresses[0][1]}", flush=True)
    watchdog = asyncio.create_task(_until_orphaned(os.getppid(), stop))
    try:
        await stop.wait()
    finally:
        watchdog.cancel()
        await runner.cleanup()


def main() -> int:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(json.loads(sys.argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
