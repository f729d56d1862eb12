"""The admin HTTP app: health, readiness, metrics, and the run-time task API."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any, Final, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from enkwatch.errors import ConfigError, StateUnavailable

ADMIN_TOKEN_ENV: Final = "ENKWATCH_ADMIN_TOKEN"
MAX_BODY_BYTES: Final = 64 * 1024


class TaskExists(Exception):
    """POST /tasks for a task that is already watched."""


class AdminBackend(Protocol):
    """What the admin app needs of the service."""

    def health(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...

    def metrics_body(self) -> bytes: ...

    async def list_tasks(self) -> list[dict[str, Any]]: ...

    async def add_task(self, entry: object) -> dict[str, Any]: ...

    async def remove_task(self, task_key: str) -> bool: ...


class TaskApi(Protocol):
    """The watch list's run-time task API."""

    async def list_tasks(self) -> list[dict[str, Any]]: ...

    async def add_task(self, entry: object) -> dict[str, Any]: ...

    async def remove_task(self, task_key: str) -> bool: ...


class AdminView:
    """An AdminBackend from its parts: the service's health, its metrics, the task API."""

    def __init__(
        self,
        health: Callable[[], tuple[bool, str]],
        readiness: Callable[[], tuple[bool, str]],
        metrics_body: Callable[[], bytes],
        tasks: TaskApi,
    ) -> None:
        self.health = health
        self.readiness = readiness
        self.metrics_body = metrics_body
        self.list_tasks = tasks.list_tasks
        self.add_task = tasks.add_task
        self.remove_task = tasks.remove_task


BACKEND: Final = web.AppKey("backend", AdminBackend)
TOKEN: Final = web.AppKey("token", str)


def _json(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=lambda o: json.dumps(o, default=str))


async def healthz(request: web.Request) -> web.Response:
    ok, reason = request.app[BACKEND].health()
    return _json({"status": "ok" if ok else "unhealthy", "reason": reason}, 200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    ok, reason = request.app[BACKEND].readiness()
    return _json({"ready": ok, "reason": reason}, 200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    body = request.app[BACKEND].metrics_body()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def list_tasks(request: web.Request) -> web.Response:
    try:
        return _json({"tasks": await request.app[BACKEND].list_tasks()})
    except StateUnavailable as err:
        return _json({"error": str(err)}, 503)


def _authorize(request: web.Request) -> web.Response | None:
    """None when the bearer token matches; else the 401/403 answer."""
    token = request.app[TOKEN]
    if not token:
        return _json({"error": f"task changes are disabled: set {ADMIN_TOKEN_ENV}"}, 403)
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        value.strip().encode(), token.encode()
    ):
        return web.json_response(
            {"error": "missing or wrong bearer token"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="enkwatch"'},
        )
    return None


async def add_task(request: web.Request) -> web.Response:
    if (denied := _authorize(request)) is not None:
        return denied
    raw = await request.read()  # at most MAX_BODY_BYTES: larger is 413
    try:
        entry = json.loads(raw)
    except RecursionError:
        # `[[[[...` in 64 KiB nests deeper than any parser's stack: a bad body, not a crash
        return _json({"errors": ["(body): nested too deeply to be a task entry"]}, 400)
    except ValueError:  # also a body that is not UTF-8
        return _json({"errors": ["(body): not valid JSON"]}, 400)
    try:
        task = await request.app[BACKEND].add_task(entry)
    except ConfigError as err:
        return _json({"errors": err.problems}, 400)
    except TaskExists as err:
        return _json({"errors": [str(err)]}, 409)
    except StateUnavailable as err:
        return _json({"errors": [str(err)]}, 503)
    return _json(task, 201)


async def remove_task(request: web.Request) -> web.Response:
    if (denied := _authorize(request)) is not None:
        return denied
    key = request.match_info["task_key"]
    try:
        removed = await request.app[BACKEND].remove_task(key)
    except StateUnavailable as err:
        return _json({"error": str(err)}, 503)
    if not removed:
        return _json({"error": f"no watched task {key}"}, 404)
    return web.Response(status=204)


def build_admin_app(backend: AdminBackend, token: str | None) -> web.Application:
    """The app served on `admin.listen`."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[BACKEND] = backend
    app[TOKEN] = token or ""
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tasks", list_tasks)
    app.router.add_post("/tasks", add_task)
    app.router.add_delete("/tasks/{task_key:.+}", remove_task)
    return app


async def start_admin(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app`; the runner (to clean up) and the bound port (port 0 picks one)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
