"""The event path: group commit, sink storms made impossible, secrets redacted in every field."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.clock import SystemClock
from enkwatch.events import EventWriter
from enkwatch.sinks import Outbox, Sink, dead_letter_fields
from enkwatch.state.sqlite import SqliteStore
from tests.kit import Spawn, StartReceiver, StubTask, finish, until

# -- group commit ---------------------------------------------------------------------------


async def test_events_of_one_loop_turn_share_one_transaction_in_task_order() -> None:
    store = SqliteStore(":memory:")
    tasks = [StubTask(f"t{i}") for i in range(20)]
    await store.add_tasks([t.record for t in tasks])
    commits: list[str] = []
    store._db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    writer = EventWriter(SystemClock(), store)
    with capture_logs() as logs:
        await asyncio.gather(
            *(
                writer.task_event(t, ev.TASK_TRANSITION, ev.INFO, {"status": "Queued"})
                for t in tasks
            )
        )
        assert len(commits) == 1  # twenty events, one transaction
        for _ in range(3):  # per task, in order: each waits for its commit
            await writer.task_event(tasks[0], ev.TASK_TRANSITION, ev.INFO, {"status": "Running"})
    assert len(logs) == 23
    assert [e["seq"] for e in store.events("t0")] == [1, 2, 3, 4]
    assert await store.unwritten_events() == []  # each confirmed once written
    assert (await store.load_tasks())["t0"].seq == 4
    await store.close()


async def test_a_failed_group_commit_fails_every_event_of_it_and_writes_none() -> None:
    store = SqliteStore(":memory:")
    tasks = [StubTask("a"), StubTask("b")]
    await store.add_tasks([t.record for t in tasks])
    store._db.execute("DROP TABLE events")  # every insert of the batch fails
    writer = EventWriter(SystemClock(), store)
    with capture_logs() as logs:
        results = await asyncio.gather(
            *(writer.task_event(t, ev.TASK_TRANSITION, ev.INFO, {}) for t in tasks),
            return_exceptions=True,
        )
    assert all(isinstance(r, sqlite3.Error) for r in results), results
    assert logs == []  # journal before write: nothing was written
    await store.close()


# -- 13.3: sink.* events never feed a failing sink ------------------------------------------


async def test_two_failing_sinks_on_every_event_cannot_make_a_storm(aiohttp_server: Any) -> None:
    posts: list[str] = []

    async def fail(request: web.Request) -> web.Response:
        posts.append(json.loads(await request.read())["event"])
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/hook", fail)
    server: TestServer = await aiohttp_server(app)
    sinks = [
        Sink(name, str(server.make_url("/hook")), None, frozenset({"*"}), 2.0, 0.05)
        for name in ("a", "b")
    ]
    store = SqliteStore(":memory:")
    task = StubTask("t1")
    await store.add_task(task.record)
    dead: list[tuple[str, str]] = []

    def on_dead(sink: Sink, row: Any, error: str) -> None:
        fields = dead_letter_fields(sink, row, error)
        dead.append((sink.id, fields["failed_event"]))
        writer.delivery_failed(fields)

    outbox = Outbox(store, sinks, SystemClock(), on_dead=on_dead, retry_base_s=0.01)
    writer = EventWriter(SystemClock(), store, sinks_for=outbox.sinks_for, notify=outbox.notify)
    with capture_logs() as logs:
        await outbox.start()
        try:
            await writer.task_event(task, ev.TASK_TRANSITION, ev.INFO, {"status": "Queued"})
            # a: the transition, then b's failure; b: the transition, then a's failure
            await until(lambda: len(dead) == 4 and store.outbox_stats()[0] == 0)
        finally:
            await outbox.close()
    names = [e["event"] for e in logs]
    assert names.count(ev.SINK_DELIVERY_FAILED) == 2, names
    assert len(names) == 3
    assert sorted(dead) == [
        ("a", ev.SINK_DELIVERY_FAILED),
        ("a", ev.TASK_TRANSITION),
        ("b", ev.SINK_DELIVERY_FAILED),
        ("b", ev.TASK_TRANSITION),
    ]
    for event in logs:
        if event["event"] == ev.SINK_DELIVERY_FAILED:
            assert event["failed_event"] == ev.TASK_TRANSITION
    # every row, dead ones too (a task event's refers to its journal row: schema 3)
    rows = store._db.execute(
        "SELECT o.sink, COALESCE(CAST(e.body AS BLOB), o.body) FROM outbox o "
        "LEFT JOIN events e ON e.id = o.event_row"
    ).fetchall()
    assert len(rows) == 4  # bounded: nothing more was ever queued
    for sink, body in rows:
        event = json.loads(body)
        assert event.get("sink") != sink  # a sink.* event is never queued for its own sink
    await store.close()


# -- secrets that come back inside an API answer --------------------------------------------

API_KEY = "sk-test-ECHOED-key-123"
HOOK_SECRET = "whsec-ECHOED-hook-456"
ADMIN_TOKEN = "adm-ECHOED-token-789"
SECRETS = (API_KEY, HOOK_SECRET, ADMIN_TOKEN)


def test_scrub_replaces_every_secret_in_nested_strings_only() -> None:
    body = {"a": f"x{API_KEY}y", "n": 3, "l": [HOOK_SECRET, {"d": ADMIN_TOKEN}], "ok": "plain"}
    assert ev.scrub(body, SECRETS) == {
        "a": "x[redacted]y",
        "n": 3,
        "l": ["[redacted]", {"d": "[redacted]"}],
        "ok": "plain",
    }


async def test_a_secret_echoed_by_the_api_is_redacted_in_events_journal_and_webhooks(
    tmp_path: Path, aiohttp_server: Any, enkwatch: Spawn, hooks: StartReceiver
) -> None:
    polls = 0

    async def api(request: web.Request) -> web.Response:
        nonlocal polls
        polls += 1
        task_id = request.headers.get("X-Enkrypt-Task-ID", "")
        status = f"Running {API_KEY}" if polls == 1 else "Finished"
        data = {
            "task_id": task_id,
            "dataset_name": f"ds-{HOOK_SECRET}-{ADMIN_TOKEN}",
            "status": status,
            "created_at": "2026-01-01T10:00:00Z",
            "error": {"detail": f"key {API_KEY}"},
        }
        return web.json_response({"data": data})

    receiver = await hooks()
    app = web.Application()
    app.router.add_get("/{tail:.*}", api)
    server: TestServer = await aiohttp_server(app)
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "api": {"base_url": str(server.make_url("")).rstrip("/")},
                "polling": {"interval_seconds": 0.05, "jitter": 0},
                "state": {"path": str(tmp_path / "state.db")},
                "sinks": {
                    "webhooks": [
                        {"url": receiver.url, "secret_env": "HOOK_SECRET",
                         "events": ["*"]}
                    ]
                },
                "tasks": [{"task_id": "t1"}],
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
    done = await finish(
        enkwatch, "run", "--config", str(config), "--exit-when-done", within=60,
        ENKRYPTAI_API_KEY=API_KEY, HOOK_SECRET=HOOK_SECRET, ENKWATCH_ADMIN_TOKEN=ADMIN_TOKEN,
    )  # fmt: skip
    bodies = [body for _, body in receiver.received]
    assert done.rc == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    task_events = [e for e in events if e.get("task_key") == "t1"]
    assert task_events and any("[redacted]" in e.get("status", "") for e in task_events)
    assert all(e["dataset"] == "ds-[redacted]-[redacted]" for e in task_events)
    with sqlite3.connect(tmp_path / "state.db") as db:
        journal = [row[0] for row in db.execute("SELECT body FROM events")]
    assert journal and bodies
    for secret in SECRETS:
        for text in (done.stdout, done.stderr, *journal):
            assert secret not in text
        assert not any(secret.encode() in body for body in bodies)
