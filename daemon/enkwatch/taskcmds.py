"""`enkwatch tasks`, `add`, `remove`, `forget`: the watch list for people.

A running daemon is asked through its admin API (`--url`, else the config's
`admin.listen`); `tasks` and `forget` work on the state itself (SQLite file or PostgreSQL)
when no daemon answers. The admin token comes from `ENKWATCH_ADMIN_TOKEN`, never from the
command line (it would be seen in the process list).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from enkwatch.admin import ADMIN_TOKEN_ENV
from enkwatch.clock import Clock, SystemClock
from enkwatch.config import Config
from enkwatch.errors import ConfigError
from enkwatch.models import is_postgres_url
from enkwatch.redact import redact_url
from enkwatch.state import open_store
from enkwatch.state.base import StateError, TaskRecord

TIMEOUT_S: Final = 10.0
# a daemon's answer is small; more than this is not a daemon of ours
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024


class DaemonUnreachable(Exception):
    """Nothing answers at the admin URL (no daemon runs there)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # an admin API never redirects: a redirect is an error, not followed


_OPENER: Final = urllib.request.build_opener(_NoRedirect)


def admin_base(config: Config | None, url: str | None) -> str | None:
    """The admin API's base URL: `--url`, else `http://<admin.listen>`; None if neither."""
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(["--url: must be an http:// or https:// URL with a host"])
        return url.rstrip("/")
    if config is None or config.admin.host_port is None:
        return None
    host, port = config.admin.host_port
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def call(base: str, method: str, path: str, body: object = None, token: bool = False) -> Answer:
    """One request to the admin API; DaemonUnreachable when nothing listens there."""
    headers = {"Accept": "application/json"}
    secret = os.environ.get(ADMIN_TOKEN_ENV) if token else None
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as resp:
            return Answer(resp.status, _decode(resp.read(MAX_ANSWER_BYTES)))
    except urllib.error.HTTPError as err:
        with err:
            answer = Answer(err.code, _decode(err.read(MAX_ANSWER_BYTES)))
        if token and not secret and err.code == 401:
            # asked without a token (a daemon that does not run is found out first)
            return Answer(401, {"error": f"{ADMIN_TOKEN_ENV} is not set (the admin token)"})
        return answer
    except (urllib.error.URLError, OSError) as err:
        # the reason, never str(err): it may quote the whole URL
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None) or err
        raise DaemonUnreachable(f"no daemon answers at {redact_url(base)}: {reason}") from None


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return {"error": raw[:200].decode("utf-8", "replace")}


def error_of(answer: Answer) -> str:
    """What the daemon said went wrong, in one line."""
    body = answer.body if isinstance(answer.body, dict) else {}
    problems = body.get("errors") or [body.get("error") or f"HTTP {answer.status}"]
    if answer.status in (401, 403):
        problems = [*problems, f"(is {ADMIN_TOKEN_ENV} the daemon's admin token?)"]
    return "; ".join(str(p) for p in problems)


# -- the state, when no daemon runs ------------------------------------------------------------


async def read_state(
    path: str, config: Config | None, clock: Clock | None = None
) -> list[dict[str, Any]]:
    """The watch list as stored in `path`, described as GET /tasks does (without what only
    a running daemon knows: the last error, the next poll)."""
    store = await _open_existing(path, clock)
    try:
        records = await store.load_tasks()
        since = await store.status_times()
    finally:
        await store.close()
    listed = {t.key: t for t in config.tasks} if config is not None else None
    out = []
    for key, rec in sorted(records.items()):
        cfg = listed.get(key) if listed is not None else None
        if listed is not None and cfg is None and rec.spec is None:
            continue  # neither in the config nor added through the API: not watched
        labels = cfg.labels if cfg is not None else (rec.spec or {}).get("labels") or {}
        out.append(_describe(rec, since.get(key), labels, "config" if cfg else "api"))
    return out


def _describe(
    rec: TaskRecord, since: str | None, labels: Mapping[str, str], source: str
) -> dict[str, Any]:
    started = datetime.fromtimestamp(rec.watch_started_at, UTC)
    return {
        "task_key": rec.task_key,
        "task_id": rec.task_id if rec.task_id is not None else rec.seen_task_id,
        "dataset": rec.dataset if rec.dataset is not None else rec.seen_dataset,
        "labels": dict(labels),
        "source": source if rec.spec is None else "api",
        "status": rec.last_status,
        "status_since": since if rec.last_status is not None else None,
        "unknown_status": rec.last_unknown_status,
        "outcome": rec.outcome,
        "polls": rec.polls,
        "watch_started_at": started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "last_error": None,
        "next_poll_at": None,
        "seq": rec.seq,
    }


async def forget_in_state(path: str, task_key: str, clock: Clock | None = None) -> bool | None:
    """`forget` on the state itself: True done, False the task has not ended, None unknown."""
    clock = clock or SystemClock()
    store = await _open_existing(path, clock)
    try:
        if await store.reset_task(task_key, clock.now().timestamp()):
            return True
        return False if task_key in await store.load_tasks() else None
    finally:
        await store.close()


async def _open_existing(path: str, clock: Clock | None) -> Any:
    """The store at `path`; a SQLite file must exist (nothing is created by looking)."""
    _check_state_path(path)
    try:
        store = open_store(path, clock, replica_id="enkwatch-cli")
        await store.open()
    except StateError as err:
        raise ConfigError([f"state.path: {redact_url(path)}: {err}"]) from None
    return store


def _check_state_path(path: str) -> None:
    if path == ":memory:":
        raise ConfigError(["state.path: :memory: keeps nothing to read (ask the daemon)"])
    if not is_postgres_url(path) and not Path(path).is_file():
        raise ConfigError([f"state.path: {path}: no state file there"])


def parse_labels(pairs: Sequence[str]) -> dict[str, str]:
    """`--label team=safety` flags as a mapping."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--label {pair}: must be KEY=VALUE"])
        labels[key.strip()] = value.strip()
    return labels
