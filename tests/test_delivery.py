"""The webhook delivery process (issue 12, item 5's CPU target): the outbox drained by a
process of its own, with every guarantee of the in-process outbox."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
from standardwebhooks.webhooks import Webhook
from structlog.testing import capture_logs

from enkwatch import events as ev
from enkwatch.clock import FakeClock, SystemClock
from enkwatch.config import SinksConfig
from enkwatch.delivery import (
    DeliveryProcess,
    open_deliveries,
    sink_from_wire,
    sink_to_wire,
)
from enkwatch.sinks import Outbox, Sink, build_sinks
from enkwatch.state.base import DISABLED_SINK_PREFIX, TaskRecord
from enkwatch.state.sqlite import SqliteStore
from tests.kit import (
    Holding,
    Spawn,
    StartReceiver,
    StartSim,
    events_named,
    make_config,
    running,
    sim_task,
    until,
    write_config,
)

KEY = "whsec_" + base64.b64encode(b"k" * 32).decode()
HOLD_S = 30.0


def sinks_of(*hooks: dict[str, Any], environ: dict[str, str] | None = None) -> list[Sink]:
    return build_sinks(SinksConfig.model_validate({"webhooks": list(hooks)}), environ or {})


def first_seen(ids: list[str]) -> list[str]:
    return list(dict.fromkeys(ids))


# -- the sinks on the wire -------------------------------------------------------------------


def test_a_sink_crosses_to_the_delivery_process_whole(tmp_path: Path) -> None:
    pd = tmp_path / "pd"
    pd.write_text("R0UTING\n", encoding="utf-8")
    template = '{"t": {{ task_key | tojson }}}'
    sinks = sinks_of(
        {"url": "http://h/1", "name": "a", "secret_env": "LEGACY", "secrets": [{"env": "K"}]},
        {"url": "http://h/2", "name": "b", "format": "pagerduty", "routing_key": {"file": str(pd)}},
        {
            "url": "http://h/3",
            "name": "c",
            "format": "template",
            "template": template,
            "statuses": ["Failed"],
            "kinds": ["redteam"],
            "labels": {"team": "x"},
        },
        {"url": "http://u:p@h/4", "name": "d", "format": "cloudevents", "source": "urn:x"},
        environ={"LEGACY": "raw-legacy-secret", "K": KEY},
    )
    event = {
        "event": "task.transition",
        "task_key": "t1",
        "seq": 2,
        "event_id": "t1:2",
        "status": "Failed",
        "kind": "redteam",
        "labels": {"team": "x"},
        "timestamp": "2026-12-06T00:00:00Z",
    }
    raw = orjson.dumps(event)
    for sink in sinks:
        # JSON all the way (the pipe carries text), then rebuilt
        back = sink_from_wire(json.loads(json.dumps(sink_to_wire(sink))))
        assert dataclasses.replace(back, format=sink.format) == sink
        assert type(back.format) is type(sink.format)
        assert back.hook == sink.hook and back.routing_key == sink.routing_key
        assert back.wants(event) == sink.wants(event)
        if sink.format.accepts(event):
            mine = sink.format.render(event, raw, "t1:2")
            theirs = back.format.render(event, raw, "t1:2")
            assert (mine.body, mine.content_type) == (theirs.body, theirs.content_type)


def test_the_outbox_stays_in_the_daemon_where_a_process_cannot_share_it(tmp_path: Path) -> None:
    sinks = sinks_of({"url": "http://h/1", "name": "a"})
    args: tuple[Any, ...] = (lambda *a: None, lambda f: None, lambda f: None, lambda: None)
    path = str(tmp_path / "s.db")
    store = SqliteStore(path)
    try:
        system = SystemClock()
        assert isinstance(open_deliveries(store, path, sinks, system, *args), DeliveryProcess)
        # a test's fake clock, no file, sinks built by hand
        assert isinstance(open_deliveries(store, path, sinks, FakeClock(), *args), Outbox)
        memory = SqliteStore(":memory:")
        assert isinstance(open_deliveries(memory, ":memory:", sinks, system, *args), Outbox)
        bare = [Sink("x", "http://h", None, frozenset({"*"}), 1.0, 1.0)]
        assert isinstance(open_deliveries(store, path, bare, system, *args), Outbox)
        # sinks.delivery: inline
        assert isinstance(open_deliveries(store, path, sinks, system, *args, True), Outbox)
    finally:
        asyncio.run(store.close())


# -- in the service ----------------------------------------------------------------------------


async def test_deliveries_are_made_by_another_process_signed_in_order_and_counted(
    tmp_path: Path, simulate: StartSim, hooks: StartReceiver
) -> None:
    receiver = await hooks()
    sim = await simulate(
        sim_task("t1", ("Queued", 0.1), ("Running", 0.1), ("Finished", None)),
        sim_task("t2", ("Running", None)),
    )
    config = make_config(sim.url, str(tmp_path / "s.db"), [{"task_id": "t1"}, {"task_id": "t2"}])
    sinks = sinks_of(
        {"url": receiver.url, "name": "ops", "secrets": [{"env": "K"}]}, environ={"K": KEY}
    )
    async with running(config, sinks=sinks) as service:
        assert service.running is not None
        outbox = service.running.outbox
        assert isinstance(outbox, DeliveryProcess)
        assert outbox.pid is not None and outbox.pid != os.getpid()
        await until(lambda: len(receiver.received) == 4)
        await until(lambda: outbox.stats()[0] == 0)
        assert await outbox.wait_idle(10)
        delivered = service.metrics.registry.get_sample_value(
            "enkwatch_webhook_deliveries_total", {"sink": "ops", "outcome": "delivered"}
        )
        assert delivered == 4
    for headers, body in receiver.received:
        assert Webhook(KEY).verify(body, headers)["event_id"] == headers["webhook-id"]
    t1 = [b["status"] for b in receiver.bodies if b["task_key"] == "t1"]
    assert t1 == ["Queued", "Running", "Finished"]


async def test_a_killed_delivery_process_is_started_again_and_loses_nothing(
    tmp_path: Path, simulate: StartSim, aiohttp_server: Any
) -> None:
    held = Holding()
    url = await held.serve(aiohttp_server)
    sim = await simulate(sim_task("t1", ("Queued", 0.1), ("Running", 0.1), ("Finished", None)))
    config = make_config(sim.url, str(tmp_path / "s.db"), [{"task_id": "t1"}])
    sinks = sinks_of({"url": url, "name": "ops", "timeout_seconds": HOLD_S})
    try:
        async with running(config, sinks=sinks) as service:
            assert service.running is not None
            outbox = service.running.outbox
            assert isinstance(outbox, DeliveryProcess)
            # Queued is on its way (held); Running and Finished wait behind it
            await until(
                lambda: service.running is not None and service.running.watchlist.tasks["t1"].done
            )
            await until(lambda: len(held.arrived) == 1)
            first = outbox.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            await until(lambda: outbox.pid not in (None, first), within=15)
            restarts = service.metrics.registry.get_sample_value(
                "enkwatch_delivery_process_restarts_total"
            )
            assert restarts == 1
            held.release.set()
            assert await outbox.wait_idle(20)
    finally:
        held.release.set()
    # at least once, in order: the POST cut by the kill went again
    assert first_seen([b["event_id"] for b in held.received]) == ["t1:1", "t1:2", "t1:3"]


async def test_dead_letters_and_a_410_are_events_of_the_daemon_and_a_410_lasts(
    tmp_path: Path, simulate: StartSim, hooks: StartReceiver
) -> None:
    structlog.reset_defaults()
    gone = await hooks(status=410)
    sim = await simulate(sim_task("t1", ("Running", None)))
    config = make_config(sim.url, str(tmp_path / "s.db"), [{"task_id": "t1"}])
    sinks = sinks_of(
        {"url": gone.url, "name": "gone"},
        {"url": "http://127.0.0.1:9/hook", "name": "dead", "max_age_seconds": 0.01},
    )
    with capture_logs() as logs:
        async with running(config, sinks=sinks) as service:
            assert service.running is not None
            assert isinstance(service.running.outbox, DeliveryProcess)
            await until(lambda: bool(events_named(logs, ev.SINK_DISABLED)))
            await until(lambda: bool(events_named(logs, ev.SINK_DELIVERY_FAILED)))
            assert service.running.outbox.disabled == {"gone"}
            assert service.running.outbox.stats()[2] == 1
    [disabled] = events_named(logs, ev.SINK_DISABLED)
    assert disabled["sink"] == "gone" and disabled["http_status"] == 410
    [failed] = events_named(logs, ev.SINK_DELIVERY_FAILED)
    assert failed["sink"] == "dead" and failed["failed_event_id"] == "t1:1"
    # a restart: the sink is still disabled, its events are not even queued for it
    async with running(config, sinks=sinks) as service:
        assert service.running is not None
        assert service.running.outbox.disabled == {"gone"}
        assert service.running.outbox.sinks_for({"event": "task.transition"}) == ["dead"]


# -- the delivery process alone, through its pipes ---------------------------------------------


async def test_rows_queued_after_a_410_are_dropped_and_stop_ends_the_process(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.db")
    [sink] = sinks_of({"url": "http://127.0.0.1:9/hook", "name": "gone"})
    store = SqliteStore(path)
    record = TaskRecord("t1", "t1", None, 0.0)
    await store.add_task(record)
    await store.disable_sink("gone", sink.fingerprint)
    # the daemon had not heard of the 410 yet: it queued this row for the sink
    record.seq = 1
    await store.record_event(record, {"event": "task.transition", "task_key": "t1"}, ["gone"])
    assert store.outbox_stats()[0] == 1
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enkwatch.delivery",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    try:
        order = {"op": "start", "state": path, "sinks": [sink_to_wire(sink)]}
        proc.stdin.write(orjson.dumps(order) + b"\n")
        ready = orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert ready == {"op": "ready", "disabled": ["gone"]}
        wake = {"op": "wake", "all": False, "sinks": {"gone": ["t1"]}}
        proc.stdin.write(orjson.dumps(wake) + b"\n")
        await until(lambda: store.outbox_stats()[0] == 0)
        proc.stdin.write(b'{"op": "stop"}\n')
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await store.close()
    db = sqlite3.connect(path)
    try:
        states = db.execute("SELECT state FROM outbox").fetchall()
        marks = db.execute("SELECT key FROM meta WHERE key LIKE ?", (DISABLED_SINK_PREFIX + "%",))
        assert states == [("dead",)] and marks.fetchall() == [(DISABLED_SINK_PREFIX + "gone",)]
    finally:
        db.close()


async def test_the_delivery_process_ends_when_its_daemon_is_gone(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    await SqliteStore(path).close()
    [sink] = sinks_of({"url": "http://127.0.0.1:9/hook", "name": "a"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enkwatch.delivery",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    order = {"op": "start", "state": path, "sinks": [sink_to_wire(sink)]}
    proc.stdin.write(orjson.dumps(order) + b"\n")
    assert orjson.loads(await asyncio.wait_for(proc.stdout.readline(), 30))["op"] == "ready"
    # SIGINT and SIGTERM are the daemon's to act on (a terminal's Ctrl-C reaches both)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.stdin.close()  # what a killed daemon leaves it: the end of its orders
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_a_report_the_daemon_cannot_read_ends_that_child_and_starts_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(tmp_path / "s.db")
    store = SqliteStore(path)
    sinks = sinks_of({"url": "http://127.0.0.1:9/hook", "name": "a"})
    restarts: list[int] = []
    deliveries = DeliveryProcess(
        store, path, sinks, lambda *a: None, lambda f: None, lambda f: None,
        lambda: restarts.append(1),
    )  # fmt: skip
    report = DeliveryProcess._report
    broken = [{"op": "ready"}]  # the first `ready` comes without its `disabled`

    def reading(self: DeliveryProcess, msg: dict[str, Any]) -> None:
        report(self, broken.pop() if broken and msg.get("op") == "ready" else msg)

    monkeypatch.setattr(DeliveryProcess, "_report", reading)
    try:
        await deliveries.start()
        first = deliveries.pid
        await until(lambda: deliveries._ready.is_set(), within=15)
        assert restarts == [1] and deliveries.pid not in (None, first)
        assert await deliveries.wait_idle(10)
    finally:
        await deliveries.close()
        await store.close()


async def test_a_state_it_cannot_use_is_one_line_on_stderr(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    db.commit()
    db.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "enkwatch.delivery",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    order = {"op": "start", "state": str(path), "sinks": []}
    out, err = await asyncio.wait_for(proc.communicate(orjson.dumps(order) + b"\n"), 30)
    assert proc.returncode == 1 and out == b""
    [line] = err.decode().strip().splitlines()
    assert line.startswith(f"enkwatch delivery process: {path}: ") and "schema 99" in line


# -- the real command ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.e2e
@pytest.mark.timeout(90)
async def test_a_sigkilled_daemon_leaves_no_delivery_process_and_nothing_undelivered(
    tmp_path: Path, simulate: StartSim, enkwatch: Spawn, hooks: StartReceiver
) -> None:
    receiver = await hooks(accepting=False)
    sim = await simulate(sim_task("t1", ("Queued", 0.5), ("Running", 0.5), ("Finished", None)))
    cfg = tmp_path / "c.yaml"
    sinks = {"webhooks": [{"url": receiver.url, "name": "ops"}]}
    write_config(
        cfg, sim.url, [{"task_id": "t1"}], state=str(tmp_path / "s.db"),
        polling={"interval_seconds": 0.1}, sinks=sinks,
    )  # fmt: skip
    first = await enkwatch("run", "--config", str(cfg))
    await first.wait_for(lambda e: e.get("status") == "Running")
    [child] = _children(first.proc.pid)
    first.kill()
    await first.wait_exit()
    await until(lambda: not _alive(child), within=30)

    receiver.accepting = True
    second = await enkwatch("run", "--config", str(cfg), "--exit-when-done")
    assert await second.wait_exit(within=40) == 0, second.stderr
    ids = first_seen([b["event_id"] for b in receiver.bodies])
    assert ids == ["t1:1", "t1:2", "t1:3"]
