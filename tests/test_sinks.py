"""Webhook delivery: signatures, at-least-once from the outbox, order per task, dead letters."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from enkwatch.clock import FakeClock, SystemClock
from enkwatch.config import SinksConfig, WebhookConfig, parse_config
from enkwatch.errors import ConfigError
from enkwatch.formats import CLOUDEVENTS_TYPE
from enkwatch.sinks import Outbox, Sink, build_sinks, sink_id
from enkwatch.state.base import OutboxRow, TaskRecord
from enkwatch.state.sqlite import SqliteStore
from tests.kit import StartReceiver, StartSim, make_config, running, sim_task, until

SECRET = "whsec-test-123"


def verify(secret: str, header: str, body: bytes) -> bool:
    """An independent check of `X-Enkwatch-Signature`, as a receiver would write it."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(secret.encode(), parts["t"].encode() + b"." + body, "sha256").hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


def make_sink(url: str, **kw: Any) -> Sink:
    values: dict[str, Any] = {
        "id": "test",
        "url": url,
        "secret": SECRET.encode(),
        "events": frozenset({"task.transition", "task.gave_up"}),
        "timeout_s": 2.0,
        "max_age_s": 3600.0,
    }
    values.update(kw)
    return Sink(**values)


async def journal(store: SqliteStore, key: str, seq: int, sinks: list[str], **fields: Any) -> None:
    records = await store.load_tasks()
    record = records.get(key) or TaskRecord(key, key, None, 0.0)
    if key not in records:
        await store.add_task(record)
    record.seq = seq
    body = {"event": "task.transition", "task_key": key, "seq": seq, "event_id": f"{key}:{seq}"}
    await store.record_event(record, body | fields, sinks)


async def test_signature_verifies_independently_and_idempotency_key(
    hooks: StartReceiver,
) -> None:
    receiver = await hooks()
    store = SqliteStore(":memory:")
    outbox = Outbox(store, [make_sink(receiver.url)], SystemClock())
    await journal(store, "t1", 1, ["test"], status="Queued")
    await outbox.start()
    try:
        await asyncio.wait_for(receiver.got.wait(), 10)
    finally:
        await outbox.close()
    [(headers, body)] = receiver.received
    assert verify(SECRET, headers["X-Enkwatch-Signature"], body)
    assert not verify("other-secret", headers["X-Enkwatch-Signature"], body)
    timestamp = int(dict(p.split("=") for p in headers["X-Enkwatch-Signature"].split(","))["t"])
    assert abs(timestamp - SystemClock().now().timestamp()) < 60
    assert headers["Idempotency-Key"] == "t1:1"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["status"] == "Queued"
    assert store.outbox_stats() == (0, None)


async def test_failures_are_retried_in_order_per_task(hooks: StartReceiver) -> None:
    receiver = await hooks(fail_first=2)
    store = SqliteStore(":memory:")
    results: list[str] = []
    outbox = Outbox(
        store,
        [make_sink(receiver.url)],
        SystemClock(),
        on_result=lambda s, o: results.append(o),
        retry_base_s=0.01,
    )
    for seq in (1, 2, 3):
        await journal(store, "a", seq, ["test"])
        await journal(store, "b", seq, ["test"])
    await outbox.start()
    try:
        await until(lambda: len(receiver.received) == 6)
    finally:
        await outbox.close()
    order = [json.loads(body)["event_id"] for _, body in receiver.received]
    assert [e for e in order if e.startswith("a:")] == ["a:1", "a:2", "a:3"]
    assert [e for e in order if e.startswith("b:")] == ["b:1", "b:2", "b:3"]
    assert all(tries == 3 for tries in receiver.tries.values())
    assert results.count("failed") == 12 and results.count("delivered") == 6


async def test_outbox_survives_a_restart(hooks: StartReceiver, tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = SqliteStore(path)
    await journal(store, "a", 1, ["test"])
    await journal(store, "a", 2, ["test"])
    await store.close()  # the process dies before delivering anything

    receiver = await hooks()
    store = SqliteStore(path)
    assert store.outbox_stats()[0] == 2
    outbox = Outbox(store, [make_sink(receiver.url)], SystemClock())
    await outbox.start()
    try:
        assert await outbox.wait_idle(10)
    finally:
        await outbox.close()
    assert [json.loads(b)["event_id"] for _, b in receiver.received] == ["a:1", "a:2"]


async def test_dead_letter_after_max_age(hooks: StartReceiver) -> None:
    receiver = await hooks(fail_first=10**6)
    store = SqliteStore(":memory:")
    dead: list[tuple[str, OutboxRow, str]] = []
    outbox = Outbox(
        store,
        [make_sink(receiver.url, max_age_s=0.2)],
        SystemClock(),
        on_dead=lambda s, r, e: dead.append((s.id, r, e)),
        retry_base_s=0.01,
    )
    await journal(store, "a", 1, ["test"])
    await journal(store, "a", 2, ["test"])
    await outbox.start()
    try:
        await until(lambda: len(dead) == 2)
    finally:
        await outbox.close()
    assert [r.task_key for _, r, _ in dead] == ["a", "a"]
    assert dead[0][2] == "HTTP 503"
    assert store.outbox_stats() == (0, None)


async def test_unreachable_receiver_is_retried_not_fatal() -> None:
    store = SqliteStore(":memory:")
    results: list[str] = []
    outbox = Outbox(
        store,
        [make_sink("http://127.0.0.1:9/hook")],  # discard port: nothing listens
        SystemClock(),
        on_result=lambda s, o: results.append(o),
        retry_base_s=0.01,
    )
    await journal(store, "a", 1, ["test"])
    await outbox.start()
    try:
        await until(lambda: len(results) >= 2)
        assert not await outbox.wait_idle(0.05)
    finally:
        await outbox.close()
    assert set(results) == {"failed"}
    assert store.outbox_stats()[0] == 1


def test_sink_ids_do_not_reveal_urls() -> None:
    url = "https://hooks.slack.example/services/T000/B000/XXXXSECRET"
    assert "SECRET" not in sink_id(WebhookConfig(url=url))
    assert sink_id(WebhookConfig(url=url, name="slack")) == "slack"


def test_missing_secret_variable_is_a_config_error() -> None:
    config = SinksConfig(webhooks=[WebhookConfig(url="https://h.example/x", secret_env="NOPE")])
    with pytest.raises(ConfigError) as info:
        build_sinks(config, {})
    assert info.value.problems == ["sinks.webhooks[0].secret_env: the variable NOPE is not set"]
    [sink] = build_sinks(config, {"NOPE": "s3cret"})
    assert sink.secret == b"s3cret"


def test_webhook_config_validation_names_paths_without_echoing_urls() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "sinks": {
                    "webhooks": [
                        {"url": "ftp://token@x", "events": ["task.nope"]},
                        {"url": "https://h.example", "max_age_seconds": 0},
                    ]
                }
            },
            environ={},
        )
    text = "\n".join(info.value.problems)
    assert "sinks.webhooks[0].url" in text and "token" not in text
    assert "sinks.webhooks[0].events: unknown event(s) task.nope" in text
    assert "sinks.webhooks[1].max_age_seconds" in text


def test_webhook_event_names_match_the_vocabulary() -> None:
    from enkwatch import events as ev
    from enkwatch.models import WEBHOOK_EVENTS

    names = {v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str) and "." in v}
    assert names >= WEBHOOK_EVENTS


async def test_a_dead_lettered_delivery_is_an_event_of_the_service(
    tmp_path: Path, simulate: StartSim
) -> None:
    from structlog.testing import capture_logs

    from enkwatch import events as ev

    hook = {"url": "http://127.0.0.1:9/hook", "name": "pager", "max_age_seconds": 0.01}
    sim = await simulate(sim_task("t1", ("Running", None)))
    url = sim.url
    config = make_config(url, str(tmp_path / "s.db"), [{"task_id": "t1"}])
    sinks = build_sinks(SinksConfig.model_validate({"webhooks": [hook]}), {})
    with capture_logs() as logs:
        async with running(config, sinks=sinks):
            await until(lambda: any(e["event"] == ev.SINK_DELIVERY_FAILED for e in logs))
    [failed] = [e for e in logs if e["event"] == ev.SINK_DELIVERY_FAILED]
    assert failed["log_level"] == "error"
    assert failed["sink"] == "pager"
    assert failed["failed_event"] == ev.TASK_TRANSITION
    assert failed["failed_event_id"] == "t1:1"
    assert failed["error"].startswith("connection")


# --- a receiver's answer is never read whole --------------------------------------------------


class HugeAnswer:
    """A receiver that answers 200 with `size` bytes, generated as they are sent."""

    def __init__(self, size: int, coding: str | None = None) -> None:
        self.size = size
        self.coding = coding
        self.sent = 0
        self.answers_done = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        headers = {"Content-Type": "text/plain"}
        if self.coding is not None:
            headers["Content-Encoding"] = self.coding
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = self.size
        await resp.prepare(request)
        block = b"x" * (1024 * 1024)
        try:
            while self.sent < self.size:
                chunk = block[: self.size - self.sent]
                await resp.write(chunk)
                self.sent += len(chunk)
            await resp.write_eof()
        except ConnectionError:
            pass  # the sender hung up: as it should, once it had the status
        finally:
            self.answers_done.set()
        return resp


async def test_a_huge_answer_is_not_read(aiohttp_server: Any) -> None:
    receiver = HugeAnswer(800 * 1024 * 1024)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    server = await aiohttp_server(app)
    store = SqliteStore(":memory:")
    results: list[str] = []
    outbox = Outbox(
        store,
        [make_sink(str(server.make_url("/hook")), timeout_s=30.0)],
        SystemClock(),
        on_result=lambda s, o: results.append(o),
    )
    await journal(store, "a", 1, ["test"])
    await outbox.start()
    try:
        assert await outbox.wait_idle(20)
        await asyncio.wait_for(receiver.answers_done.wait(), 20)
    finally:
        await outbox.close()
    assert results == ["delivered"]
    assert store.outbox_stats() == (0, None)
    # the sender hung up after the first bytes: what got through is what the sockets buffer
    assert receiver.sent < 64 * 1024 * 1024, receiver.sent


async def test_a_gzip_bomb_answer_is_not_inflated(aiohttp_server: Any) -> None:
    import tracemalloc

    from tests.bombs import bomb

    wire = bomb("gzip", 512 * 1024 * 1024)

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=wire, headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_post("/hook", handle)
    server = await aiohttp_server(app)
    store = SqliteStore(":memory:")
    results: list[str] = []
    outbox = Outbox(
        store,
        [make_sink(str(server.make_url("/hook")), timeout_s=30.0)],
        SystemClock(),
        on_result=lambda s, o: results.append(o),
    )
    await journal(store, "a", 1, ["test"])
    tracemalloc.start()
    try:
        await outbox.start()
        assert await outbox.wait_idle(20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await outbox.close()
    assert results == ["delivered"]
    assert peak < 16 * 1024 * 1024, peak


# -- Standard Webhooks, formats, filters, what receivers answer (issue 12) ------------------

NEW_SECRET = "whsec_" + base64.b64encode(b"n" * 32).decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"o" * 24).decode()


def fake_clock() -> FakeClock:
    # the store stamps rows with the real time: a fake clock starts a little after it (rows
    # written during the test are due), then moves only when the test says so
    return FakeClock(start=datetime.now(UTC) + timedelta(seconds=30))


class Recorder:
    """A real receiver answering from a script (status, headers) per request, then 204."""

    def __init__(self, *script: tuple[int, dict[str, str]]) -> None:
        self.script = list(script)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answered: list[int] = []
        self.got = asyncio.Event()
        self.hang: asyncio.Event | None = None
        self.arrived = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.arrived += 1
        if self.hang is not None:
            await self.hang.wait()
        status, headers = self.script.pop(0) if self.script else (204, {})
        self.answered.append(status)
        if 200 <= status < 300:
            self.received.append((dict(request.headers), body))
            self.got.set()
        return web.Response(status=status, headers=headers)


async def serve_recorder(aiohttp_server: Any, recorder: Recorder) -> TestServer:
    app = web.Application()
    app.router.add_post("/hook", recorder.handle)
    app.router.add_post("/moved", recorder.handle)
    server: TestServer = await aiohttp_server(app)
    return server


def sinks_from(hooks: list[dict[str, Any]], environ: dict[str, str]) -> list[Sink]:
    return build_sinks(SinksConfig.model_validate({"webhooks": hooks}), environ)


async def test_standard_webhooks_verify_with_the_reference_library(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    recorder = Recorder()
    server = await serve_recorder(aiohttp_server, recorder)
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"{OLD_SECRET}\n", encoding="utf-8")
    [sink] = sinks_from(
        [
            {
                "url": str(server.make_url("/hook")),
                "name": "test",
                "secret_env": "LEGACY",
                "secrets": [{"env": "NEW"}, {"file": str(secret_file)}],
            }
        ],
        {"NEW": NEW_SECRET, "LEGACY": SECRET},
    )
    store = SqliteStore(":memory:")
    outbox = Outbox(store, [sink], SystemClock())
    await journal(store, "t1", 1, ["test"], status="Queued")
    await outbox.start()
    try:
        await asyncio.wait_for(recorder.got.wait(), 10)
    finally:
        await outbox.close()
    [(headers, body)] = recorder.received
    assert headers["webhook-id"] == "t1:1" == headers["Idempotency-Key"]
    assert abs(int(headers["webhook-timestamp"]) - SystemClock().now().timestamp()) < 60
    # both secrets of a rotation verify, and the deprecated secret_env's raw bytes too
    for key in (NEW_SECRET, OLD_SECRET, SECRET.encode()):
        assert Webhook(key).verify(body, headers)["event_id"] == "t1:1"
    assert len(headers["webhook-signature"].split(" ")) == 3
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    # the deprecated header is unchanged for today's receivers
    assert verify(SECRET, headers["X-Enkwatch-Signature"], body)


def test_secret_problems_name_the_key_never_the_value(tmp_path: Path) -> None:
    short = "whsec_" + base64.b64encode(b"s" * 8).decode()
    hooks = [
        {"url": "https://h.example/a", "secrets": [{"env": "NOT_WHSEC"}, {"env": "UNSET"}]},
        {"url": "https://h.example/b", "secrets": [{"env": "BAD64"}, {"env": "SHORT"}]},
        {"url": "https://h.example/c", "secrets": [{"file": str(tmp_path / "none")}]},
        {
            "url": "https://h.example/d",
            "format": "pagerduty",
            "routing_key": {"env": "PD_UNSET"},
        },
    ]
    environ = {"NOT_WHSEC": "hunter2-plain", "BAD64": "whsec_!!not-base64!!", "SHORT": short}
    with pytest.raises(ConfigError) as info:
        sinks_from(hooks, environ)
    text = "\n".join(info.value.problems)
    assert "sinks.webhooks[0].secrets[0]: the variable NOT_WHSEC: a secret must be written" in text
    assert "sinks.webhooks[0].secrets[1].env: the variable UNSET is not set" in text
    assert "sinks.webhooks[1].secrets[0]: the variable BAD64: a secret must be written" in text
    assert "sinks.webhooks[1].secrets[1]: the variable SHORT: a secret must hold 24" in text
    assert "sinks.webhooks[2].secrets[0].file: cannot read" in text
    assert "sinks.webhooks[3].routing_key.env: the variable PD_UNSET is not set" in text
    for value in ("hunter2", "not-base64", short):
        assert value not in text


async def test_a_redirect_is_a_failure_and_is_not_followed(aiohttp_server: Any) -> None:
    recorder = Recorder((307, {"Location": "/moved"}))
    server = await serve_recorder(aiohttp_server, recorder)
    store = SqliteStore(":memory:")
    results: list[str] = []
    outbox = Outbox(
        store,
        [make_sink(str(server.make_url("/hook")))],
        fake_clock(),
        on_result=lambda s, o: results.append(o),
    )
    await journal(store, "a", 1, ["test"])
    await outbox.start()
    try:
        await until(lambda: results == ["failed"])
    finally:
        await outbox.close()
    assert recorder.answered == [307] and not recorder.received


async def test_gone_disables_the_sink_across_restarts_until_its_config_changes(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    recorder = Recorder((410, {}))
    server = await serve_recorder(aiohttp_server, recorder)
    path = str(tmp_path / "state.db")
    store = SqliteStore(path)
    sink = make_sink(str(server.make_url("/hook")), fingerprint="config-1")
    disabled: list[tuple[str, int, int]] = []
    outbox = Outbox(
        store, [sink], fake_clock(), on_disabled=lambda s, c, n: disabled.append((s.id, c, n))
    )
    await journal(store, "a", 1, ["test"])
    await journal(store, "a", 2, ["test"])
    await outbox.start()
    try:
        await until(lambda: bool(disabled))
        assert await outbox.wait_idle(5)
    finally:
        await outbox.close()
    assert disabled == [("test", 410, 2)]  # both pending deliveries were dropped
    assert recorder.answered == [410]
    assert outbox.sinks_for({"event": "task.transition", "task_key": "a"}) == []
    assert store.outbox_stats() == (0, None)
    await store.close()

    # a restart with the same config: still disabled, nothing is sent
    store = SqliteStore(path)
    outbox = Outbox(store, [sink], fake_clock())
    await outbox.start()
    try:
        assert outbox.disabled == {"test"}
        assert outbox.sinks_for({"event": "task.transition", "task_key": "a"}) == []
    finally:
        await outbox.close()

    # its config changed: enabled again, and it receives
    changed = make_sink(str(server.make_url("/hook")), fingerprint="config-2")
    outbox = Outbox(store, [changed], fake_clock())
    await outbox.start()
    try:
        assert outbox.disabled == set()
        await journal(store, "a", 3, outbox.sinks_for({"event": "task.transition"}))
        outbox.notify()
        await asyncio.wait_for(recorder.got.wait(), 10)
    finally:
        await outbox.close()
    assert await store.disabled_sinks() == {}


async def test_a_reload_enables_a_changed_disabled_sink_and_stops_a_removed_one(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    recorder = Recorder((410, {}))
    server = await serve_recorder(aiohttp_server, recorder)
    store = SqliteStore(str(tmp_path / "state.db"))
    sink = make_sink(str(server.make_url("/hook")), fingerprint="config-1")
    outbox = Outbox(store, [sink], fake_clock())
    await journal(store, "a", 1, ["test"])
    await outbox.start()
    try:
        await until(lambda: outbox.stats()[2] == 1)  # disabled: the gauge's figure
        changed = make_sink(str(server.make_url("/hook")), fingerprint="config-2")
        await outbox.reconfigure([changed])
        assert outbox.disabled == set() and await store.disabled_sinks() == {}
        await journal(store, "a", 2, outbox.sinks_for({"event": "task.transition"}))
        outbox.notify()
        await asyncio.wait_for(recorder.got.wait(), 10)
        await outbox.reconfigure([])
        assert outbox.sinks_for({"event": "task.transition"}) == []
        assert outbox.stats()[2] == 0
    finally:
        await outbox.close()
        await store.close()


async def test_retry_after_pauses_the_whole_sink(aiohttp_server: Any) -> None:
    recorder = Recorder((429, {"Retry-After": "120"}))
    server = await serve_recorder(aiohttp_server, recorder)
    store = SqliteStore(":memory:")
    clock = fake_clock()
    results: list[str] = []
    outbox = Outbox(
        store,
        [make_sink(str(server.make_url("/hook")))],
        clock,
        on_result=lambda s, o: results.append(o),
        retry_base_s=0.01,
    )
    await journal(store, "a", 1, ["test"])
    await outbox.start()
    try:
        await until(lambda: results == ["failed"])
        [row] = await store.pending_deliveries("test", 10)
        assert row.next_attempt_at >= clock.now().timestamp() + 120
        # another task's delivery, due now, waits for the pause too
        await journal(store, "b", 1, ["test"])
        assert not await outbox.wait_idle(0.2)
        assert recorder.answered == [429]
        clock.advance(121)
        outbox.notify()
        await until(lambda: len(recorder.received) == 2)
    finally:
        await outbox.close()
    assert sorted(json.loads(b)["task_key"] for _, b in recorder.received) == ["a", "b"]


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_overloaded_receivers_pause_their_sink(aiohttp_server: Any, status: int) -> None:
    recorder = Recorder((status, {}))
    server = await serve_recorder(aiohttp_server, recorder)
    store = SqliteStore(":memory:")
    clock = fake_clock()
    outbox = Outbox(store, [make_sink(str(server.make_url("/hook")))], clock, retry_base_s=10)
    await journal(store, "a", 1, ["test"])
    await outbox.start()
    try:
        await until(lambda: recorder.answered == [status])
        await journal(store, "b", 1, ["test"])
        assert not await outbox.wait_idle(0.1)
        assert recorder.answered == [status]
        clock.advance(600)
        outbox.notify()
        await until(lambda: len(recorder.received) == 2)
    finally:
        await outbox.close()


def test_filters_by_event_status_kind_and_labels() -> None:
    [sink] = sinks_from(
        [
            {
                "url": "https://h.example/x",
                "events": ["task.transition", "task.gave_up", "daemon.started"],
                "statuses": ["failed"],
                "kinds": ["dataset", "redteam"],
                "labels": {"team": "safety", "tier": 1},
            }
        ],
        {},
    )
    base = {
        "event": "task.transition",
        "task_key": "t",
        "status": "Failed",
        "labels": {"team": "safety", "tier": "1", "other": "x"},
    }
    assert sink.wants(base)
    assert not sink.wants(base | {"status": "Finished"})
    assert not sink.wants(base | {"event": "task.poll_failed"})
    assert not sink.wants(base | {"kind": "redteam_run"})
    assert sink.wants(base | {"kind": "redteam"})
    assert not sink.wants(base | {"labels": {"team": "safety"}})
    assert not sink.wants(base | {"labels": {"team": "ops", "tier": "1"}})
    # a status filter applies to events that carry a status
    gave_up = {"event": "task.gave_up", "task_key": "t", "labels": base["labels"]}
    assert sink.wants(gave_up)
    # the task filters do not apply to events that are not about a task
    assert sink.wants({"event": "daemon.started"})


async def test_a_restart_applies_narrower_filters_to_pending_deliveries(
    aiohttp_server: Any,
) -> None:
    recorder = Recorder()
    server = await serve_recorder(aiohttp_server, recorder)
    store = SqliteStore(":memory:")
    await journal(store, "a", 1, ["test"], status="Running")
    await journal(store, "a", 2, ["test"], status="Failed")
    results: list[str] = []
    sink = make_sink(str(server.make_url("/hook")), statuses=frozenset({"failed"}))
    outbox = Outbox(store, [sink], fake_clock(), on_result=lambda s, o: results.append(o))
    await outbox.start()
    try:
        assert await outbox.wait_idle(10)
    finally:
        await outbox.close()
    assert results == ["filtered", "delivered"]
    assert [json.loads(b)["status"] for _, b in recorder.received] == ["Failed"]


async def test_each_format_goes_out_with_its_content_type(aiohttp_server: Any) -> None:
    recorder = Recorder()
    server = await serve_recorder(aiohttp_server, recorder)
    url = str(server.make_url("/hook"))
    sinks = sinks_from(
        [
            {"url": url, "name": "ce", "format": "cloudevents", "secrets": [{"env": "S"}]},
            {"url": url, "name": "pd", "format": "pagerduty", "routing_key": {"env": "PD"}},
            {"url": url, "name": "tpl", "format": "template", "template": '{"k": "{{ seq }}"}'},
        ],
        {"S": NEW_SECRET, "PD": "pd-routing-key-123"},
    )
    store = SqliteStore(":memory:")
    outbox = Outbox(store, sinks, SystemClock())
    event = {"event": "task.transition", "task_key": "t1", "status": "Failed", "terminal": True}
    await journal(store, "t1", 1, outbox.sinks_for(event), status="Failed", terminal=True)
    await outbox.start()
    try:
        await until(lambda: len(recorder.received) == 3)
    finally:
        await outbox.close()
    by_type = {h["Content-Type"]: (h, b) for h, b in recorder.received}
    headers, body = by_type[CLOUDEVENTS_TYPE]
    assert Webhook(NEW_SECRET).verify(body, headers)["id"] == "t1:1"
    message = HTTPMessage(headers={"content-type": headers["Content-Type"]}, body=body)
    assert from_http_event(message).get_subject() == "t1"
    bodies = [json.loads(b) for h, b in recorder.received if h is not headers]
    assert {"k": "1"} in bodies
    [pd] = [b for b in bodies if "routing_key" in b]
    assert pd["event_action"] == "trigger" and pd["dedup_key"] == "t1"


async def test_a_hanging_sink_holds_back_neither_polling_nor_another_sink(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    from tests.kit import simulator

    hanging, healthy = Recorder(), Recorder()
    hanging.hang = asyncio.Event()
    hang_server = await serve_recorder(aiohttp_server, hanging)
    ok_server = await serve_recorder(aiohttp_server, healthy)
    hooks = [
        {"url": str(hang_server.make_url("/hook")), "name": "hang", "timeout_seconds": 60},
        {"url": str(ok_server.make_url("/hook")), "name": "ok"},
    ]
    tasks = [
        sim_task(f"t{i}", ("Queued", 0.1), ("Running", 0.1), ("Finished", None)) for i in range(3)
    ]
    try:
        async with simulator(*tasks) as sim:
            url = sim.url
            config = make_config(
                url, str(tmp_path / "s.db"), [{"task_id": f"t{i}"} for i in range(3)]
            )
            async with running(config, sinks=sinks_from(hooks, {})) as service:
                # every transition of every task reaches the healthy sink, while the other hangs
                await until(lambda: len(healthy.received) == 9, within=20)
                assert service.running is not None
                assert all(t.done for t in service.running.watchlist.tasks.values())
                assert hanging.arrived >= 1 and not hanging.answered
    finally:
        hanging.hang.set()


async def test_gone_is_a_sink_disabled_event_of_the_service(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    import structlog
    from structlog.testing import capture_logs

    from enkwatch import events as ev
    from tests.kit import simulator

    structlog.reset_defaults()
    recorder = Recorder((410, {}))
    server = await serve_recorder(aiohttp_server, recorder)
    hooks = [{"url": str(server.make_url("/hook")), "name": "gone"}]
    async with simulator(sim_task("t1", ("Running", None))) as sim:
        url = sim.url
        config = make_config(url, str(tmp_path / "s.db"), [{"task_id": "t1"}])
        with capture_logs() as logs:
            async with running(config, sinks=sinks_from(hooks, {})):
                await until(lambda: any(e["event"] == ev.SINK_DISABLED for e in logs))
    [disabled] = [e for e in logs if e["event"] == ev.SINK_DISABLED]
    assert disabled["log_level"] == "warning"
    assert disabled["sink"] == "gone" and disabled["http_status"] == 410


def docs_block(lang: str, containing: str) -> str:
    """The fenced `lang` block of docs/notifications.md that contains `containing`."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "notifications.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```" + lang + "\n")[1:]]
    [block] = [b for b in blocks if containing in b]
    return block


async def test_the_docs_verifiers_accept_a_delivery_and_refuse_a_forgery(
    aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = Recorder()
    server = await serve_recorder(aiohttp_server, recorder)
    url = str(server.make_url("/hook"))
    [sink] = sinks_from(
        [{"url": url, "name": "test", "secrets": [{"env": "S"}]}], {"S": NEW_SECRET}
    )
    store = SqliteStore(":memory:")
    outbox = Outbox(store, [sink], SystemClock())
    await journal(store, "t1", 1, ["test"], status="Failed")
    await outbox.start()
    try:
        await asyncio.wait_for(recorder.got.wait(), 10)
    finally:
        await outbox.close()
    [(headers, body)] = recorder.received
    headers = {k.lower(): v for k, v in headers.items()}
    forged = body.replace(b"Failed", b"Finish")

    monkeypatch.setenv("ENKWATCH_WEBHOOK_SECRET", NEW_SECRET)
    namespace: dict[str, Any] = {}
    exec(docs_block("python", "Webhook(os.environ"), namespace)
    assert namespace["receive"](body, headers)["status"] == "Failed"
    assert namespace["receive"](forged, headers) is None

    node = shutil.which("node")
    if node is None:
        pytest.skip("no node here: the Node.js snippet is not run")
    driver = docs_block("js", "function verify") + (
        "const m = JSON.parse(require('fs').readFileSync(0, 'utf8'));\n"
        "console.log(JSON.stringify(m.bodies.map((b) =>"
        " verify(m.secret, m.headers, Buffer.from(b, 'base64')))));\n"
    )
    message = {
        "secret": NEW_SECRET,
        "headers": headers,
        "bodies": [base64.b64encode(b).decode() for b in (body, forged)],
    }
    proc = await asyncio.create_subprocess_exec(
        node, "-e", driver, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(json.dumps(message).encode()), 30)
    assert json.loads(out) == [True, False]


def test_sink_secrets_and_routing_keys_are_redacted_in_events() -> None:
    from structlog.testing import capture_logs

    from enkwatch.clock import FakeClock as Clock
    from enkwatch.events import EventWriter
    from enkwatch.sinks import sink_secrets

    routing = "R0uting-key-0123456789abcdef"
    sinks = sinks_from(
        [
            {"url": "https://h.example/a", "secrets": [{"env": "NEW"}]},
            {"url": "https://h.example/b", "format": "pagerduty", "routing_key": {"env": "PD"}},
        ],
        {"NEW": NEW_SECRET, "PD": routing},
    )
    assert set(sink_secrets(sinks)) == {NEW_SECRET, routing}
    writer = EventWriter(Clock())
    writer.add_secrets(sink_secrets(sinks))  # as a reload does
    with capture_logs() as logs:
        writer.daemon_event("config.reload_failed", errors=[f"echoed {NEW_SECRET} {routing}"])
    text = json.dumps(logs)
    assert NEW_SECRET not in text and routing not in text
