"""The API client against a real aiohttp server: the request, and every answer classified."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from enkwatch import __version__
from enkwatch.client import (
    MAX_BODY_BYTES,
    MAX_RETRY_AFTER_S,
    ApiClient,
    parse_body,
    parse_retry_after,
)
from enkwatch.clock import FakeClock, SystemClock
from enkwatch.errors import (
    InvalidResponse,
    NotFound,
    PollError,
    TransientPollError,
    UnauthorizedAnswer,
)
from enkwatch.kinds.dataset import DATASET as DATASET_KIND
from enkwatch.kinds.dataset import PATH
from enkwatch.limits import RequestGate
from enkwatch.models import MAX_STATUS_CHARS, Observation
from tests.bombs import bomb
from tests.kit import free_port

API_KEY = "sk-test-4f1c0e9a7b2d-DO-NOT-LEAK"
TASK_ID = "data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668"
DATASET = "Election2"
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

Responder = Callable[[web.Request], Awaitable[web.StreamResponse]]


def task_data(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "dataset_name": DATASET,
        "created_at": "2026-01-01T10:00:00Z",
        "started_at": "2026-01-01T10:00:05.123456+00:00",
        "status": "Running",
        "task_id": TASK_ID,
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value is not _DROP}


_DROP: Any = object()


def body(payload: object) -> bytes:
    return json.dumps(payload).encode()


def answer(
    status: int = 200,
    payload: object | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Responder:
    """A responder sending one fixed answer."""

    async def respond(_: web.Request) -> web.StreamResponse:
        data = (
            raw if raw is not None else body({"data": task_data()} if payload is None else payload)
        )
        return web.Response(
            status=status, body=data, headers=headers, content_type="application/json"
        )

    return respond


@dataclass
class Seen:
    """One request as the server received it."""

    path: str
    headers: dict[str, str]
    peer_port: int


@dataclass
class FakeApi:
    """A scripted Enkrypt API: answers from `script` in order, then a valid observation."""

    server: TestServer | None = None
    script: deque[Responder] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(request.path_qs, dict(request.headers), peer[1] if peer else -1))
        responder = self.script.popleft() if self.script else answer()
        return await responder(request)

    def then(self, *responders: Responder) -> None:
        self.script.extend(responders)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/"))


async def start_fake(aiohttp_server: AiohttpServer) -> FakeApi:
    fake = FakeApi()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    fake.server = await aiohttp_server(app)
    return fake


@pytest.fixture
async def api(aiohttp_server: AiohttpServer) -> AsyncIterator[FakeApi]:
    fake = await start_fake(aiohttp_server)
    yield fake
    # unblock handlers that wait for the test, before the server shuts down
    fake.release.set()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=NOW)


@dataclass
class Sleeps:
    """An injected sleep: records each wait and moves the fake clock instead of waiting."""

    clock: FakeClock
    waits: list[float] = field(default_factory=list)
    on_sleep: Callable[[], None] | None = None

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)
        if self.on_sleep is not None:
            self.on_sleep()


@pytest.fixture
def sleeps(clock: FakeClock) -> Sleeps:
    return Sleeps(clock)


@pytest.fixture
def gate(clock: FakeClock, sleeps: Sleeps) -> RequestGate:
    return RequestGate(0, clock=clock, sleep=sleeps)


MakeClient = Callable[..., Awaitable[ApiClient]]


@pytest.fixture
async def make_client(
    api: FakeApi, gate: RequestGate, clock: FakeClock
) -> AsyncIterator[MakeClient]:
    clients: list[ApiClient] = []

    async def make(base_url: str | None = None, timeout_s: float = 5.0) -> ApiClient:
        client = ApiClient(base_url or api.url, API_KEY, timeout_s, gate, clock=clock)
        await client.__aenter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: MakeClient) -> ApiClient:
    return await make_client()


async def poll_error(
    client: ApiClient, task_id: str | None = TASK_ID, dataset: str | None = DATASET
) -> PollError:
    with pytest.raises(PollError) as info:
        await client.get_task(DATASET_KIND, task_id, dataset)
    err = info.value
    assert API_KEY not in str(err)
    assert API_KEY not in err.detail
    assert API_KEY not in repr(err.args)
    return err


# --- the request ----------------------------------------------------------------------------

CONTRACT_HEADERS = ("apikey", "x-enkrypt-task-id", "x-enkrypt-dataset", "accept", "user-agent")


def contract_headers(seen: Seen) -> dict[str, str]:
    return {k.lower(): v for k, v in seen.headers.items() if k.lower() in CONTRACT_HEADERS}


async def test_request_with_task_id_and_dataset(client: ApiClient, api: FakeApi) -> None:
    await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    [seen] = api.seen
    assert seen.path == PATH
    assert contract_headers(seen) == {
        "apikey": API_KEY,
        "x-enkrypt-task-id": TASK_ID,
        "x-enkrypt-dataset": DATASET,
        "accept": "application/json",
        "user-agent": f"enkwatch/{__version__}",
    }


async def test_request_with_task_id_only(client: ApiClient, api: FakeApi) -> None:
    await client.get_task(DATASET_KIND, TASK_ID, None)
    headers = contract_headers(api.seen[0])
    assert headers["x-enkrypt-task-id"] == TASK_ID
    assert "x-enkrypt-dataset" not in headers


async def test_request_with_dataset_only(client: ApiClient, api: FakeApi) -> None:
    await client.get_task(DATASET_KIND, None, DATASET)
    headers = contract_headers(api.seen[0])
    assert headers["x-enkrypt-dataset"] == DATASET
    assert "x-enkrypt-task-id" not in headers
    assert headers["apikey"] == API_KEY


async def test_non_ascii_dataset_travels_intact(client: ApiClient, api: FakeApi) -> None:
    api.then(answer(payload={"data": task_data(dataset_name="Élection-2024")}))
    obs = await client.get_task(DATASET_KIND, None, "Élection-2024")
    assert api.seen[0].headers["X-Enkrypt-Dataset"] == "Élection-2024"
    assert obs.dataset_name == "Élection-2024"


# --- 13: an answer about another task than the one asked --------------------------------


@pytest.mark.parametrize(
    ("asked", "answered", "named"),
    [
        ((TASK_ID, None), {"task_id": "data-generation-someone-else"}, "data.task_id"),
        ((TASK_ID, DATASET), {"task_id": "data-generation-someone-else"}, "data.task_id"),
        ((None, DATASET), {"dataset_name": "AnotherDataset"}, "data.dataset_name"),
    ],
    ids=["by-task-id", "by-both", "by-dataset"],
)
async def test_an_answer_about_another_task_is_invalid(
    client: ApiClient,
    api: FakeApi,
    asked: tuple[str | None, str | None],
    answered: dict[str, str],
    named: str,
) -> None:
    api.then(answer(payload={"data": task_data(**answered)}))
    err = await poll_error(client, *asked)
    assert isinstance(err, InvalidResponse) and err.kind == "invalid_response"
    assert named in err.detail and "not the" in err.detail


async def test_asked_by_task_id_another_dataset_name_is_still_an_observation(
    client: ApiClient, api: FakeApi
) -> None:
    # the task id identifies the task; the dataset name is only reported
    api.then(answer(payload={"data": task_data(dataset_name="Renamed")}))
    obs = await client.get_task(DATASET_KIND, TASK_ID, None)
    assert obs.dataset_name == "Renamed"


def test_a_status_outside_the_vocabulary_is_cut_and_cleaned() -> None:
    weird = "Paus\x1b\x00ed\r\n\u202e" + "x" * 10_000
    obs = parse_body(DATASET_KIND, body({"data": task_data(status=weird, created_at="y" * 500)}))
    assert obs.status.startswith("Paused") and len(obs.status) == MAX_STATUS_CHARS
    assert obs.status.endswith("\u2026") and obs.status.isprintable()
    assert len(obs.created_at) == MAX_STATUS_CHARS and not obs.known
    # a known status is the one shared string object, untouched
    assert parse_body(DATASET_KIND, body({"data": task_data(status="Running")})).known
    with pytest.raises(InvalidResponse, match="no printable character"):
        parse_body(DATASET_KIND, body({"data": task_data(status="\x00\x07")}))


async def test_base_url_with_a_path_prefix(make_client: MakeClient, api: FakeApi) -> None:
    client = await make_client(api.url + "v1/")
    await client.get_task(DATASET_KIND, TASK_ID, None)
    assert api.seen[0].path == "/v1" + PATH


async def test_requests_reuse_one_connection(client: ApiClient, api: FakeApi) -> None:
    for _ in range(5):
        await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    assert len(api.seen) == 5
    assert len({s.peer_port for s in api.seen}) == 1


async def test_one_connection_survives_error_answers(client: ApiClient, api: FakeApi) -> None:
    api.then(answer(500, raw=b"oops"), answer(404, raw=b"{}"), answer(200, raw=b"<html>"))
    for _ in range(3):
        await poll_error(client)
    await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    assert len({s.peer_port for s in api.seen}) == 1


async def test_cookies_are_never_sent_back(client: ApiClient, api: FakeApi) -> None:
    api.then(answer(headers={"Set-Cookie": "session=abc; Path=/"}))
    await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    assert "Cookie" not in api.seen[1].headers


async def test_client_outside_async_with_is_a_programming_error(gate: RequestGate) -> None:
    client = ApiClient("http://127.0.0.1:1", API_KEY, 1.0, gate)
    with pytest.raises(RuntimeError):
        await client.get_task(DATASET_KIND, TASK_ID, None)


# --- a valid answer -------------------------------------------------------------------------


async def test_a_valid_answer_is_an_observation(client: ApiClient, api: FakeApi) -> None:
    data = task_data(status="Finished", max_prompts=100, tools=[], project_name=None)
    api.then(answer(payload={"data": data, "message": "ok", "extra": {"nested": True}}))
    obs = await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    assert obs == Observation(
        task_id=TASK_ID,
        dataset_name=DATASET,
        status="Finished",
        created_at="2026-01-01T10:00:00Z",
        started_at="2026-01-01T10:00:05.123456+00:00",
        data=data,
        known=True,
        terminal=True,
    )
    assert obs.known
    assert obs.terminal


@pytest.mark.parametrize("started_at", ["", "   ", "yesterday", "2026-13-45T99:00:00", 17, None])
async def test_an_empty_or_malformed_started_at_becomes_none(
    client: ApiClient, api: FakeApi, started_at: object
) -> None:
    api.then(answer(payload={"data": task_data(started_at=started_at)}))
    obs = await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    assert obs.started_at is None
    assert obs.status == "Running"


async def test_a_missing_started_at_is_none(client: ApiClient, api: FakeApi) -> None:
    api.then(answer(payload={"data": task_data(started_at=_DROP)}))
    assert (await client.get_task(DATASET_KIND, TASK_ID, DATASET)).started_at is None


async def test_an_unknown_status_is_still_an_observation(client: ApiClient, api: FakeApi) -> None:
    api.then(answer(payload={"data": task_data(status="Paused")}))
    obs = await client.get_task(DATASET_KIND, TASK_ID, DATASET)
    assert obs.status == "Paused"
    assert not obs.known


async def test_a_body_of_exactly_the_limit_is_read(client: ApiClient, api: FakeApi) -> None:
    raw = body({"data": task_data()})
    api.then(answer(raw=raw + b" " * (MAX_BODY_BYTES - len(raw))))
    assert (await client.get_task(DATASET_KIND, TASK_ID, DATASET)).task_id == TASK_ID


# --- answers that are not observations --------------------------------------------------------


@pytest.mark.parametrize(
    ("responder", "error_type", "kind", "http_status"),
    [
        pytest.param(
            answer(raw=b"<html><body>502 Bad Gateway</body></html>"),
            InvalidResponse,
            "invalid_response",
            200,
            id="html",
        ),
        pytest.param(
            answer(raw=body({"data": task_data()})[:40]),
            InvalidResponse,
            "invalid_response",
            200,
            id="truncated-json",
        ),
        pytest.param(answer(raw=b""), InvalidResponse, "invalid_response", 200, id="empty"),
        pytest.param(
            answer(payload={"error": "Internal failure"}),
            InvalidResponse,
            "invalid_response",
            200,
            id="error-200",
        ),
        pytest.param(
            answer(payload={"error": "Task not found"}),
            NotFound,
            "invalid_response",
            None,
            id="not-found-200",
        ),
        pytest.param(
            answer(payload={"error": "TASK NOT FOUND for this dataset"}),
            NotFound,
            "invalid_response",
            None,
            id="not-found-200-any-case",
        ),
        pytest.param(
            answer(payload={"data": [task_data()]}),
            InvalidResponse,
            "invalid_response",
            200,
            id="data-a-list",
        ),
        pytest.param(
            answer(payload={"data": "Running"}),
            InvalidResponse,
            "invalid_response",
            200,
            id="data-a-string",
        ),
        pytest.param(
            answer(payload=task_data()), InvalidResponse, "invalid_response", 200, id="no-data"
        ),
        pytest.param(
            answer(payload=[{"data": task_data()}]),
            InvalidResponse,
            "invalid_response",
            200,
            id="top-level-list",
        ),
        pytest.param(
            answer(payload={"data": task_data(status=None)}),
            InvalidResponse,
            "invalid_response",
            200,
            id="status-null",
        ),
        pytest.param(
            answer(payload={"data": task_data(status="")}),
            InvalidResponse,
            "invalid_response",
            200,
            id="status-empty",
        ),
        pytest.param(
            answer(status=204, raw=b""), InvalidResponse, "invalid_response", 204, id="http-204"
        ),
        pytest.param(
            answer(status=400, raw=b"{}"), InvalidResponse, "invalid_response", 400, id="http-400"
        ),
        pytest.param(answer(status=401), UnauthorizedAnswer, "http_status", 401, id="http-401"),
        pytest.param(answer(status=403), UnauthorizedAnswer, "http_status", 403, id="http-403"),
        pytest.param(
            answer(status=404, payload={"detail": "Task not found"}),
            NotFound,
            "http_status",
            404,
            id="http-404",
        ),
        pytest.param(
            answer(status=500, raw=b"boom"), TransientPollError, "http_status", 500, id="http-500"
        ),
        pytest.param(
            answer(status=502, raw=b"<html>"),
            TransientPollError,
            "http_status",
            502,
            id="http-502",
        ),
    ],
)
async def test_answers_are_classified(
    client: ApiClient,
    api: FakeApi,
    gate: RequestGate,
    responder: Responder,
    error_type: type[PollError],
    kind: str,
    http_status: int | None,
) -> None:
    api.then(responder)
    err = await poll_error(client)
    assert type(err) is error_type
    assert err.kind == kind
    assert err.http_status == http_status
    assert gate.pauses == 0


@pytest.mark.parametrize("missing", ["dataset_name", "created_at", "status", "task_id"])
async def test_a_missing_required_field_is_named(
    client: ApiClient, api: FakeApi, missing: str
) -> None:
    api.then(answer(payload={"data": task_data(**{missing: _DROP})}))
    err = await poll_error(client)
    assert isinstance(err, InvalidResponse)
    assert err.kind == "invalid_response"
    assert missing in err.detail


@pytest.mark.parametrize("wrong", ["dataset_name", "created_at", "status", "task_id"])
async def test_a_required_field_of_the_wrong_type(
    client: ApiClient, api: FakeApi, wrong: str
) -> None:
    api.then(answer(payload={"data": task_data(**{wrong: 42})}))
    err = await poll_error(client)
    assert isinstance(err, InvalidResponse)
    assert wrong in err.detail


async def test_a_body_over_the_limit_with_content_length(client: ApiClient, api: FakeApi) -> None:
    raw = body({"data": task_data()})
    api.then(answer(raw=raw + b" " * (MAX_BODY_BYTES + 1 - len(raw))))
    err = await poll_error(client)
    assert isinstance(err, InvalidResponse)
    assert err.kind == "invalid_response"
    assert "larger than" in err.detail
    # the client is still usable afterwards
    assert (await client.get_task(DATASET_KIND, TASK_ID, DATASET)).task_id == TASK_ID


async def test_a_chunked_body_over_the_limit(client: ApiClient, api: FakeApi) -> None:
    async def endless_chunks(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            await resp.write(b'{"data": {"pad": "')
            for _ in range(MAX_BODY_BYTES // 65536 + 2):
                await resp.write(b"x" * 65536)
            await resp.write(b'"}}')
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass  # the client hung up once it had read enough: as it should
        return resp

    api.then(endless_chunks)
    err = await poll_error(client)
    assert isinstance(err, InvalidResponse)
    assert "larger than" in err.detail
    assert (await client.get_task(DATASET_KIND, TASK_ID, DATASET)).task_id == TASK_ID


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_not_followed(
    client: ApiClient, api: FakeApi, aiohttp_server: AiohttpServer, status: int
) -> None:
    elsewhere = await start_fake(aiohttp_server)
    api.then(answer(status=status, raw=b"", headers={"Location": elsewhere.url + PATH[1:]}))
    err = await poll_error(client)
    assert isinstance(err, InvalidResponse)
    assert err.kind == "invalid_response"
    assert err.http_status == status
    assert "redirect" in err.detail
    assert elsewhere.seen == []
    assert len(api.seen) == 1


async def test_429_with_retry_after_seconds_pauses_the_gate(
    client: ApiClient, api: FakeApi, gate: RequestGate, sleeps: Sleeps
) -> None:
    api.then(answer(status=429, raw=b"slow down", headers={"Retry-After": "7"}))
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.kind == "rate_limited"
    assert err.http_status == 429
    assert err.retry_after_s == 7
    assert gate.pauses == 1
    assert gate.pause_remaining() == 7
    # the next request, for any task, waits the pause out first
    await client.get_task(DATASET_KIND, None, DATASET)  # another task, by dataset
    assert sleeps.waits == [7]
    assert gate.pause_remaining() == 0


async def test_429_without_retry_after(client: ApiClient, api: FakeApi, gate: RequestGate) -> None:
    api.then(answer(status=429, raw=b""))
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.kind == "rate_limited"
    assert err.retry_after_s is None
    assert gate.pauses == 0


async def test_503_with_retry_after_http_date_pauses_the_gate(
    client: ApiClient, api: FakeApi, gate: RequestGate, clock: FakeClock
) -> None:
    when = format_datetime(clock.now() + timedelta(seconds=120), usegmt=True)
    api.then(answer(status=503, raw=b"maintenance", headers={"Retry-After": when}))
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.kind == "http_status"
    assert err.http_status == 503
    assert err.retry_after_s == 120
    assert gate.pause_remaining() == 120


async def test_503_with_retry_after_seconds(
    client: ApiClient, api: FakeApi, gate: RequestGate
) -> None:
    api.then(answer(status=503, raw=b"", headers={"Retry-After": "30"}))
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.retry_after_s == 30
    assert gate.pause_remaining() == 30


async def test_500_with_retry_after_does_not_pause_the_gate(
    client: ApiClient, api: FakeApi, gate: RequestGate
) -> None:
    api.then(answer(status=500, raw=b"", headers={"Retry-After": "30"}))
    err = await poll_error(client)
    assert err.kind == "http_status"
    assert gate.pauses == 0


async def test_a_timeout_waiting_for_the_answer(make_client: MakeClient, api: FakeApi) -> None:
    async def stuck(request: web.Request) -> web.StreamResponse:
        await api.release.wait()
        return web.Response(text="too late")

    client = await make_client(timeout_s=0.2)
    api.then(stuck)
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.kind == "timeout"
    assert err.http_status is None


async def test_a_timeout_in_the_middle_of_the_body(make_client: MakeClient, api: FakeApi) -> None:
    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"data": ')
        await api.release.wait()
        return resp

    client = await make_client(timeout_s=0.2)
    api.then(stalls)
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.kind == "timeout"


async def test_the_server_hangs_up_without_answering(client: ApiClient, api: FakeApi) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        await api.release.wait()
        return web.Response()

    api.then(hang_up, hang_up)  # aiohttp itself retries an idempotent GET once
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.kind == "connection"


async def test_connection_refused(make_client: MakeClient) -> None:
    port = free_port()
    client = await make_client(f"http://127.0.0.1:{port}")
    err = await poll_error(client)
    assert isinstance(err, TransientPollError)
    assert err.kind == "connection"
    assert err.http_status is None
    assert str(port) in err.detail


async def test_the_api_key_is_redacted_when_the_server_echoes_it(
    client: ApiClient, api: FakeApi
) -> None:
    api.then(
        answer(payload={"error": f"invalid apikey {API_KEY}"}),
        answer(payload={"error": f"task not found for key {API_KEY}"}),
    )
    first = await poll_error(client)
    assert isinstance(first, InvalidResponse)
    assert "[redacted]" in first.detail
    assert str(first) == first.detail
    second = await poll_error(client)
    assert isinstance(second, NotFound)
    assert "[redacted]" in str(second)


# --- parse_body -----------------------------------------------------------------------------


def test_parse_body_of_a_valid_answer() -> None:
    obs = parse_body(DATASET_KIND, body({"data": task_data(started_at="")}))
    assert obs.task_id == TASK_ID
    assert obs.started_at is None


def test_parse_body_keeps_the_error_message_short() -> None:
    with pytest.raises(InvalidResponse) as info:
        parse_body(DATASET_KIND, body({"error": "x" * 10_000}))
    assert len(info.value.detail) < 300


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.sampled_from(["Queued", "Running", "Finished", "", "2026-01-01T00:00:00Z", "not found"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["data", "error", "dataset_name", "created_at", "started_at", "status", "task_id"]
            )
            | st.text(max_size=5),
            inner,
            max_size=6,
        )
    ),
    max_leaves=20,
)
near_valid = st.builds(
    lambda changes, extra: {"data": {**task_data(**changes), **extra}},
    st.dictionaries(
        st.sampled_from(["dataset_name", "created_at", "started_at", "status", "task_id"]),
        json_values | st.just(_DROP),
        max_size=3,
    ),
    st.dictionaries(st.text(max_size=5), json_values, max_size=2),
)


def assert_observation_or_typed_error(raw: bytes) -> None:
    error: PollError | None = None
    try:
        obs = parse_body(DATASET_KIND, raw)
    except (InvalidResponse, NotFound) as err:
        error = err
    else:
        assert isinstance(obs, Observation)
        assert obs.status
        assert obs.started_at is None or isinstance(obs.started_at, str)
        return
    assert error.kind == "invalid_response"
    assert isinstance(error.detail, str)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_parse_body_of_any_bytes(raw: bytes) -> None:
    assert_observation_or_typed_error(raw)


@given(json_values | near_valid)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parse_body_of_any_json(value: object) -> None:
    assert_observation_or_typed_error(json.dumps(value).encode())


# --- parse_retry_after ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 5 ", 5.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Thu, 01 Jan 2026 12:01:00 GMT", 60.0),
        ("Thursday, 01-Jan-26 12:00:30 GMT", 30.0),
        (format_datetime(NOW - timedelta(days=1), usegmt=True), 0.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("99999999", MAX_RETRY_AFTER_S),
        ("1e400", MAX_RETRY_AFTER_S),
        (format_datetime(NOW + timedelta(days=30), usegmt=True), MAX_RETRY_AFTER_S),
    ],
)
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, NOW) == seconds


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "nan", "12 seconds", "Mon, 99 Foo"])
def test_parse_retry_after_garbage(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@given(st.text(max_size=40))
@settings(max_examples=300, deadline=None)
def test_parse_retry_after_of_any_text(value: str) -> None:
    seconds = parse_retry_after(value, NOW)
    assert seconds is None or 0 <= seconds <= MAX_RETRY_AFTER_S


# --- RequestGate ----------------------------------------------------------------------------


def test_gate_pause_counts_down_with_the_clock(clock: FakeClock, sleeps: Sleeps) -> None:
    gate = RequestGate(0, clock=clock, sleep=sleeps)
    assert gate.pause_remaining() == 0
    gate.pause(10)
    clock.advance(4)
    assert gate.pause_remaining() == 6
    gate.pause(2)  # a shorter pause does not shorten the current one
    assert gate.pause_remaining() == 6
    assert gate.pauses == 1
    gate.pause(20)
    assert gate.pause_remaining() == 20
    assert gate.pauses == 2
    clock.advance(25)
    assert gate.pause_remaining() == 0


async def test_gate_acquire_waits_out_a_pause_extended_meanwhile(
    clock: FakeClock, sleeps: Sleeps
) -> None:
    gate = RequestGate(0, clock=clock, sleep=sleeps)
    gate.pause(5)
    extended: list[bool] = []

    def extend_once() -> None:
        if not extended:
            extended.append(True)
            gate.pause(3)  # another Retry-After arrives while we wait

    sleeps.on_sleep = extend_once
    await gate.acquire()
    assert sleeps.waits == [5, 3]
    assert gate.pause_remaining() == 0


async def test_gate_without_a_rate_limit_never_waits(clock: FakeClock, sleeps: Sleeps) -> None:
    gate = RequestGate(0, clock=clock, sleep=sleeps)
    for _ in range(1000):
        await gate.acquire()
    assert sleeps.waits == []


# -- 13.4: a wait in the gate ends at the task's deadline -------------------------------------


async def test_gate_pause_wait_ends_at_the_deadline(clock: FakeClock, sleeps: Sleeps) -> None:
    gate = RequestGate(0, clock=clock, sleep=sleeps)
    gate.pause(MAX_RETRY_AFTER_S)
    deadline = clock.monotonic() + 5
    assert await gate.acquire(deadline) is False
    assert sleeps.waits == [5]  # not the hour of the pause
    assert clock.monotonic() == deadline
    # a pause that ends before the deadline is waited out as before
    short = RequestGate(0, clock=clock, sleep=sleeps)
    short.pause(2)
    assert await short.acquire(clock.monotonic() + 10) is True
    assert sleeps.waits == [5, 2]


async def test_gate_last_poll_never_waits_through_a_pause(clock: FakeClock, sleeps: Sleeps) -> None:
    gate = RequestGate(0, clock=clock, sleep=sleeps)
    gate.pause(30)
    assert await gate.acquire(clock.monotonic()) is False  # its deadline is now
    assert await gate.acquire(clock.monotonic() - 100) is False  # passed while down
    assert sleeps.waits == []


async def test_gate_rate_limit_wait_ends_at_the_deadline() -> None:
    # the limiter keeps the loop's time: a real (short) deadline, waited on, not slept
    gate = RequestGate(0.001, clock=SystemClock())  # one request, then one per 1000 s
    assert await gate.acquire() is True
    started = time.monotonic()
    assert await gate.acquire(started + 0.05) is False
    assert 0.04 <= time.monotonic() - started < 5
    assert gate.limit_waits == 1 and not gate._waiting


class LoopTime:
    """Stands in for the event loop's clock inside the rate limiter."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    def is_closed(self) -> bool:
        return False


async def test_gate_rate_spaces_requests_evenly(clock: FakeClock, sleeps: Sleeps) -> None:
    # Deterministic: the limiter reads time from our LoopTime, and we only acquire when it
    # has capacity, so nothing waits on the real clock.
    rate = 20
    gate = RequestGate(rate, clock=clock, sleep=sleeps)
    limiter = gate._limiter
    assert limiter is not None
    loop_time = LoopTime()
    limiter._event_loop = cast(asyncio.AbstractEventLoop, loop_time)
    sent: list[float] = []
    for step in range(3001):  # 3 s in 1 ms steps
        loop_time.now = step / 1000
        if limiter.has_capacity():
            await gate.acquire()
            sent.append(loop_time.now)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= 1 / rate - 1e-9
    assert max(gaps) <= 1 / rate + 0.0011
    for start in sent:
        in_window = [t for t in sent if start <= t < start + 1]
        assert len(in_window) <= rate + 1
    assert 3 * rate <= len(sent) <= 3 * rate + 1
    assert sleeps.waits == []


# --- content codings: the limit holds for the decoded bytes ----------------------------------

BOMB_DECODED_BYTES = 64 * 1024 * 1024


def _compressor(coding: str) -> Any:
    import zlib

    if coding == "gzip":
        return zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS)


def valid_bomb(coding: str, decoded_bytes: int = BOMB_DECODED_BYTES) -> bytes:
    """A VALID observation padded to `decoded_bytes` once decoded, a few KB on the wire.

    Valid on purpose: a body the client inflated in full would be accepted, not refused as
    "not JSON" by accident.
    """
    head = json.dumps({"data": task_data(), "pad": ""}).encode()[:-2]
    return bomb(coding, decoded_bytes, head, b'"}')


def compressed_answer(raw: bytes, coding: str, chunked: bool) -> Responder:
    async def respond(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "Content-Encoding": coding}
        if not chunked:
            return web.Response(body=raw, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            for i in range(0, len(raw), 16 * 1024):
                await resp.write(raw[i : i + 16 * 1024])
            await resp.write_eof()
        except ConnectionError:
            pass  # the client hung up once it had read enough: as it should
        return resp

    return respond


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_compression_bomb_is_refused_after_the_limit(
    client: ApiClient, api: FakeApi, coding: str, chunked: bool
) -> None:
    import tracemalloc

    raw = valid_bomb(coding)
    assert len(raw) < MAX_BODY_BYTES  # on the wire it is small: Content-Length says nothing
    api.then(compressed_answer(raw, coding, chunked))
    tracemalloc.start()
    try:
        err = await poll_error(client)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(err, InvalidResponse)
    assert err.kind == "invalid_response"
    assert "larger than" in err.detail
    # about the limit was inflated, never the 64 MiB
    assert peak < 8 * MAX_BODY_BYTES, peak
    # the connection was dropped, not drained: the next poll works at once
    assert (await client.get_task(DATASET_KIND, TASK_ID, DATASET)).task_id == TASK_ID


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_compressed_answer_under_the_limit_is_read(
    client: ApiClient, api: FakeApi, coding: str, chunked: bool
) -> None:
    # decoded it is exactly the limit; on the wire a few KB
    head = body({"data": task_data()})
    plain = head + b" " * (MAX_BODY_BYTES - len(head))
    comp = _compressor(coding)
    api.then(compressed_answer(comp.compress(plain) + comp.flush(), coding, chunked))
    assert (await client.get_task(DATASET_KIND, TASK_ID, DATASET)).task_id == TASK_ID


async def test_a_compressed_answer_one_byte_over_the_limit(client: ApiClient, api: FakeApi) -> None:
    head = body({"data": task_data()})
    plain = head + b" " * (MAX_BODY_BYTES + 1 - len(head))
    comp = _compressor("gzip")
    api.then(compressed_answer(comp.compress(plain) + comp.flush(), "gzip", chunked=False))
    err = await poll_error(client)
    assert isinstance(err, InvalidResponse)
    assert "larger than" in err.detail


async def test_a_gzip_answer_longer_on_the_wire_than_the_limit(
    client: ApiClient, api: FakeApi
) -> None:
    # stored (level 0) deflate blocks: Content-Length > the limit, decoded exactly the limit
    import zlib

    head = body({"data": task_data()})
    plain = head + b" " * (MAX_BODY_BYTES - len(head))
    comp = zlib.compressobj(0, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    raw = comp.compress(plain) + comp.flush()
    assert len(raw) > MAX_BODY_BYTES
    api.then(compressed_answer(raw, "gzip", chunked=False))
    assert (await client.get_task(DATASET_KIND, TASK_ID, DATASET)).task_id == TASK_ID
