"""The one HTTP session and the request of CONTRACT §4; every failure classified into our types."""

from __future__ import annotations

import asyncio
import email.utils
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import orjson
from aiolimiter import AsyncLimiter

from enkwatch import __version__
from enkwatch.bodies import read_bounded
from enkwatch.clock import Clock, SystemClock
from enkwatch.errors import (
    InvalidResponse,
    NotFound,
    PollError,
    TransientPollError,
    UnauthorizedAnswer,
)
from enkwatch.events import ERR_CONNECTION, ERR_HTTP_STATUS, ERR_RATE_LIMITED, ERR_TIMEOUT
from enkwatch.models import Observation, parse_observation

PATH: Final = "/datasets/get-task"
MAX_BODY_BYTES: Final = 1024 * 1024
USER_AGENT: Final = f"enkwatch/{__version__}"
# a Retry-After larger than this is treated as this: a typo on the server must not stall us for days
MAX_RETRY_AFTER_S: Final = 3600.0


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a `Retry-After` value (delta-seconds or HTTP date), or None."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - now).total_seconds()
    if math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


class RequestGate:
    """Limits shared by every request: requests per second, and a global Retry-After pause."""

    def __init__(
        self,
        max_requests_per_second: float,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock or SystemClock()
        self._sleep = sleep
        self._limiter: AsyncLimiter | None = None
        self.set_rate(max_requests_per_second)
        self.paused_until = 0.0
        self.pauses = 0
        # for metrics: requests that had to wait, and how long all waits took together
        self.limit_waits = 0
        self.wait_seconds = 0.0
        # the tasks waiting their turn in acquire(): close() cancels them
        self._waiting: set[asyncio.Task[Any]] = set()
        self.closed = False

    def set_rate(self, max_requests_per_second: float) -> None:
        """(Re)set the limit; 0 = none."""
        # a bucket of one request spaces requests evenly: at most rate + 1 in any one-second window
        self._limiter = (
            AsyncLimiter(1, 1.0 / max_requests_per_second) if max_requests_per_second > 0 else None
        )

    def pause(self, seconds: float) -> None:
        """Hold every request for `seconds` (a Retry-After from the API)."""
        until = self._clock.monotonic() + seconds
        if until > self.paused_until:
            self.paused_until = until
            self.pauses += 1

    def pause_remaining(self) -> float:
        return max(0.0, self.paused_until - self._clock.monotonic())

    def close(self) -> int:
        """Let no more requests through (shutdown): cancel the tasks waiting their turn; how many.

        A poll held by the rate limit or a Retry-After pause has sent nothing yet: sending it
        after SIGTERM would be a new request, and waiting for it would hold up the exit.
        """
        self.closed = True
        waiting = [task for task in self._waiting if not task.done()]
        for task in waiting:
            task.cancel()
        return len(waiting)

    async def acquire(self) -> None:
        """Wait for the global pause to end and for a slot in the rate limit.

        After close() nothing goes through: the caller is cancelled instead.
        """
        if self.closed:
            raise asyncio.CancelledError
        if self._limiter is None and self.paused_until <= self._clock.monotonic():
            return  # the hot path without limits: nothing to wait for, nothing to track
        task = asyncio.current_task()
        if task is not None:
            self._waiting.add(task)
        try:
            await self._wait_turn()
        finally:
            if task is not None:
                self._waiting.discard(task)

    async def _wait_turn(self) -> None:
        # a loop, not an Event: another Retry-After may extend the pause while we wait
        while (wait := self.pause_remaining()) > 0:
            self.wait_seconds += wait
            await self._sleep(wait)
        if self._limiter is not None:
            if self._limiter.has_capacity():
                await self._limiter.acquire()
            else:
                started = self._clock.monotonic()
                self.limit_waits += 1
                await self._limiter.acquire()
                self.wait_seconds += self._clock.monotonic() - started


class ApiClient:
    """`GET {base_url}/datasets/get-task` over one shared keep-alive session."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        gate: RequestGate,
        pool_size: int = 16,
        clock: Clock | None = None,
    ) -> None:
        self._url = base_url.rstrip("/") + PATH
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._gate = gate
        self._pool_size = pool_size
        self._clock = clock or SystemClock()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        connector = aiohttp.TCPConnector(limit=self._pool_size, limit_per_host=self._pool_size)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers={"Accept": "application/json", "User-Agent": USER_AGENT},
            # no cookies: nothing the API sets should change what we send
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, task_id: str | None, dataset: str | None) -> dict[str, str]:
        headers = {"apikey": self._api_key}
        if task_id is not None:
            headers["X-Enkrypt-Task-ID"] = task_id
        if dataset is not None:
            headers["X-Enkrypt-Dataset"] = dataset
        return headers

    async def get_task(self, task_id: str | None, dataset: str | None) -> Observation:
        """One request; an Observation, or a PollError subclass saying why not."""
        if self._session is None:
            raise RuntimeError("ApiClient used outside `async with`")
        await self._gate.acquire()
        try:
            async with self._session.get(
                self._url, headers=self._headers(task_id, dataset), allow_redirects=False
            ) as resp:
                body = await _read_limited(resp)
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except TimeoutError:
            raise TransientPollError(ERR_TIMEOUT, "the request timed out") from None
        except aiohttp.ClientError as err:
            raise TransientPollError(ERR_CONNECTION, _describe(err)) from None
        try:
            return self._classify(status, body, retry_after)
        except PollError as err:
            # the body's error message is the server's text: it may echo the key back
            if self._api_key in err.detail:
                err.detail = err.detail.replace(self._api_key, "[redacted]")
                err.args = (err.detail,)
            raise

    def _classify(self, status: int, body: bytes | None, retry_after: str | None) -> Observation:
        """The one place where an answer becomes an Observation or a typed error."""
        if status in (401, 403):
            raise UnauthorizedAnswer(f"HTTP {status}", status)
        if status == 404:
            raise NotFound("HTTP 404: the API does not know this task", 404)
        if status in (429, 503) or status >= 500:
            wait = parse_retry_after(retry_after, self._clock.now())
            if wait is not None and status in (429, 503):
                self._gate.pause(wait)
            kind = ERR_RATE_LIMITED if status == 429 else ERR_HTTP_STATUS
            raise TransientPollError(kind, f"HTTP {status}", status, wait)
        if 300 <= status < 400:
            raise InvalidResponse(f"HTTP {status}: redirects are not followed", status)
        if status != 200:
            raise InvalidResponse(f"HTTP {status}", status)
        if body is None:
            raise InvalidResponse(f"the body is larger than {MAX_BODY_BYTES} bytes", status)
        return parse_body(body, status)


def parse_body(body: bytes, http_status: int = 200) -> Observation:
    """Parse a 200 body; raise NotFound or InvalidResponse for anything but an observation."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidResponse("the body is not JSON", http_status) from None
    if isinstance(payload, dict) and "error" in payload:
        message = str(payload["error"])
        if "not found" in message.lower():
            raise NotFound(f"the API says: {message[:200]}", None)
        raise InvalidResponse(f"the API answered 200 with an error: {message[:200]}", http_status)
    try:
        return parse_observation(payload)
    except ValueError as err:
        raise InvalidResponse(str(err), http_status) from None


async def _read_limited(resp: aiohttp.ClientResponse) -> bytes | None:
    """The decoded body, or None when it is larger than MAX_BODY_BYTES.

    The limit holds for the decoded bytes: a gzip answer of 600 KB on the wire can inflate
    to a gigabyte, so `Content-Length` (the size on the wire) only refuses early.
    """
    coding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if coding == "identity" and (resp.content_length or 0) > MAX_BODY_BYTES:
        return None
    return await read_bounded(resp, MAX_BODY_BYTES)


def _describe(err: aiohttp.ClientError) -> str:
    # never str(err) on request errors: aiohttp puts the request info (with headers) in some
    if isinstance(err, aiohttp.ClientConnectorError):
        reason = err.strerror or type(err.os_error).__name__
        return f"cannot connect to {err.host}:{err.port}: {reason}"
    if isinstance(err, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(err, aiohttp.ClientPayloadError):
        return "the body was cut off"
    return type(err).__name__


__all__ = ["ApiClient", "PollError", "RequestGate", "parse_body", "parse_retry_after"]
