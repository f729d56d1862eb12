"""End to end, the poll path (issue 13): a Retry-After never holds a deadline; an answer about
another task is invalid; a status string from the API is cut and cleaned in events.

The API is a real aiohttp server on 127.0.0.1 in the test's event loop; the daemon is the
installed command as a subprocess (the kit's `enkwatch` fixture, tests/kit.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from enkwatch.client import MAX_RETRY_AFTER_S
from enkwatch.models import MAX_STATUS_CHARS
from tests.kit import Spawn, tid

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

DEADLINE_S = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Api:
    """A fake API answering every request with `reply`, counting the requests."""

    def __init__(self, reply: Callable[[web.Request], web.StreamResponse]) -> None:
        self.reply = reply
        self.requests = 0
        self.server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        return self.reply(request)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")


@pytest.fixture
def fake_api(aiohttp_server: Any) -> Callable[..., Awaitable[Api]]:
    async def start(reply: Callable[[web.Request], web.StreamResponse]) -> Api:
        api = Api(reply)
        app = web.Application()
        app.router.add_get("/datasets/get-task", api.handle)
        api.server = await aiohttp_server(app)
        return api

    return start


def observation(request: web.Request, **changes: str) -> web.StreamResponse:
    data = {
        "dataset_name": request.headers.get("X-Enkrypt-Dataset", "Election2"),
        "created_at": "2026-01-01T10:00:00Z",
        "status": "Running",
        "task_id": request.headers.get("X-Enkrypt-Task-ID", tid(1)),
        **changes,
    }
    return web.json_response({"data": data})


async def test_a_long_retry_after_does_not_hold_the_deadline(
    fake_api: Callable[..., Awaitable[Api]],
    enkwatch: Spawn,
) -> None:
    api = await fake_api(
        lambda request: web.json_response(
            {"detail": "slow down"}, status=429, headers={"Retry-After": "1e12"}
        )
    )
    run = await enkwatch(
        "watch", "--task-id", tid(1), "--interval", "0.1", "--deadline", str(DEADLINE_S),
        ENKWATCH_API__BASE_URL=api.url,
    )  # fmt: skip
    # before: still waiting out the hour-long pause after 30 s
    assert await run.wait_exit(within=DEADLINE_S + 15) == 3
    failed = run.one("task.poll_failed", tid(1))
    assert failed["error"] == "rate_limited" and failed["http_status"] == 429
    assert failed["retry_in_seconds"] <= DEADLINE_S < MAX_RETRY_AFTER_S
    gave_up = run.one("task.gave_up", tid(1))
    assert gave_up["reason"] == "deadline_exceeded"
    assert DEADLINE_S - 0.1 <= gave_up["watched_seconds"] <= DEADLINE_S + 2.0
    assert gave_up["polls"] == 1
    assert api.requests == 1  # the pause was honoured: given up without a request
    assert run.one("daemon.all_done")["gave_up"] == 1


@pytest.mark.parametrize(
    ("args", "changes", "named"),
    [
        (("--task-id", tid(1)), {"task_id": tid(2)}, "data.task_id"),
        (("--dataset", "Election2"), {"dataset_name": "Election3"}, "data.dataset_name"),
    ],
    ids=["by-task-id", "by-dataset"],
)
async def test_an_answer_about_another_task_is_invalid_not_an_observation(
    fake_api: Callable[..., Awaitable[Api]],
    enkwatch: Spawn,
    args: tuple[str, ...],
    changes: dict[str, str],
    named: str,
) -> None:
    api = await fake_api(lambda request: observation(request, status="Finished", **changes))
    run = await enkwatch(
        "watch", *args, "--interval", "0.1", "--deadline", "1",
        ENKWATCH_API__BASE_URL=api.url,
    )  # fmt: skip
    # before: another task's Finished was taken for ours, exit 0
    assert await run.wait_exit() == 3
    assert run.named("task.transition") == []
    failed = run.named("task.poll_failed")
    assert failed and all(e["error"] == "invalid_response" for e in failed)
    assert named in failed[0]["detail"]
    assert run.one("task.gave_up")["reason"] == "deadline_exceeded"


async def test_a_status_string_is_cut_and_cleaned_in_events(
    fake_api: Callable[..., Awaitable[Api]],
    enkwatch: Spawn,
) -> None:
    weird = "Stuck\x1b]0;owned\x07\r\n" + "!" * 100_000
    api = await fake_api(lambda request: observation(request, status=weird))
    run = await enkwatch(
        "watch", "--task-id", tid(1), "--interval", "0.1", "--deadline", "0.5",
        ENKWATCH_API__BASE_URL=api.url,
    )  # fmt: skip
    assert await run.wait_exit() == 3
    unknown = run.one("task.unknown_status", tid(1))  # once, not once per poll
    status = unknown["status"]
    assert status.startswith("Stuck]0;owned!!!") and status.endswith("\u2026")
    assert len(status) == MAX_STATUS_CHARS and status.isprintable()
    assert max(len(line) for line in run.lines) < 2000
    assert api.requests >= 2
