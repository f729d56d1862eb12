"""Webhook delivery: signatures, at-least-once from the outbox, order per task, dead letters."""

from __future__ import annotations

import asyncio
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from enkwatch.clock import SystemClock
from enkwatch.config import SinksConfig, WebhookConfig, parse_config
from enkwatch.errors import ConfigError
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
