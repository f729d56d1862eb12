"""The simulated API over HTTP: auth, lookups, list pages, and the server's lifecycle."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final

from aiohttp import web

from enkwatch.clock import Clock, SystemClock
from enkwatch.simulator.answers import (
    LIST_STATUSES,
    Job,
    dataset_data,
    fault_for,
    pagination,
    redteam_data,
    redteam_item,
    respond,
    run_body,
)
from enkwatch.simulator.scenario import Fault, Scenario
from enkwatch.simulator.stats import STATS, SimulatorStats

_SHUTDOWN_TIMEOUT_S: Final = 2.0  # a slow fault must not hold up the simulator's exit
_TASK_NOT_FOUND: Final = "Task not found"
_RUN_NOT_FOUND: Final = "Run not found"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Body = Callable[[Job, str], dict[str, Any]]
# an answer's body for a job in a status, and the path of what `missing_field` drops
Shape = Callable[[Job, str], tuple[dict[str, Any], tuple[str, ...]]]


def _raw(header_value: str) -> bytes:
    # aiohttp decodes header bytes with surrogateescape; this gets the bytes back
    return header_value.encode("utf-8", "surrogateescape")


def _full(data: Body) -> Shape:
    def shape(job: Job, status: str) -> tuple[dict[str, Any], tuple[str, ...]]:
        return {"data": data(job, status)}, ("data", "status")

    return shape


def _light(job: Job, status: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    return {"status": status}, ("status",)


def _run(job: Job, status: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    return run_body(job, status), ("status",)


def _invalid(where: str, name: str, msg: str) -> web.Response:
    """A 422 shaped as the API's (FastAPI's) validation errors."""
    detail = [{"loc": [where, name], "msg": msg, "type": "value_error"}]
    return web.json_response({"detail": detail}, status=422)


class _Simulator:
    """The request handlers and the jobs' state."""

    def __init__(self, scenario: Scenario, clock: Clock, stats: SimulatorStats) -> None:
        self._scenario = scenario
        self._clock = clock
        self._stats = stats
        jobs = [Job(task) for task in scenario.tasks]
        for job in jobs:
            if (job.task.starts or scenario.starts) == "at_start":
                job.start(clock)
        start = clock.now()

        def order(job: Job) -> tuple[datetime, str]:
            return (job.task.created_at or start, job.task.ident)

        # lists are ordered by created_at, then id: an order fixed at start, so pages are
        # deterministic and only a job changing status moves the others up or down a list
        self._listed = {
            kind: sorted((j for j in jobs if j.task.kind == kind), key=order)
            for kind in ("dataset", "redteam")
        }
        self._list_requests = {"dataset": 0, "redteam": 0}
        self._by_task_id = {j.task.task_id: j for j in jobs if j.task.task_id is not None}
        self._by_dataset = {j.task.dataset: j for j in jobs if j.task.dataset is not None}
        self._by_test_name = {j.task.test_name: j for j in jobs if j.task.test_name is not None}
        self._by_run_id = {j.task.run_id: j for j in jobs if j.task.run_id is not None}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Every endpoint of the spec, each counted in the statistics."""
        task = self._per_task
        routes: dict[str, Handler] = {
            "/datasets/get-task": task(self._dataset_job, _full(dataset_data), _TASK_NOT_FOUND),
            "/datasets/task-status": task(self._dataset_job, _light, _TASK_NOT_FOUND),
            "/datasets/list-tasks": self._list("dataset"),
            "/redteam/get-task": task(self._redteam_job, _full(redteam_data), _TASK_NOT_FOUND),
            "/redteam/task-status": task(self._redteam_job, _light, _TASK_NOT_FOUND),
            "/redteam/list-tasks": self._list("redteam"),
            "/rt/runs/{run_id}": task(self._run_job, _run, _RUN_NOT_FOUND),
        }
        for path, handler in routes.items():
            router.add_get(path, self._counted(path, handler), allow_head=False)

    def _counted(self, endpoint: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            stats = self._stats
            stats.record_arrival(self._clock.monotonic())
            stats.by_endpoint[endpoint] = stats.by_endpoint.get(endpoint, 0) + 1
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            try:
                return await handler(request)
            finally:
                stats.in_flight -= 1

        return counted

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("apikey", "")
        expected = self._scenario.api_key
        if not key:
            return web.json_response({"detail": "Missing API key"}, status=401)
        if expected is not None and not hmac.compare_digest(_raw(key), _raw(expected)):
            return web.json_response({"detail": "Invalid API key"}, status=401)
        return None

    # per-task endpoints

    def _per_task(
        self, lookup: Callable[[web.Request], Job | web.Response], shape: Shape, not_found: str
    ) -> Handler:
        """A handler answering one job; its first request starts its timeline."""

        async def handler(request: web.Request) -> web.StreamResponse:
            refused = self._unauthorized(request)
            if refused is not None:
                return refused
            found = lookup(request)
            if isinstance(found, web.Response):
                return found
            job = found
            job.start(self._clock)
            job.requests += 1
            ident = job.task.ident
            self._stats.by_task[ident] = self._stats.by_task.get(ident, 0) + 1
            body, main = shape(job, job.status(self._clock.monotonic()))
            return await respond(job.fault(), body, main, not_found)

        return handler

    def _by_headers(
        self, request: web.Request, by_id: dict[str, Job], name_header: str, by_name: dict[str, Job]
    ) -> Job | web.Response:
        # the task id wins over the name, as the API does when both are sent
        task_id = request.headers.get("X-Enkrypt-Task-ID", "")
        name = request.headers.get(name_header, "")
        if not task_id and not name:
            detail = f"X-Enkrypt-Task-ID or {name_header} header is required"
            return web.json_response({"detail": detail}, status=422)
        job = by_id.get(task_id) if task_id else by_name.get(name)
        if job is None:
            return web.json_response({"detail": _TASK_NOT_FOUND}, status=404)
        return job

    def _dataset_job(self, request: web.Request) -> Job | web.Response:
        found = self._by_headers(request, self._by_task_id, "X-Enkrypt-Dataset", self._by_dataset)
        if isinstance(found, Job) and found.task.kind != "dataset":
            return web.json_response({"detail": _TASK_NOT_FOUND}, status=404)
        return found

    def _redteam_job(self, request: web.Request) -> Job | web.Response:
        by_name = self._by_test_name
        found = self._by_headers(request, self._by_task_id, "X-Enkrypt-Test-Name", by_name)
        if isinstance(found, Job) and found.task.kind != "redteam":
            return web.json_response({"detail": _TASK_NOT_FOUND}, status=404)
        return found

    def _run_job(self, request: web.Request) -> Job | web.Response:
        job = self._by_run_id.get(request.match_info["run_id"])
        if job is None:
            return web.json_response({"detail": _RUN_NOT_FOUND}, status=404)
        return job

    # list endpoints

    def _list(self, kind: str) -> Handler:
        """`GET /{kind}s/list-tasks?status=S&page=P&per_page=N`, paged as the API pages."""
        jobs = self._listed[kind]
        faults: list[Fault] = getattr(self._scenario.list_faults, kind)
        key = "datasets" if kind == "dataset" else "tasks"

        async def handler(request: web.Request) -> web.StreamResponse:
            refused = self._unauthorized(request)
            if refused is not None:
                return refused
            query = self._list_query(request)
            if isinstance(query, web.Response):
                return query
            wanted, page, per_page = query
            self._list_requests[kind] += 1
            now = self._clock.monotonic()
            statuses = [(job, job.status(now)) for job in jobs]
            chosen = [(j, s) for j, s in statuses if wanted is None or s == wanted]
            shown = chosen[(page - 1) * per_page : page * per_page]
            items: list[Any] = (
                [j.task.dataset for j, _ in shown]
                if kind == "dataset"
                else [redteam_item(j, s) for j, s in shown]
            )
            body = {key: items, "pagination": pagination(len(chosen), page, per_page)}
            fault = fault_for(faults, self._list_requests[kind])
            return await respond(fault, body, (key,), "Not Found")

        return handler

    def _list_query(self, request: web.Request) -> tuple[str | None, int, int] | web.Response:
        scenario = self._scenario
        query = request.query
        status = query.get("status")
        if status is not None and status not in LIST_STATUSES:
            return _invalid("query", "status", f"must be one of {', '.join(LIST_STATUSES)}")
        numbers: dict[str, int] = {}
        for name, default in (("page", 1), ("per_page", scenario.default_per_page)):
            text = query.get(name)
            try:
                numbers[name] = default if text is None else int(text)
            except ValueError:
                return _invalid("query", name, "must be an integer")
        page, per_page = numbers["page"], numbers["per_page"]
        if page < 1:
            return _invalid("query", "page", "must be greater than or equal to 1")
        top = scenario.max_per_page
        if not 1 <= per_page <= top:
            if scenario.per_page_out_of_range == "reject":
                return _invalid("query", "per_page", f"must be between 1 and {top}")
            per_page = min(max(per_page, 1), top)
        return status, page, per_page


def build_app(scenario: Scenario, clock: Clock | None = None) -> web.Application:
    """An aiohttp app serving the scenario; its statistics are at `app[STATS]`.

    Timelines with `starts: at_start` start here, when the app is built.
    """
    app = web.Application()
    stats = SimulatorStats()
    app[STATS] = stats
    _Simulator(scenario, clock or SystemClock(), stats).add_routes(app.router)
    return app


async def start_simulator(
    scenario: Scenario, host: str = "127.0.0.1", port: int = 0, clock: Clock | None = None
) -> tuple[web.AppRunner, int, web.Application]:
    """Serve the scenario over TCP; return the runner (to clean up), the bound port, the app."""
    app = build_app(scenario, clock)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = int(runner.addresses[0][1])
    except BaseException:
        await runner.cleanup()
        raise
    return runner, bound, app


async def serve(
    host: str,
    port: int,
    scenario: Scenario,
    stop: asyncio.Event,
    ready: Callable[[int], None] | None = None,
    *,
    clock: Clock | None = None,
) -> None:
    """Serve the scenario until `stop` is set; call `ready(port)` once listening."""
    runner, bound, _ = await start_simulator(scenario, host, port, clock)
    try:
        if ready is not None:
            ready(bound)
        await stop.wait()
    finally:
        await runner.cleanup()
