"""The admin HTTP app: health, readiness, metrics, the run-time task API, the status page
(`GET /`) and the live event stream (`GET /events`)."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from enkwatch import __version__
from enkwatch.clock import Clock, SystemClock
from enkwatch.errors import ConfigError, StateUnavailable
from enkwatch.livefeed import EventFeed, Reader, sse_message
from enkwatch.statuspage import (
    content_security_policy,
    new_nonce,
    page_query,
    render_status_page,
)

ADMIN_TOKEN_ENV: Final = "ENKWATCH_ADMIN_TOKEN"
MAX_BODY_BYTES: Final = 64 * 1024
# an idle event stream gets a comment line this often (proxies keep it open; a client that
# is gone is noticed)
KEEPALIVE_S: Final = 15.0
# the browser waits this long before it reconnects a dropped stream
RETRY_MS: Final = 2000


class TaskExists(Exception):
    """POST /tasks for a task that is already watched."""


class TaskNotEnded(Exception):
    """`forget` for a task that is still being watched."""


class AdminBackend(Protocol):
    """What the admin app needs of the service."""

    def health(self) -> tuple[bool, str]: ...

    def readiness(self) -> tuple[bool, str]: ...

    def metrics_body(self) -> bytes: ...

    async def list_tasks(self) -> list[dict[str, Any]]: ...

    async def add_task(self, entry: object) -> dict[str, Any]: ...

    async def remove_task(self, task_key: str) -> bool: ...

    async def get_task(self, task_key: str) -> dict[str, Any] | None: ...

    async def forget_task(self, task_key: str) -> dict[str, Any] | None: ...


class TaskApi(Protocol):
    """The watch list's side of the backend (`watchlist.WatchList`)."""

    async def list_tasks(self) -> list[dict[str, Any]]: ...

    async def add_task(self, entry: object) -> dict[str, Any]: ...

    async def remove_task(self, task_key: str) -> bool: ...

    async def get_task(self, task_key: str) -> dict[str, Any] | None: ...

    async def forget_task(self, task_key: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class AdminView:
    """The backend of a daemon: its health and metrics, its watch list's task API."""

    health: Callable[[], tuple[bool, str]]
    readiness: Callable[[], tuple[bool, str]]
    metrics_body: Callable[[], bytes]
    tasks: TaskApi

    async def list_tasks(self) -> list[dict[str, Any]]:
        return await self.tasks.list_tasks()

    async def add_task(self, entry: object) -> dict[str, Any]:
        return await self.tasks.add_task(entry)

    async def remove_task(self, task_key: str) -> bool:
        return await self.tasks.remove_task(task_key)

    async def get_task(self, task_key: str) -> dict[str, Any] | None:
        return await self.tasks.get_task(task_key)

    async def forget_task(self, task_key: str) -> dict[str, Any] | None:
        return await self.tasks.forget_task(task_key)


class SharedListing:
    """GET /tasks built once for every request that arrives while it is being built.

    A storm of GET /tasks at 10,000 tasks costs one listing (built in chunks that let the
    loop run, see `WatchList.list_tasks`) and one orjson serialization, shared; a request
    that arrives after it was built gets a new one (never older than its own arrival,
    except for what changed while the shared one was being built).
    """

    def __init__(self, backend: AdminBackend) -> None:
        self._backend = backend
        self._job: asyncio.Future[bytes] | None = None

    async def body(self) -> bytes:
        if self._job is None:
            self._job = asyncio.ensure_future(self._build())
            self._job.add_done_callback(self._built)
        # a request that goes away does not cancel the listing the others wait for
        return await asyncio.shield(self._job)

    def _built(self, job: asyncio.Future[bytes]) -> None:
        self._job = None
        if not job.cancelled():
            job.exception()  # retrieved here too: every waiter may have gone

    async def _build(self) -> bytes:
        tasks = await self._backend.list_tasks()
        return orjson.dumps({"tasks": tasks}, default=str)


BACKEND: Final = web.AppKey("backend", AdminBackend)
TOKEN: Final = web.AppKey("token", str)
FEED: Final = web.AppKey("feed", EventFeed)
CLOCK: Final = web.AppKey("clock", Clock)
LISTING: Final = web.AppKey("listing", SharedListing)


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
        body = await request.app[LISTING].body()
    except StateUnavailable as err:
        return _json({"error": str(err)}, 503)
    return web.Response(body=body, content_type="application/json")


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


async def get_task(request: web.Request) -> web.Response:
    key = request.match_info["task_key"]
    try:
        task = await request.app[BACKEND].get_task(key)
    except StateUnavailable as err:
        return _json({"error": str(err)}, 503)
    if task is None:
        return _json({"error": f"no watched task {key}"}, 404)
    return _json(task)


async def forget_task(request: web.Request) -> web.Response:
    if (denied := _authorize(request)) is not None:
        return denied
    key = request.match_info["task_key"]
    try:
        task = await request.app[BACKEND].forget_task(key)
    except TaskNotEnded as err:
        return _json({"error": str(err)}, 409)
    except StateUnavailable as err:
        return _json({"error": str(err)}, 503)
    if task is None:
        return _json({"error": f"no task {key} in the state"}, 404)
    return _json(task)


async def status_page(request: web.Request) -> web.Response:
    try:
        tasks = await request.app[BACKEND].list_tasks()
    except StateUnavailable as err:
        return _json({"error": str(err)}, 503)
    nonce = new_nonce()
    page = render_status_page(
        tasks,
        query=page_query(request.query),
        can_change=bool(request.app[TOKEN]),
        nonce=nonce,
        now=request.app[CLOCK].now(),
        version=__version__,
    )
    return web.Response(
        text=page,
        content_type="text/html",
        headers={
            "Content-Security-Policy": content_security_policy(nonce),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


async def event_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one message per event, `id:` = event_id; resumable."""
    feed = request.app[FEED]
    reader = feed.connect()
    if reader is None:
        return _json({"error": "too many event streams are open; try again later"}, 503)
    try:
        # nothing is awaited between connect() and the catch-up: no event falls between
        first = await _catch_up(request, feed)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n\n".encode() + b"".join(first))
        await _pump(response, reader)
        return response
    finally:
        feed.disconnect(reader)


async def _catch_up(request: web.Request, feed: EventFeed) -> list[bytes]:
    """What a (re)connecting client missed: the ring after its Last-Event-ID; or, when that
    id is too old for the ring (or `?snapshot=1`), a `snapshot` message of every task."""
    last_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if last_id:
        missed = feed.since(last_id)
        if missed is not None:
            return missed
        reason = "last_event_id_not_in_ring"
    elif request.query.get("snapshot") in ("1", "true", "yes"):
        reason = "requested"
    else:
        return []
    # events published while the list is read are queued for the reader: they follow the
    # snapshot (which may already show them; applying an event twice changes nothing)
    tasks = await request.app[BACKEND].list_tasks()
    body = {"reason": reason, "tasks": tasks}
    return [sse_message(orjson.dumps(body, default=str), name="snapshot")]


async def _pump(response: web.StreamResponse, reader: Reader) -> None:
    while True:
        try:
            message = await asyncio.wait_for(reader.queue.get(), KEEPALIVE_S)
        except TimeoutError:
            message = b": keepalive\n\n"
        if message is None:  # the feed closed (shutdown), or the reader fell too far behind
            return
        await response.write(message)


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


def build_admin_app(
    backend: AdminBackend,
    token: str | None,
    feed: EventFeed | None = None,
    clock: Clock | None = None,
) -> web.Application:
    """The app served on `admin.listen`."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[BACKEND] = backend
    app[TOKEN] = token or ""
    app[FEED] = feed or EventFeed()
    app[CLOCK] = clock or SystemClock()
    app.router.add_get("/", status_page)
    app.router.add_get("/events", event_stream)
    app[LISTING] = SharedListing(backend)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/tasks", list_tasks)
    app.router.add_post("/tasks", add_task)
    app.router.add_post("/tasks/{task_key:.+}/forget", forget_task)
    app.router.add_get("/tasks/{task_key:.+}", get_task)
    app.router.add_delete("/tasks/{task_key:.+}", remove_task)
    return app


async def serve_admin(
    stack: AsyncExitStack,
    view: AdminBackend,
    token: str | None,
    feed: EventFeed,
    listen: str,
    host_port: tuple[str, int],
    clock: Clock,
) -> int:
    """Serve the admin app on `admin.listen` until the stack closes; the bound port.
    The event streams end first, so the server stops at once."""
    app = build_admin_app(view, token, feed, clock)
    try:
        runner, port = await start_admin(app, *host_port)
    except OSError as err:
        why = err.strerror or err
        raise ConfigError([f"admin.listen: cannot listen on {listen}: {why}"]) from None
    stack.push_async_callback(runner.cleanup)
    stack.callback(feed.close)
    return port


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
