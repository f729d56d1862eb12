"""The one HTTP session and the request of CONTRACT §4; every failure classified into our types."""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, TypeVar

import aiohttp
import orjson

from enkwatch import __version__
from enkwatch.bodies import read_bounded
from enkwatch.clock import Clock, SystemClock
from enkwatch.errors import (
    ERR_CONNECTION,
    ERR_HTTP_STATUS,
    ERR_RATE_LIMITED,
    ERR_TIMEOUT,
    DeadlineReached,
    InvalidResponse,
    NotFound,
    PollError,
    TransientPollError,
    UnauthorizedAnswer,
)
from enkwatch.limits import RequestGate
from enkwatch.models import Lister, ListPage, Observation, TaskKind

MAX_BODY_BYTES: Final = 1024 * 1024
USER_AGENT: Final = f"enkwatch/{__version__}"
# a Retry-After larger than this is treated as this: a typo on the server must not stall us for days
MAX_RETRY_AFTER_S: Final = 3600.0
# the answers whose Retry-After pauses every request (any 5xx's still delays its own task)
PAUSING_STATUSES: Final = (429, 503)
_T = TypeVar("_T")


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


class ApiClient:
    """The request of a task's kind (`GET {base_url}<path>`) over one keep-alive session."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        timeout_s: float,
        gate: RequestGate,
        pool_size: int = 16,
        clock: Clock | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
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

    async def get_task(
        self,
        kind: TaskKind,
        task_id: str | None,
        dataset: str | None,
        give_up_at: float | None = None,
    ) -> Observation:
        """One request; an Observation, or a PollError subclass saying why not.

        `give_up_at` (monotonic): the task's deadline; DeadlineReached, and nothing sent, when
        the request's turn in the gate (rate limit, Retry-After pause) would come after it.
        """
        headers = kind.headers(task_id, dataset)
        path = kind.path(task_id, dataset)
        status, body, retry = await self._get(path, headers, None, give_up_at)
        clock = self._clock
        return self._classified(
            status, lambda: classify(kind, status, body, retry, clock, task_id, dataset)
        )

    async def list_page(self, lister: Lister, status: str, page: int, per_page: int) -> ListPage:
        """One page of a kind's list call (`?status=S&page=P&per_page=N`), or a PollError."""
        params = {"status": status, "page": str(page), "per_page": str(per_page)}
        code, body, retry = await self._get(lister.list_path, {}, params)
        clock = self._clock
        return self._classified(
            code, lambda: classify_list(lister, status, code, body, retry, clock)
        )

    async def _get(
        self,
        path: str,
        headers: dict[str, str],
        params: dict[str, str] | None,
        give_up_at: float | None = None,
    ) -> tuple[int, bytes | None, str | None]:
        """One GET through the gate: the status, the body (None when too large), Retry-After."""
        if self._session is None:
            raise RuntimeError("ApiClient used outside `async with`")
        headers["apikey"] = self._api_key
        if not await self._gate.acquire(give_up_at):
            raise DeadlineReached
        try:
            async with self._session.get(
                self._base_url + path, headers=headers, params=params, allow_redirects=False
            ) as resp:
                body = await _read_limited(resp)
                return resp.status, body, resp.headers.get("Retry-After")
        except TimeoutError:
            raise TransientPollError(ERR_TIMEOUT, "the request timed out") from None
        except aiohttp.ClientError as err:
            raise TransientPollError(ERR_CONNECTION, _describe(err)) from None

    def _classified(self, status: int, parse: Callable[[], _T]) -> _T:
        try:
            return parse()
        except PollError as err:
            wait = err.retry_after_s if isinstance(err, TransientPollError) else None
            if wait is not None and status in PAUSING_STATUSES:
                self._gate.pause(wait)  # slows every task, not only the one that got it
            # the body's error message is the server's text: it may echo the key back
            if self._api_key in err.detail:
                err.detail = err.detail.replace(self._api_key, "[redacted]")
                err.args = (err.detail,)
            raise


def classify(
    kind: TaskKind,
    status: int,
    body: bytes | None,
    retry_after: str | None,
    clock: Clock,
    task_id: str | None = None,
    dataset: str | None = None,
) -> Observation:
    """The one place where an answer becomes an Observation or a typed error; no side effects.

    `task_id` and `dataset` are what was asked: an answer about another task is invalid.
    """
    check_status(status, body, retry_after, clock)
    assert body is not None
    return parse_body(kind, body, status, task_id, dataset)


def classify_list(
    lister: Lister,
    wanted: str,
    status: int,
    body: bytes | None,
    retry_after: str | None,
    clock: Clock,
) -> ListPage:
    """A list answer: a ListPage, or the typed error of a poll (a 200 `error` is invalid)."""
    check_status(status, body, retry_after, clock)
    assert body is not None
    try:
        return lister.parse_list(orjson.loads(body), wanted)
    except orjson.JSONDecodeError:
        raise InvalidResponse("the body is not JSON", status) from None
    except ValueError as err:
        raise InvalidResponse(str(err), status) from None


def check_status(status: int, body: bytes | None, retry_after: str | None, clock: Clock) -> None:
    """Raise the typed error of an answer that is not a 200 with a body of at most 1 MiB."""
    if status in (401, 403):
        raise UnauthorizedAnswer(f"HTTP {status}", status)
    if status == 404:
        raise NotFound("HTTP 404: the API does not know this task", 404)
    if status in (429, 503) or status >= 500:
        wait = parse_retry_after(retry_after, clock.now())
        error = ERR_RATE_LIMITED if status == 429 else ERR_HTTP_STATUS
        raise TransientPollError(error, f"HTTP {status}", status, wait)
    if 300 <= status < 400:
        raise InvalidResponse(f"HTTP {status}: redirects are not followed", status)
    if status != 200:
        raise InvalidResponse(f"HTTP {status}", status)
    if body is None:
        raise InvalidResponse(f"the body is larger than {MAX_BODY_BYTES} bytes", status)


def parse_body(
    kind: TaskKind,
    body: bytes,
    http_status: int = 200,
    task_id: str | None = None,
    dataset: str | None = None,
) -> Observation:
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
        return kind.parse(payload, task_id, dataset)
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


__all__ = [
    "ApiClient",
    "PollError",
    "classify",
    "classify_list",
    "parse_body",
    "parse_retry_after",
]
