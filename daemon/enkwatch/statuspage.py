"""The status page of `GET /`: one self-contained HTML page (no external script, font or
stylesheet), rendered by Jinja2's sandboxed environment with autoescaping.

Without JavaScript it is a plain table, filtered and sorted by its form and column links
(query parameters, rendered here). With JavaScript it follows `GET /events` and updates
itself without a reload; the add/remove buttons appear only when the daemon has an admin
token, and send the token the user types (never stored, never in the page).
"""

from __future__ import annotations

import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib.resources import files
from typing import Any, Final
from urllib.parse import urlencode

from jinja2.sandbox import SandboxedEnvironment

from enkwatch.console import duration

STATUS_CHOICES: Final = ("Queued", "Running", "Finished", "Failed", "gave up")
# (query key, column title, what it sorts by)
COLUMNS: Final = (
    ("task", "task"),
    ("dataset", "dataset"),
    ("status", "status"),
    ("in_status", "in status for"),
    ("polls", "polls"),
    ("last_error", "last error"),
    ("labels", "labels"),
    ("next_poll", "next poll"),
)
MAX_QUERY_TEXT: Final = 200
GAVE_UP: Final = "gave_up:"

_ENV: Final = SandboxedEnvironment(autoescape=True, trim_blocks=False)
_TEMPLATE: Final = _ENV.from_string(
    files("enkwatch").joinpath("data/status.html.j2").read_text(encoding="utf-8")
)


def new_nonce() -> str:
    """A fresh nonce for the page's inline script and style (Content-Security-Policy)."""
    return secrets.token_urlsafe(16)


def content_security_policy(nonce: str) -> str:
    """Nothing from anywhere else: the page's own inline code, and requests to itself."""
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


def _parse(stamp: str | None) -> datetime | None:
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp)
    except ValueError:
        return None


def _state(task: Mapping[str, Any]) -> tuple[str, str]:
    """(the words shown, a CSS class) for a task's status or ending."""
    outcome = task.get("outcome") or ""
    if outcome.startswith(GAVE_UP):
        return f"gave up ({outcome[len(GAVE_UP) :].replace('_', ' ')})", "gave_up"
    if task.get("unknown_status"):
        return f"{task['unknown_status']} (unknown)", "unknown"
    status = task.get("status")
    return (status, status) if status else ("not seen yet", "none")


def _row(task: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    state, state_class = _state(task)
    since = _parse(task.get("status_since"))
    due = _parse(task.get("next_poll_at"))
    labels = task.get("labels") or {}
    return {
        **task,
        "state": state,
        "state_class": state_class,
        "in_status": duration((now - since).total_seconds()) if since else "-",
        "next_poll": _next_poll(task, due, now),
        "label_items": sorted(labels.items()),
    }


def _next_poll(task: Mapping[str, Any], due: datetime | None, now: datetime) -> str:
    if task.get("outcome") or due is None:
        return "-"
    wait = (due - now).total_seconds()
    return f"in {duration(wait)}" if wait > 0 else "due"


def _matches(row: Mapping[str, Any], text: str, status: str) -> bool:
    if status:
        if status == "gave up":
            if row["state_class"] != "gave_up":
                return False
        elif row.get("status") != status or row["state_class"] == "gave_up":
            return False
    if not text:
        return True
    labels = " ".join(f"{k}={v}" for k, v in row["label_items"])
    fields = (row["task_key"], row.get("dataset"), row.get("status"), row.get("last_error"))
    hay = " ".join(str(v or "") for v in (*fields, labels))
    return text.lower() in hay.lower()


def _sort_key(column: str) -> Any:
    keys: dict[str, Any] = {
        "task": lambda r: r["task_key"],
        "dataset": lambda r: r.get("dataset") or "",
        "status": lambda r: r["state"],
        "in_status": lambda r: r.get("status_since") or "~",
        "polls": lambda r: r.get("polls") or 0,
        "last_error": lambda r: r.get("last_error") or "",
        "labels": lambda r: r["label_items"],
        "next_poll": lambda r: r.get("next_poll_at") or "~",
    }
    return keys.get(column, keys["task"])


def page_query(raw: Mapping[str, str]) -> dict[str, str]:
    """The page's query parameters, checked (anything else is ignored, never echoed raw)."""
    sort = raw.get("sort", "task")
    return {
        "q": raw.get("q", "")[:MAX_QUERY_TEXT],
        "status": raw.get("status", "") if raw.get("status", "") in STATUS_CHOICES else "",
        "sort": sort if sort in dict(COLUMNS) else "task",
        "order": "desc" if raw.get("order") == "desc" else "asc",
    }


def _columns(query: Mapping[str, str]) -> list[dict[str, Any]]:
    out = []
    for key, title in COLUMNS:
        current = query["sort"] == key
        order = "desc" if current and query["order"] == "asc" else "asc"
        params = {k: v for k, v in query.items() if v and k not in ("sort", "order")}
        params.update(sort=key, order=order)
        sorted_ = ("descending" if query["order"] == "desc" else "ascending") if current else ""
        out.append({"key": key, "title": title, "href": "?" + urlencode(params), "sorted": sorted_})
    return out


def render_status_page(
    tasks: Sequence[Mapping[str, Any]],
    *,
    query: Mapping[str, str],
    can_change: bool,
    nonce: str,
    now: datetime,
    version: str,
) -> str:
    """The page for these tasks (as GET /tasks shows them), filtered and sorted by `query`."""
    rows = [_row(t, now) for t in tasks]
    tally = Counter(r["state_class"] for r in rows)
    shown = [r for r in rows if _matches(r, query["q"], query["status"])]
    shown.sort(key=_sort_key(query["sort"]), reverse=query["order"] == "desc")
    return _TEMPLATE.render(
        tasks=shown,
        counts={"total": len(rows), "by_status": sorted(tally.items())},
        query=query,
        columns=_columns(query),
        status_choices=STATUS_CHOICES,
        can_change=can_change,
        nonce=nonce,
        rendered_at=now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        version=version,
    )
