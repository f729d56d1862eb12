"""The one test kit: the simulated API, the installed command, waiting, webhook receivers.

Fixtures (registered in `conftest.py`, so test files import none of them):
- `simulate`: start the project's simulator on a free port -> `Sim` (url, stats, arrivals);
- `enkwatch`: start `python -m enkwatch ARGS` as a subprocess -> `Run` (events as written);
- `hooks`: start a webhook receiver, a real aiohttp server on 127.0.0.1 -> `Receiver`.

Helpers: `tid`, `timeline`, `sim_task` (a scenario's task), `until` (a condition with a
deadline), `finish` (run the command to its end), `outputs` (the same, for a command whose
stdout is not events), `on_a_terminal` (the same with stdout on a pseudo-terminal),
`invoke` (to its end, synchronously), `write_config`, `write_yaml`, `free_port`,
`sse_messages` (an admin event stream's next messages); for the Service in-process:
`make_config`, `running`, `events_named`. Every wait has a deadline (`WAIT_S`); none
sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import pty
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from enkwatch.config import Config, parse_config
from enkwatch.kinds import DATASET
from enkwatch.models import TaskKind
from enkwatch.service import Service
from enkwatch.simulator import STATS, Scenario, SimulatorStats, build_app
from enkwatch.state.base import TaskRecord

SECRET = "sk-test-SECRET-123"  # the API key every child process gets
API_KEY = "sk-test-SECRET-service"  # the API key of an in-process Service
WAIT_S = 20.0  # the most any single wait may take before the test fails
CLOSED = subprocess.DEVNULL  # `spawn(stdout=CLOSED)`: the command starts without a stdout
LEVELS = {"debug", "info", "warning", "error", "critical"}
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")
TASK_EVENT_FIELDS = ("task_id", "dataset", "task_key", "seq", "event_id")

# runs argv[1:], then prints the child's peak RSS (KiB on Linux) as the last stderr line
_PEAK_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
    " file=sys.stderr)\n"
    "sys.exit(code)\n"
)


# -- the SQLite journal ----------------------------------------------------------------------


# the SQLite state as enkwatch wrote it before the journal's watermark (schema 1)
SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO meta VALUES ('journal_pruned', '1');
CREATE TABLE tasks (
    task_key TEXT PRIMARY KEY, task_id TEXT, dataset TEXT, last_status TEXT,
    last_unknown_status TEXT, seen_dataset TEXT, seen_task_id TEXT,
    seq INTEGER NOT NULL DEFAULT 0, watch_started_at REAL NOT NULL,
    polls INTEGER NOT NULL DEFAULT 0, outcome TEXT, spec TEXT, status_since REAL,
    stalled_status TEXT
);
CREATE TABLE events (
    task_key TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    written INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (task_key, seq)
);
CREATE INDEX events_unwritten ON events (written) WHERE written = 0;
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL, task_key TEXT NOT NULL,
    body BLOB NOT NULL, created_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL, state TEXT NOT NULL DEFAULT 'pending'
);
"""


def journal_written(db: sqlite3.Connection, order: str = "id") -> list[tuple[str, int, int]]:
    """(task_key, seq, written) of every journaled event of a SQLite state, by `order`: written
    is 1 for a row at or below the watermark that is not a straggler (what is committed)."""
    return db.execute(
        "SELECT task_key, seq, CASE WHEN id > (SELECT CAST(value AS INTEGER) FROM meta "
        "WHERE key = 'events_written_through') OR id IN (SELECT id FROM events_stragglers) "
        f"THEN 0 ELSE 1 END FROM events ORDER BY {order}"
    ).fetchall()


# -- waiting ---------------------------------------------------------------------------------


async def until(
    cond: Callable[[], bool | Awaitable[bool]],
    what: str = "the condition",
    within: float = WAIT_S,
    every: float = 0.01,
    blocking: bool = False,
) -> None:
    """Wait for a condition other code makes true, with a deadline (no fixed sleeps).

    `cond` may be a coroutine function, for a condition read over the network; with
    `blocking=True` it is a function that blocks (selenium, say), checked in a thread so
    that the loop goes on serving meanwhile.
    """
    end = time.monotonic() + within
    while True:
        met = await asyncio.to_thread(cond) if blocking else cond()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """Where the kernel's ephemeral ports (outgoing connections, bind to 0) start."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on, for a process started later to bind.

    Taken below the kernel's ephemeral range: a port bound to 0 and released could be
    given meanwhile to any outgoing connection on the machine (the suite makes thousands)
    as its source port, and the daemon's bind then fails. Never the same port twice in one
    session, so two tests running at once do not pick one port either.
    """
    high = min(_ephemeral_low(), 32768)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(high // 2, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise AssertionError("no free port below the ephemeral range")


# -- the simulated API -----------------------------------------------------------------------


def tid(n: int) -> str:
    """A task id shaped like Enkrypt's."""
    return f"data-generation-e2e0{n:04d}-0000-4000-8000-{n:012d}"


def timeline(*items: str | float) -> list[dict[str, Any]]:
    """`timeline("Queued", 1, "Finished")`: each status, then how long it lasts."""
    phases: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, str):
            phases.append({"status": item})
        else:
            phases[-1]["seconds"] = item
    return phases


def sim_task(task: int | str, *spec: Any, **extra: Any) -> dict[str, Any]:
    """A task of the simulator's scenario, in either of two spellings.

    `sim_task(1, "Election2", timeline("Queued", 0.3, "Finished"), {"kind": "http_500"})`:
    the id `tid(1)`, the dataset, the phases, then faults.
    `sim_task("t1", ("Queued", 1.0), ("Finished", None), faults=[...])`: the id as given,
    the dataset `ds-t1`, (status, seconds) pairs, then any other scenario field.
    """
    if isinstance(task, int):
        dataset, phases, *faults = spec
        return {"task_id": tid(task), "dataset": dataset, "timeline": phases, "faults": faults}
    steps = [{"status": status, "seconds": seconds} for status, seconds in spec]
    return {"task_id": task, "dataset": f"ds-{task}", "timeline": steps, **extra}


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic(), the simulator's clock too
    task_id: str | None
    dataset: str | None


@dataclass
class Sim:
    """A running simulator: its URL, its own statistics and our per-request record."""

    url: str
    stats: SimulatorStats
    arrivals: list[Arrival]
    app: web.Application

    def of(self, task_id: str | None = None, dataset: str | None = None) -> list[float]:
        """Arrival times of the requests naming this task (by header)."""
        return [
            a.at
            for a in self.arrivals
            if (task_id is not None and a.task_id == task_id)
            or (dataset is not None and a.dataset == dataset)
        ]

    def count(self, task_id: str | None = None, dataset: str | None = None) -> int:
        return len(self.of(task_id, dataset))


StartSim = Callable[..., Awaitable[Sim]]


async def _start_sim(
    tasks: tuple[dict[str, Any], ...], api_key: str | None
) -> tuple[web.AppRunner, Sim]:
    scenario = Scenario.model_validate({"api_key": api_key, "tasks": list(tasks)})
    app = build_app(scenario)
    arrivals: list[Arrival] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        headers = request.headers
        arrivals.append(
            Arrival(
                time.monotonic(), headers.get("X-Enkrypt-Task-ID"), headers.get("X-Enkrypt-Dataset")
            )
        )
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = int(runner.addresses[0][1])
    return runner, Sim(f"http://127.0.0.1:{port}", app[STATS], arrivals, app)


@asynccontextmanager
async def simulator(*tasks: dict[str, Any], api_key: str | None = None) -> AsyncIterator[Sim]:
    """The simulator for one block of a test (what the `simulate` fixture starts)."""
    runner, sim = await _start_sim(tasks, api_key)
    try:
        yield sim
    finally:
        await runner.cleanup()


@pytest.fixture
async def simulate() -> AsyncIterator[StartSim]:
    """Start the project's simulator on a free port for the given scenario tasks."""
    runners: list[web.AppRunner] = []

    async def start(*tasks: dict[str, Any], api_key: str | None = None) -> Sim:
        runner, sim = await _start_sim(tasks, api_key)
        runners.append(runner)
        return sim

    yield start
    for runner in runners:
        await runner.cleanup()


# -- webhook receivers -----------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook receiver: records each POST it accepts, as (headers, body).

    It answers 503 while `accepting` is false and to the first `fail_first` tries of each
    event (by `event_id`, else by `event`); otherwise `status`.
    """

    url: str = ""
    fail_first: int = 0
    status: int = 204
    accepting: bool = True
    tries: dict[str, int] = field(default_factory=dict)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        doc = json.loads(body)
        event_id = doc.get("event_id") or doc["event"]
        self.tries[event_id] = self.tries.get(event_id, 0) + 1
        if not self.accepting or self.tries[event_id] <= self.fail_first:
            return web.Response(status=503)
        self.received.append((dict(request.headers), body))
        self.got.set()
        return web.Response(status=self.status)

    @property
    def bodies(self) -> list[dict[str, Any]]:
        """The accepted bodies, decoded."""
        return [json.loads(body) for _, body in self.received]


StartReceiver = Callable[..., Awaitable[Receiver]]


class Holding:
    """A webhook receiver holding every POST until `release` is set, then answering 204:
    `arrived` are the bodies as they came, `received` as they were answered."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived: list[dict[str, Any]] = []
        self.received: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.arrived.append(body)
        await self.release.wait()
        self.received.append(body)
        return web.Response(status=204)

    async def serve(self, aiohttp_server: Any) -> str:
        """Start it on 127.0.0.1 (POST /hook); its URL."""
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        server: TestServer = await aiohttp_server(app)
        return str(server.make_url("/hook"))


@pytest.fixture
def hooks(aiohttp_server: Any) -> StartReceiver:
    """Start a `Receiver` on 127.0.0.1 (POST /hook); its `url` is set."""

    async def start(**kw: Any) -> Receiver:
        receiver = Receiver(**kw)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        server: TestServer = await aiohttp_server(app)
        receiver.url = str(server.make_url("/hook"))
        return receiver

    return start


# -- the installed command -------------------------------------------------------------------


@dataclass
class Run:
    """One run of the real command: events as they are written, stderr, the exit code."""

    proc: asyncio.subprocess.Process
    json_lines: bool = True
    measured: bool = False  # run under the peak-RSS wrapper
    lines: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: str = ""
    rc: int | None = None
    peak_rss_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    elapsed: float = 0.0  # from start to exit
    killed: bool = False
    eof: bool = False

    def __post_init__(self) -> None:
        self._new = asyncio.Event()
        self._reader = asyncio.create_task(self._read())
        self._err = asyncio.create_task(self._read_stderr())

    async def _read(self) -> None:
        if self.proc.stdout is None:  # stdout went elsewhere (`spawn(stdout=...)`)
            self.eof = True
            return
        while raw := await self.proc.stdout.readline():
            text = raw.decode("utf-8", "replace")
            self.lines.append(text)
            try:
                obj = json.loads(text)
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self.events.append(obj)
            self._new.set()
        self.eof = True
        self._new.set()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = (await self.proc.stderr.read()).decode("utf-8", "replace")
        if self.measured:
            lines = self.stderr.splitlines()
            assert lines and lines[-1].startswith("peak_rss_kib "), self.stderr
            self.peak_rss_bytes = int(lines[-1].split()[1]) * 1024
            self.stderr = "\n".join(lines[:-1])

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    async def wait_for(
        self,
        pred: Callable[[dict[str, Any]], bool],
        what: str = "the event",
        within: float = WAIT_S,
    ) -> dict[str, Any]:
        """The first event (already written or to come) that satisfies `pred`."""

        async def scan() -> dict[str, Any]:
            i = 0
            while True:
                while i < len(self.events):
                    event = self.events[i]
                    i += 1
                    if pred(event):
                        return event
                if self.eof:
                    raise AssertionError(f"exited without {what}; stdout:\n{self.stdout}")
                self._new.clear()
                await self._new.wait()

        try:
            return await asyncio.wait_for(scan(), within)
        except TimeoutError:
            raise AssertionError(f"no {what} within {within} s; stdout:\n{self.stdout}") from None

    async def wait_event(self, name: str, within: float = WAIT_S, **fields: Any) -> dict[str, Any]:
        """The first event `name` (already written or to come) with these field values."""

        def has(event: dict[str, Any]) -> bool:
            return event.get("event") == name and fields.items() <= event.items()

        return await self.wait_for(has, f"{name} {fields}", within)

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.killed = True
        self.proc.kill()

    async def wait_exit(self, within: float = WAIT_S) -> int:
        """Wait for the exit, then check what every run must satisfy."""
        try:
            rc = await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise AssertionError(f"still running after {within} s:\n{self.stdout}") from None
        await self._reader
        await self._err
        self.rc = rc
        self.elapsed = time.monotonic() - self.started
        assert SECRET not in self.stdout, "the API key appeared on stdout"
        assert SECRET not in self.stderr, "the API key appeared on stderr"
        assert "Traceback" not in self.stderr, self.stderr
        assert "internal error" not in self.stderr, self.stderr
        if self.json_lines:
            self._check_json_lines()
            if rc != 2:
                # no warning, traceback or "Task was destroyed" from a daemon run
                assert self.stderr == "", self.stderr
        return rc

    def _check_json_lines(self) -> None:
        for line in self.lines:
            if self.killed and not line.endswith("\n"):
                continue  # cut off by SIGKILL
            obj = json.loads(line)
            assert isinstance(obj, dict), line
            check_event(obj)

    # views

    def named(self, name: str, key: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == name and (key is None or e.get("task_key") == key)
        ]

    def transitions(self, key: str) -> list[dict[str, Any]]:
        return self.named("task.transition", key)

    def one(self, name: str, key: str | None = None) -> dict[str, Any]:
        found = self.named(name, key)
        assert len(found) == 1, f"{name} x{len(found)}:\n{self.stdout}"
        return found[0]


def check_event(event: dict[str, Any]) -> None:
    """The fields every event has (CONTRACT §5), and those of every task event."""
    stamp = event["timestamp"]
    assert RFC3339_UTC.match(stamp), stamp
    moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert moment.utcoffset() == timedelta(0)
    assert event["level"] in LEVELS
    assert isinstance(event["event"], str)
    if event["event"].startswith("task."):
        for name in TASK_EVENT_FIELDS:
            assert name in event, (name, event)
        assert isinstance(event["seq"], int)
        assert event["event_id"] == f"{event['task_key']}:{event['seq']}"


def child_env(**extra: str | None) -> dict[str, str]:
    """Our environment without any enkwatch or colour setting, plus the secret key and `extra`.

    The terminal type is fixed (not `dumb`), so colour depends only on what the test gives.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ENKWATCH_", "NO_COLOR", "FORCE_COLOR")) and k != "ENKRYPTAI_API_KEY"
    }
    env["ENKRYPTAI_API_KEY"] = SECRET
    env["TERM"] = "xterm-256color"
    env.pop("PYTHONUNBUFFERED", None)  # the daemon must flush each line by itself
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


Spawn = Callable[..., Awaitable[Run]]


@pytest.fixture
async def enkwatch(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Start `python -m enkwatch ARGS` (cwd: tmp_path); anything left running is killed.

    `json_lines=False` for a command whose stdout is not events; `measured=True` runs it
    under a wrapper that reports its peak RSS (`Run.peak_rss_bytes`); `stdout=FD` gives
    the child that stdout instead of a pipe read by `Run` (`stdout=CLOSED`: none at all);
    other keywords are environment variables (None removes one).
    """
    runs: list[Run] = []

    async def spawn(
        *args: str,
        json_lines: bool = True,
        measured: bool = False,
        stdout: int | None = None,
        **env: str | None,
    ) -> Run:
        wrapper = ["-c", _PEAK_RSS_WRAPPER, sys.executable] if measured else []
        argv = [sys.executable, *wrapper, "-m", "enkwatch", *args]
        if stdout == CLOSED:
            argv = ["sh", "-c", 'exec "$0" "$@" >&-', *argv]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE
            if stdout is None
            else stdout,  # CLOSED: DEVNULL, closed by sh
            stderr=asyncio.subprocess.PIPE,
            env=child_env(**env),
            cwd=tmp_path,
        )
        run = Run(proc, json_lines=json_lines, measured=measured)
        runs.append(run)
        return run

    yield spawn
    for run in runs:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()


async def finish(
    spawn: Spawn,
    *args: str,
    json_lines: bool = True,
    measured: bool = False,
    within: float = WAIT_S,
    **env: str | None,
) -> Run:
    """Run the command to its end."""
    run = await spawn(*args, json_lines=json_lines, measured=measured, **env)
    await run.wait_exit(within)
    return run


async def outputs(
    spawn: Spawn, *args: str, within: float = WAIT_S, **env: str | None
) -> tuple[int, str, str]:
    """Run a command whose stdout is not events (`tasks`, `check-config`, `--help`, ...) to
    its end, checked as every run is: (exit code, stdout, stderr)."""
    run = await spawn(*args, json_lines=False, **env)
    rc = await run.wait_exit(within)
    return rc, run.stdout, run.stderr


async def on_a_terminal(spawn: Spawn, *args: str, within: float = WAIT_S, **env: str | None) -> Run:
    """Run the command to its end with stdout on a pseudo-terminal (colour, the console format).

    `Run.stdout` is what the terminal got, its CR LF line ends made LF.
    """
    master, slave = pty.openpty()
    try:
        run = await spawn(*args, json_lines=False, stdout=slave, **env)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    chunks: list[bytes] = []

    def read_all() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                return
            if not data:
                return
            chunks.append(data)

    reader = asyncio.ensure_future(asyncio.to_thread(read_all))
    try:
        await asyncio.wait_for(asyncio.shield(reader), within)
    except (TimeoutError, asyncio.CancelledError) as exc:
        if run.proc.returncode is None:
            run.kill()  # ends the reader too (EIO)
        await reader
        if isinstance(exc, TimeoutError):
            raise AssertionError(f"still writing to the terminal after {within} s") from None
        raise
    finally:
        os.close(master)
    screen = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    run.lines = screen.splitlines(keepends=True)
    await run.wait_exit(within)
    return run


def invoke(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m enkwatch ARGS` to its end, synchronously, for tests that are not async.

    The environment is ours without any ENKWATCH_* variable, plus `env`.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ENKWATCH_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "enkwatch", *args],
        capture_output=True,
        text=True,
        env=clean,
        cwd=cwd,
        timeout=60,
        check=False,
    )


def write_yaml(path: Path, **doc: Any) -> str:
    """Write `doc` (top-level sections) as YAML exactly as given, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)  # atomic, like an editor or a ConfigMap update
    return str(path)


def write_config(
    path: Path,
    sim: Sim | str,
    tasks: list[dict[str, Any]],
    *,
    state: str = ":memory:",
    api: dict[str, Any] | None = None,
    polling: dict[str, Any] | None = None,
    **sections: Any,
) -> str:
    """A config for fast tests: tiny intervals, no jitter, no rate limit; written atomically.

    `sections` are further top-level sections (`sinks`, `admin`, ...).
    """
    return write_yaml(
        path,
        api={"base_url": sim.url if isinstance(sim, Sim) else sim, "timeout_seconds": 2}
        | (api or {}),
        polling={
            "interval_seconds": 0.05,
            "jitter": 0,
            "max_concurrency": 16,
            "max_requests_per_second": 0,
            "max_backoff_seconds": 0.5,
            "not_found_attempts": 3,
        }
        | (polling or {}),
        state={"path": state},
        tasks=tasks,
        **sections,
    )


# -- the admin API ---------------------------------------------------------------------------


async def sse_messages(
    resp: aiohttp.ClientResponse, count: int, within: float = WAIT_S
) -> list[dict[str, Any]]:
    """The next `count` messages of an event stream (comments skipped) as {event, id, data}."""
    out: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(within):
            while len(out) < count:
                block = (await resp.content.readuntil(b"\n\n")).decode()
                fields: dict[str, Any] = {}
                for line in block.strip("\n").split("\n"):
                    name, _, value = line.partition(": ")
                    if name in ("event", "id", "data"):
                        fields[name] = orjson.loads(value) if name == "data" else value
                if "data" in fields:
                    out.append(fields)
    except TimeoutError:
        raise AssertionError(f"{len(out)} of {count} messages within {within} s: {out}") from None
    return out


# -- the Service in-process ------------------------------------------------------------------


def make_config(base_url: str, state: str, tasks: list[dict[str, Any]], **extra: Any) -> Config:
    """A parsed config for an in-process Service; `extra` are further top-level sections."""
    raw: dict[str, Any] = {
        "api": {"base_url": base_url, "timeout_seconds": 2},
        "polling": {
            "interval_seconds": 0.05,
            "jitter": 0,
            "max_requests_per_second": 0,
            "max_backoff_seconds": 0.2,
        },
        "state": {"path": state},
        "tasks": tasks,
    }
    for key, value in extra.items():
        raw[key] = value
    return parse_config(raw, environ={})


@asynccontextmanager
async def running(config: Config, **kw: Any) -> AsyncIterator[Service]:
    """A started Service; stopped (and its exit code checked as 0) on leaving."""
    kw.setdefault("gc_tuning", False)  # the test process's collector is not ours to tune
    service = Service(config, API_KEY, **kw)
    job = asyncio.ensure_future(service.run(install_signals=False))
    ready = asyncio.ensure_future(service.ready.wait())
    await asyncio.wait({job, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if job.done():
        ready.cancel()
        job.result()  # raises what failed
        raise AssertionError("the service stopped before it was ready")
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(job, 15)


def events_named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e.get("event") == name]


class StubTask:
    """What the event writer reads of a watched task, for tests that drive the writer alone."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.task_id: str | None = key
        self.dataset: str | None = None
        self.labels: dict[str, str] = {}
        self.record = TaskRecord(key, key, None, 0.0)
        self.kind: TaskKind = DATASET
