"""The poller: one poll of one task against a real aiohttp server, time from a FakeClock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.client import ApiClient
from enkwatch.clock import FakeClock
from enkwatch.config import PollingConfig, TaskConfig
from enkwatch.errors import AuthError
from enkwatch.events import EventWriter
from enkwatch.limits import RequestGate
from enkwatch.models import MAX_STATUS_CHARS, Observation
from enkwatch.state.base import TaskRecord
from enkwatch.state.sqlite import SqliteStore
from enkwatch.watch import AUTH_CONFIRM_DELAY_S, DONE, AuthRejected, Poller, TaskWatch

SECRET = "sk-test-SECRET-watch"
TASK_ID = "data-generation-535a2b71-ac8a-4a3d-8da3-b9b68b28e668"

Reply = Callable[[], web.StreamResponse]


def ok(status: str, **extra: Any) -> Reply:
    def reply() -> web.StreamResponse:
        data = {
            "dataset_name": "Election2",
            "created_at": "2025-02-28T11:07:36.872803+00:00",
            "started_at": "2025-02-28T11:07:37.853691+00:00",
            "status": status,
            "task_id": TASK_ID,
            **extra,
        }
        return web.json_response({"data": data})

    return reply


def http(code: int, headers: dict[str, str] | None = None) -> Reply:
    return lambda: web.json_response({"detail": "x"}, status=code, headers=headers)


class FakeApi:
    """Answers each request with the next scripted reply (the last one repeats)."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, str]] = []

    def script(self, *replies: Reply) -> None:
        self.replies = list(replies)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(dict(request.headers))
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply()


class Harness:
    def __init__(self, api: FakeApi, poller: Poller, store: SqliteStore, clock: FakeClock):
        self.api = api
        self.poller = poller
        self.store = store
        self.clock = clock
        self.sleeps: list[float] = []
        self.gate = RequestGate(0, clock)

    async def task(self, **cfg: Any) -> TaskWatch:
        config = TaskConfig(**({"task_id": TASK_ID} | cfg))
        record = TaskRecord(
            config.key,
            config.task_id,
            config.dataset,
            watch_started_at=self.clock.now().timestamp(),
        )
        await self.store.add_task(record)
        return TaskWatch.from_config(config, self.poller_polling, record)

    @property
    def poller_polling(self) -> PollingConfig:
        return self.poller.polling


@pytest.fixture
async def harness(aiohttp_server: Any) -> AsyncIterator[Harness]:
    api = FakeApi()
    app = web.Application()
    app.router.add_get("/datasets/get-task", api.handle)
    server: TestServer = await aiohttp_server(app)
    clock = FakeClock()
    store = SqliteStore(":memory:")
    polling = PollingConfig(
        interval_seconds=10, jitter=0.1, max_backoff_seconds=60, not_found_attempts=3
    )
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.advance(seconds)

    gate = RequestGate(0, clock, sleep=fake_sleep)
    async with ApiClient(str(server.make_url("")), SECRET, 5, gate) as client:
        writer = EventWriter(clock, store)
        poller = Poller(client, writer, clock, polling, random.Random(7), sleep=fake_sleep)
        h = Harness(api, poller, store, clock)
        h.sleeps = sleeps
        h.gate = gate
        yield h
    await store.close()


def names(logs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in logs]


async def test_an_answer_after_failures_leaves_no_trouble_object(harness: Harness) -> None:
    # failures in a row live in a side object, made at the first and dropped at the answer
    harness.api.script(http(503), ok("Queued"))
    task = await harness.task()
    assert task.trouble is None
    await harness.poller.poll(task)
    assert task.failures == 1 and task.last_error is not None and task.trouble is not None
    await harness.poller.poll(task)
    assert task.failures == 0 and task.last_error is None and task.trouble is None


def listed(status: str) -> Observation:
    return Observation(TASK_ID, "Election2", status, None, None, {}, True, status == "Finished")


async def test_a_list_is_used_only_after_an_own_answer_when_answers_were_not_recorded(
    harness: Harness,
) -> None:
    # a task of a kind the sweeps do not read records no answer times: were a list to name
    # it, a list read before its last own answer could undo that answer, so no list is used
    # until the next own answer
    harness.api.script(ok("Running"))
    task = await harness.task()
    await harness.poller.poll(task)
    listing = task.listed_here()
    listing.listed, listing.listed_mono = listed("Queued"), harness.clock.monotonic()
    harness.clock.advance(20)
    await harness.poller.poll(task)
    assert len(harness.api.requests) == 2 and task.record.last_status == "Running"
    harness.clock.advance(20)
    listing.listed, listing.listed_mono = listed("Finished"), harness.clock.monotonic()
    assert await harness.poller.poll(task) == DONE
    assert len(harness.api.requests) == 2 and task.record.last_status == "Finished"


async def test_first_observation_is_a_transition_from_null(harness: Harness) -> None:
    harness.api.script(ok("Queued"))
    task = await harness.task(labels={"team": "safety"})
    with capture_logs() as logs:
        delay = await harness.poller.poll(task)
    assert delay is not None and 9.0 <= delay <= 11.0
    [event] = logs
    assert event["event"] == ev.TASK_TRANSITION
    assert event["log_level"] == "info"
    assert event["previous_status"] is None
    assert event["status"] == "Queued"
    assert event["terminal"] is False
    assert event["polls"] == 1
    assert event["task_key"] == TASK_ID
    assert event["seq"] == 1
    assert event["event_id"] == f"{TASK_ID}:1"
    assert event["labels"] == {"team": "safety"}
    assert event["created_at"] == "2025-02-28T11:07:36.872803+00:00"
    assert event["started_at"] == "2025-02-28T11:07:37.853691+00:00"
    assert event["dataset"] == "Election2"  # configured by task_id only: from the API
    assert {"timestamp", "watched_seconds"} <= event.keys()


async def test_request_carries_the_contract_headers(harness: Harness) -> None:
    harness.api.script(ok("Queued"))
    await harness.poller.poll(await harness.task())
    await harness.poller.poll(await harness.task(task_id=None, dataset="Election2"))
    first, second = harness.api.requests
    assert first["apikey"] == SECRET
    assert first["X-Enkrypt-Task-ID"] == TASK_ID
    assert "X-Enkrypt-Dataset" not in first
    assert second["X-Enkrypt-Dataset"] == "Election2"
    assert "X-Enkrypt-Task-ID" not in second
    assert first["Accept"] == "application/json"
    assert first["User-Agent"].startswith("enkwatch/")


async def test_unchanged_status_emits_and_writes_nothing(harness: Harness) -> None:
    harness.api.script(ok("Running"))
    task = await harness.task()
    await harness.poller.poll(task)
    journal = harness.store.events(task.key)
    with capture_logs() as logs:
        for _ in range(5):
            await harness.poller.poll(task)
    assert logs == []
    assert harness.store.events(task.key) == journal
    assert task.record.polls == 6


async def test_every_change_once_and_terminal_stops(harness: Harness) -> None:
    harness.api.script(ok("Queued"), ok("Queued"), ok("Running"), ok("Running"), ok("Finished"))
    task = await harness.task()
    with capture_logs() as logs:
        delays = [await harness.poller.poll(task) for _ in range(5)]
    assert delays[-1] is DONE and all(d is not DONE for d in delays[:-1])
    transitions = [(e["previous_status"], e["status"]) for e in logs]
    assert transitions == [(None, "Queued"), ("Queued", "Running"), ("Running", "Finished")]
    assert [e["seq"] for e in logs] == [1, 2, 3]
    assert logs[-1]["terminal"] is True
    assert task.done and task.record.outcome == "Finished"
    stored = (await harness.store.load_tasks())[task.key]
    assert stored.last_status == "Finished" and stored.seq == 3 and stored.outcome == "Finished"


async def test_failed_is_a_warning(harness: Harness) -> None:
    harness.api.script(ok("Failed"))
    task = await harness.task()
    with capture_logs() as logs:
        assert await harness.poller.poll(task) is DONE
    assert logs[0]["log_level"] == "warning"
    assert task.failed


async def test_unknown_status_once_per_change_not_a_transition(harness: Harness) -> None:
    harness.api.script(
        ok("Running"), ok("Paused"), ok("Paused"), ok("Suspended"), ok("Paused"), ok("Finished")
    )
    task = await harness.task()
    with capture_logs() as logs:
        for _ in range(6):
            await harness.poller.poll(task)
    assert [(e["event"], e["status"]) for e in logs] == [
        (ev.TASK_TRANSITION, "Running"),
        (ev.TASK_UNKNOWN_STATUS, "Paused"),
        (ev.TASK_UNKNOWN_STATUS, "Suspended"),
        (ev.TASK_UNKNOWN_STATUS, "Paused"),
        (ev.TASK_TRANSITION, "Finished"),
    ]
    assert logs[1]["log_level"] == "warning"
    assert logs[-1]["previous_status"] == "Running"


async def test_failures_back_off_and_count_attempts(harness: Harness) -> None:
    harness.api.script(http(500), http(502), http(500), ok("Running"), http(500))
    task = await harness.task()
    with capture_logs() as logs:
        delays = [await harness.poller.poll(task) for _ in range(5)]
    failed = [e for e in logs if e["event"] == ev.TASK_POLL_FAILED]
    assert [e["attempt"] for e in failed] == [1, 2, 3, 1]
    assert [e["http_status"] for e in failed] == [500, 502, 500, 500]
    assert all(e["error"] == "http_status" and e["log_level"] == "warning" for e in failed)
    for event, delay in zip(failed[:3], delays[:3], strict=True):
        ceiling = min(60.0, 10.0 * 2 ** event["attempt"])
        assert delay is not None and ceiling / 10 <= delay <= ceiling
        assert event["retry_in_seconds"] == pytest.approx(delay, abs=0.001)
    assert task.failures == 1


async def test_backoff_is_capped(harness: Harness) -> None:
    task = await harness.task()
    task.failures = 40
    assert all(harness.poller.backoff(task) <= 60.0 for _ in range(100))


async def test_jitter_stays_in_bounds_and_varies(harness: Harness) -> None:
    task = await harness.task()
    draws = [harness.poller.next_interval(task) for _ in range(500)]
    assert min(draws) >= 9.0 and max(draws) <= 11.0
    assert max(draws) - min(draws) > 1.5


async def test_retry_after_is_a_floor_for_the_retry(harness: Harness) -> None:
    harness.api.script(http(429, {"Retry-After": "120"}))
    task = await harness.task()
    with capture_logs() as logs:
        delay = await harness.poller.poll(task)
    assert delay == pytest.approx(120.0)
    assert logs[0]["error"] == "rate_limited" and logs[0]["http_status"] == 429


async def test_not_found_counts_then_gives_up(harness: Harness) -> None:
    harness.api.script(http(404), http(404), ok("Queued"), http(404), http(404), http(404))
    task = await harness.task()
    with capture_logs() as logs:
        delays = [await harness.poller.poll(task) for _ in range(6)]
    assert delays[:5] != [DONE] * 5 and delays[5] is DONE
    assert names(logs) == [
        ev.TASK_POLL_FAILED,
        ev.TASK_POLL_FAILED,
        ev.TASK_TRANSITION,  # a real answer resets the count
        ev.TASK_POLL_FAILED,
        ev.TASK_POLL_FAILED,
        ev.TASK_GAVE_UP,
    ]
    gave_up = logs[-1]
    assert gave_up["reason"] == "not_found"
    assert gave_up["last_status"] == "Queued"
    assert gave_up["log_level"] == "error"
    assert task.gave_up and task.done


async def test_error_200_not_found_counts_too(harness: Harness) -> None:
    harness.api.script(lambda: web.json_response({"error": "Task NOT FOUND for this user"}))
    task = await harness.task()
    with capture_logs() as logs:
        delays = [await harness.poller.poll(task) for _ in range(3)]
    assert delays[2] is DONE
    assert logs[-1]["event"] == ev.TASK_GAVE_UP and logs[-1]["reason"] == "not_found"


async def test_deadline_gives_up_with_last_status(harness: Harness) -> None:
    harness.api.script(ok("Running"))
    task = await harness.task(deadline_seconds=25)
    first = await harness.poller.poll(task)
    assert first is not None and first <= 11.0
    harness.clock.advance(20)
    second = await harness.poller.poll(task)
    assert second == pytest.approx(5.0)  # the next poll is at the deadline, not after it
    harness.clock.advance(5)
    with capture_logs() as logs:
        assert await harness.poller.poll(task) is DONE
    [event] = logs
    assert event["event"] == ev.TASK_GAVE_UP
    assert event["reason"] == "deadline_exceeded"
    assert event["last_status"] == "Running"


async def test_terminal_at_the_deadline_is_a_transition(harness: Harness) -> None:
    harness.api.script(ok("Finished"))
    task = await harness.task(deadline_seconds=5)
    harness.clock.advance(100)
    with capture_logs() as logs:
        assert await harness.poller.poll(task) is DONE
    assert names(logs) == [ev.TASK_TRANSITION]
    assert task.record.outcome == "Finished"


async def test_auth_rejection_confirmed_is_the_result(harness: Harness) -> None:
    harness.api.script(http(401), http(403))
    task = await harness.task()
    with capture_logs() as logs:
        result = await harness.poller.poll(task)
    assert result == AuthRejected(403)
    assert harness.sleeps == [AUTH_CONFIRM_DELAY_S]
    assert len(harness.api.requests) == 2
    assert logs == []
    assert SECRET not in str(AuthError(result.http_status))


async def test_unconfirmed_auth_rejection_is_an_ordinary_failure(harness: Harness) -> None:
    harness.api.script(http(401), ok("Running"))
    task = await harness.task()
    with capture_logs() as logs:
        delay = await harness.poller.poll(task)
    assert delay is not None
    assert names(logs) == [ev.TASK_POLL_FAILED, ev.TASK_TRANSITION]
    assert logs[0]["http_status"] == 401 and logs[0]["error"] == "http_status"
    assert task.failures == 0


async def test_seq_continues_from_the_record(harness: Harness) -> None:
    harness.api.script(ok("Running"))
    task = await harness.task()
    task.record.seq = 41
    task.record.last_status = "Queued"
    with capture_logs() as logs:
        await harness.poller.poll(task)
    assert logs[0]["seq"] == 42 and logs[0]["event_id"] == f"{TASK_ID}:42"
    assert logs[0]["previous_status"] == "Queued"


async def test_events_are_journaled_and_confirmed(harness: Harness) -> None:
    harness.api.script(ok("Queued"), ok("Running"))
    task = await harness.task()
    await harness.poller.poll(task)
    await harness.poller.poll(task)
    journal = harness.store.events(task.key)
    assert [e["status"] for e in journal] == ["Queued", "Running"]
    assert await harness.store.unwritten_events() == []
    assert SECRET.encode() not in orjson.dumps(journal)


async def test_invalid_answers_are_failures_not_crashes(harness: Harness) -> None:
    harness.api.script(
        lambda: web.Response(text="<html>oops</html>", content_type="text/html"),
        lambda: web.json_response({"data": "nope"}),
        lambda: web.json_response({"data": {"status": "Running"}}),
        lambda: web.Response(body=b'{"data": {"stat', content_type="application/json"),
        ok("Finished"),
    )
    task = await harness.task()
    with capture_logs() as logs:
        delays = [await harness.poller.poll(task) for _ in range(5)]
    assert delays[-1] is DONE
    assert [e.get("error") for e in logs[:4]] == ["invalid_response"] * 4
    assert logs[-1]["status"] == "Finished"


# -- 13: deadlines on the monotonic clock, through pauses; answers about another task ----------


async def test_a_poll_held_by_a_pause_gives_up_at_its_deadline_without_sending(
    harness: Harness,
) -> None:
    harness.api.script(http(429, {"Retry-After": "1e12"}), ok("Running"))
    task = await harness.task(deadline_seconds=25)
    with capture_logs() as logs:
        first = await harness.poller.poll(task)
        assert first == pytest.approx(25.0)  # the retry is at the deadline, not in an hour
        assert harness.gate.pause_remaining() == pytest.approx(3600.0)
        # a poll that finds the gate paused (it was in flight when the pause began)
        assert await harness.poller.poll(task) is DONE
    assert len(harness.api.requests) == 1  # nothing sent after the 429
    assert harness.sleeps == [pytest.approx(25.0)]  # waited until the deadline, not after
    assert names(logs) == [ev.TASK_POLL_FAILED, ev.TASK_GAVE_UP]
    gave_up = logs[-1]
    assert gave_up["reason"] == "deadline_exceeded"
    assert gave_up["polls"] == 1 and task.record.polls == 1
    assert gave_up["watched_seconds"] == pytest.approx(25.0)


async def test_expire_gives_up_only_once_the_deadline_came(harness: Harness) -> None:
    task = await harness.task(deadline_seconds=5)
    early = await harness.poller.expire(task)
    assert early == pytest.approx(5.0)
    harness.clock.advance(5)
    with capture_logs() as logs:
        assert await harness.poller.expire(task) is DONE
    assert names(logs) == [ev.TASK_GAVE_UP] and harness.api.requests == []


@pytest.mark.parametrize("step_s", [7200.0, -7200.0])
async def test_a_wall_clock_step_neither_ends_nor_extends_a_deadline(
    harness: Harness, step_s: float
) -> None:
    harness.api.script(ok("Running"))
    task = await harness.task(deadline_seconds=3600)
    await harness.poller.poll(task)
    harness.clock.set_wall(harness.clock.now() + timedelta(seconds=step_s))
    with capture_logs() as logs:
        delay = await harness.poller.poll(task)
    assert logs == [] and delay is not DONE  # +2 h on the wall: still watched
    assert harness.poller.deadline_remaining(task) == pytest.approx(3600.0)
    harness.clock.advance(3600)  # an hour of monotonic time: the deadline, whatever the wall
    with capture_logs() as logs:
        assert await harness.poller.poll(task) is DONE
    assert names(logs) == [ev.TASK_GAVE_UP]
    assert logs[0]["watched_seconds"] == pytest.approx(3600.0)


async def test_a_deadline_is_anchored_on_the_stored_start_across_restarts(
    harness: Harness,
) -> None:
    harness.api.script(ok("Running"))
    task = await harness.task(deadline_seconds=100)
    task.record.watch_started_at -= 60  # watching began 60 s ago, in an earlier process
    assert harness.poller.deadline_remaining(task) == pytest.approx(40.0)
    late = await harness.task(deadline_seconds=100)
    late.record.watch_started_at -= 1000  # the deadline passed while the daemon was down
    with capture_logs() as logs:
        assert await harness.poller.poll(late) is DONE  # polled once, then given up
    assert len(harness.api.requests) == 1
    assert names(logs) == [ev.TASK_TRANSITION, ev.TASK_GAVE_UP]


@pytest.mark.parametrize(
    ("cfg", "answered"),
    [
        ({}, {"task_id": "data-generation-someone-else"}),
        ({"task_id": None, "dataset": "Election2"}, {"dataset_name": "Other"}),
    ],
    ids=["by-task-id", "by-dataset"],
)
async def test_an_answer_about_another_task_is_a_failure_not_a_transition(
    harness: Harness, cfg: dict[str, Any], answered: dict[str, str]
) -> None:
    harness.api.script(ok("Finished", **answered))
    task = await harness.task(**cfg)
    with capture_logs() as logs:
        delay = await harness.poller.poll(task)
    assert delay is not DONE and not task.done
    [event] = logs
    assert event["event"] == ev.TASK_POLL_FAILED and event["error"] == "invalid_response"
    assert "not the" in event["detail"]
    assert task.record.last_status is None and task.record.seen_task_id is None


async def test_an_unknown_status_is_cut_and_cleaned_in_its_event(harness: Harness) -> None:
    harness.api.script(ok("Stuck\x1b]0;pwned\x07\n" + "!" * 5000))
    task = await harness.task()
    with capture_logs() as logs:
        await harness.poller.poll(task)
    [event] = logs
    assert event["event"] == ev.TASK_UNKNOWN_STATUS
    assert event["status"].startswith("Stuck]0;pwned!")
    assert len(event["status"]) == MAX_STATUS_CHARS and event["status"].isprintable()
    assert task.record.last_unknown_status == event["status"]
