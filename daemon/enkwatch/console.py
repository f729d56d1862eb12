"""The human console format: one short coloured line per event, and an end-of-run table.

Rendered with `rich` (styles, tables, the terminal's capabilities), never hand-written escape
codes. Colour only on a terminal, never with `NO_COLOR` set (https://no-color.org) or with
`TERM=dumb`; `FORCE_COLOR` asks for it in a log viewer that shows colours (CI logs).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any, Final, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text
from structlog.typing import EventDict, WrappedLogger

from enkwatch.errors import ERR_RATE_LIMITED
from enkwatch.models import (
    API_AUTH_FAILED,
    AUTH_HINT,
    CONFIG_RELOAD_FAILED,
    CONFIG_RELOADED,
    DAEMON_ALL_DONE,
    DAEMON_STARTED,
    DAEMON_STOPPED,
    DAEMON_STOPPING,
    DISCOVERY_FAILED,
    SINK_DELIVERY_FAILED,
    SINK_DISABLED,
    STATE_RECOVERED,
    STATE_UNAVAILABLE,
    TASK_DISCOVERED,
    TASK_GAVE_UP,
    TASK_POLL_FAILED,
    TASK_STALLED,
    TASK_TRANSITION,
    TASK_UNKNOWN_STATUS,
)

# the width of the outcome column (the longest word, "FINISHED", plus one)
LABEL_WIDTH: Final = 9
# task ids are long and alike at the start: the head and the tail tell them apart
TASK_ID_HEAD: Final = 16
TASK_ID_TAIL: Final = 4
# a detail (an error message) is cut here on the line; --log-level debug shows all of it
DETAIL_MAX: Final = 80
# the width of the end-of-run table when stdout is not a terminal
SUMMARY_WIDTH: Final = 160
# fields that only help a machine or a debugging session
_DEBUG_FIELDS: Final = ("event_id", "seq", "created_at", "started_at")
# fields every line shows in its own place (time, outcome, task), never again as key=value
_PLACED: Final = frozenset({"timestamp", "level", "event", "task_id", "dataset", "task_key"})

_STATUS_STYLE: Final = {
    "Queued": "yellow",
    "Running": "cyan",
    "Finished": "bold green",
    "Failed": "bold red",
}
# structlog's level names (events.py writes these)
_LEVEL_STYLE: Final = {
    "warning": "yellow",
    "error": "bold red",
    "critical": "bold red",
}


def use_colour(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Colour for this stream: a terminal, unless NO_COLOR or TERM=dumb; or FORCE_COLOR."""
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    if env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def make_console(stream: TextIO | None, colour: bool, width: int | None = 200) -> Console:
    """A rich Console on `stream` that colours only when told to, and never wraps a line."""
    return Console(
        file=stream,
        color_system="standard" if colour else None,
        force_terminal=colour,
        no_color=not colour,
        highlight=False,
        emoji=False,
        markup=False,
        soft_wrap=True,
        width=width,
    )


# -- plain words for values ------------------------------------------------------------------


def plain(value: Any) -> str:
    """A value as a person reads it: no None, True, quotes or braces of Python."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={plain(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple | set | frozenset):
        return ", ".join(plain(v) for v in value) or "-"
    return str(value)


def duration(seconds: float | None) -> str:
    """`4.4 s`, `3 min 12 s`, `2 h 05 min`: a span of time, short."""
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, secs = divmod(round(seconds), 60)
        return f"{minutes} min {secs:02d} s"
    hours, rest = divmod(round(seconds), 3600)
    if hours < 48:
        return f"{hours} h {rest // 60:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def short_task_id(task_id: str) -> str:
    """`data-generation-…0004`: the head and the tail of a long task id."""
    if len(task_id) <= TASK_ID_HEAD + TASK_ID_TAIL + 1:
        return task_id
    return f"{task_id[:TASK_ID_HEAD]}…{task_id[-TASK_ID_TAIL:]}"


def _clip(text: str, limit: int = DETAIL_MAX) -> str:
    text = " ".join(text.split())  # one line, whatever the peer sent
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _polls_and_time(fields: Mapping[str, Any]) -> str:
    parts = []
    polls = fields.get("polls")
    if isinstance(polls, int):
        parts.append(f"{polls} poll" if polls == 1 else f"{polls} polls")
    watched = fields.get("watched_seconds")
    if isinstance(watched, int | float):
        parts.append(duration(watched))
    return ", ".join(parts)


def _reason(value: Any) -> str:
    return plain(value).replace("_", " ")


# -- what each event says ----------------------------------------------------------------------

# (label, style, detail) from the event's fields; the fields it used are removed from `f`
Describe = Callable[[dict[str, Any]], tuple[str, str, str]]


def _transition(f: dict[str, Any]) -> tuple[str, str, str]:
    status = plain(f.pop("status", None))
    previous = f.pop("previous_status", None)
    f.pop("terminal", None)
    change = f"{plain(previous)} -> {status}" if previous is not None else f"first seen {status}"
    detail = "  ".join(p for p in (change, _polls_and_time(f)) if p)
    f.pop("polls", None)
    f.pop("watched_seconds", None)
    return status.upper(), _STATUS_STYLE.get(status, "magenta"), detail


def _poll_failed(f: dict[str, Any]) -> tuple[str, str, str]:
    error = f.pop("error", None)
    http_status = f.pop("http_status", None)
    attempt = f.pop("attempt", None)
    retry = f.pop("retry_in_seconds", None)
    detail = _clip(str(f.pop("detail", None) or ""))
    what = f"HTTP {http_status}" if http_status is not None else _reason(error)
    if error == ERR_RATE_LIMITED:
        what = f"rate limited ({what})" if http_status is not None else "rate limited"
    code = f"HTTP {http_status}"
    if http_status is not None and detail.startswith(code):
        detail = detail[len(code) :].lstrip(": ")  # the status is said once
    text = f"{what}: {detail}" if detail else what
    tail = []
    if attempt is not None:
        tail.append(f"attempt {plain(attempt)}")
    if retry is not None:
        tail.append(f"retry in {duration(retry)}")
    return "RETRY", "yellow", text + (f"  ({', '.join(tail)})" if tail else "")


def _unknown_status(f: dict[str, Any]) -> tuple[str, str, str]:
    status = _clip(plain(f.pop("status", None)), 40)
    return "UNKNOWN", "magenta", f"status {status!s} is not one enkwatch knows; still polling"


def _discovered(f: dict[str, Any]) -> tuple[str, str, str]:
    kind = plain(f.pop("kind", None))
    f.pop("source", None)
    return "FOUND", "cyan", f"a {kind} job found by discovery; watching it"


def _discovery_failed(f: dict[str, Any]) -> tuple[str, str, str]:
    entry = plain(f.pop("discover", None))
    kind = plain(f.pop("kind", None))
    _, style, text = _poll_failed(f)
    return "DISCOVER", style, f"a sweep of discover[{entry}] ({kind}) failed: {text}"


def _gave_up(f: dict[str, Any]) -> tuple[str, str, str]:
    reason = _reason(f.pop("reason", None))
    last = f.pop("last_status", None)
    detail = f"{reason} (last status {plain(last)})"
    extra = _polls_and_time(f)
    f.pop("polls", None)
    f.pop("watched_seconds", None)
    return "GAVE UP", "bold red", f"{detail}  {extra}" if extra else detail


def _stalled(f: dict[str, Any]) -> tuple[str, str, str]:
    status = _clip(plain(f.pop("status", None)), 40)
    stalled = f.pop("stalled_seconds", None)
    f.pop("polls", None)
    f.pop("watched_seconds", None)
    how_long = duration(stalled) if isinstance(stalled, int | float) else plain(stalled)
    return "STALLED", "yellow", f"in {status} for {how_long}; still polling"


def _sink_disabled(f: dict[str, Any]) -> tuple[str, str, str]:
    sink = plain(f.pop("sink", None))
    http_status = f.pop("http_status", None)
    dropped = f.pop("dropped_deliveries", 0)
    f.pop("hint", None)
    text = f"{sink} answered HTTP {plain(http_status)}: disabled until its config changes"
    return "WEBHOOK", "bold red", text + (f" ({plain(dropped)} dropped)" if dropped else "")


def _auth_failed(f: dict[str, Any]) -> tuple[str, str, str]:
    http_status = f.pop("http_status", None)
    hint = f.pop("hint", None) or AUTH_HINT
    return "AUTH", "bold red", f"HTTP {plain(http_status)}: {hint}"


def _started(f: dict[str, Any]) -> tuple[str, str, str]:
    version = f.pop("version", None)
    tasks = f.pop("tasks", None)
    what = f"{tasks} task" if tasks == 1 else f"{plain(tasks)} tasks"
    return "START", "bold", f"enkwatch {plain(version)}, watching {what}"


def _all_done(f: dict[str, Any]) -> tuple[str, str, str]:
    counts = {k: f.pop(k, 0) for k in ("finished", "failed", "gave_up")}
    style = "bold red" if counts["failed"] or counts["gave_up"] else "bold green"
    text = f"{counts['finished']} finished, {counts['failed']} failed, {counts['gave_up']} gave up"
    return "ALL DONE", style, text


def _stopping(f: dict[str, Any]) -> tuple[str, str, str]:
    return "STOPPING", "dim", _reason(f.pop("reason", None))


def _stopped(f: dict[str, Any]) -> tuple[str, str, str]:
    reason = _reason(f.pop("reason", None))
    cancelled = f.pop("cancelled_polls", 0)
    tail = f", {cancelled} polls cancelled" if cancelled else ""
    return "STOPPED", "dim", reason + tail


def _reloaded(f: dict[str, Any]) -> tuple[str, str, str]:
    parts = []
    for name in ("added", "removed", "changed"):
        keys = f.pop(name, None) or []
        if keys:
            parts.append(f"{name} {plain(keys)}")
    restart = f.pop("restart_required", None) or []
    if restart:
        parts.append(f"restart to apply {plain(restart)}")
    return "RELOADED", "green", "; ".join(parts) or "no change"


def _reload_failed(f: dict[str, Any]) -> tuple[str, str, str]:
    errors = f.pop("errors", None) or []
    text = "; ".join(str(e) for e in errors) if isinstance(errors, list) else plain(errors)
    return "RELOAD", "bold red", f"the new config is invalid, the old one goes on: {text}"


def _delivery_failed(f: dict[str, Any]) -> tuple[str, str, str]:
    sink = plain(f.pop("sink", None))
    failed = plain(f.pop("failed_event", None))
    event_id = f.pop("failed_event_id", None)
    attempts = f.pop("attempts", None)
    error = _clip(plain(f.pop("error", None)))
    seq = str(event_id).rpartition(":")[2] if event_id else ""
    what = f"{failed} #{seq}" if seq else failed
    return "WEBHOOK", "bold red", f"{sink} gave up on {what} after {plain(attempts)} tries: {error}"


def _state_unavailable(f: dict[str, Any]) -> tuple[str, str, str]:
    error = _clip(plain(f.pop("error", None)))
    retry = f.pop("retry_in_seconds", None)
    tail = f"  (retry in {duration(retry)})" if retry is not None else ""
    return "STATE", "bold red", f"{error}{tail}"


def _state_recovered(f: dict[str, Any]) -> tuple[str, str, str]:
    return "STATE", "green", "the state database answers again"


def _listening(f: dict[str, Any]) -> tuple[str, str, str]:
    url = plain(f.pop("url", None))
    tasks = f.pop("tasks", None)
    f.pop("host", None)
    f.pop("port", None)
    return "LISTEN", "bold", f"simulated Enkrypt API on {url} ({plain(tasks)} tasks)"


DESCRIBE: Final[Mapping[str, Describe]] = {
    TASK_TRANSITION: _transition,
    TASK_POLL_FAILED: _poll_failed,
    TASK_UNKNOWN_STATUS: _unknown_status,
    TASK_GAVE_UP: _gave_up,
    TASK_STALLED: _stalled,
    SINK_DISABLED: _sink_disabled,
    TASK_DISCOVERED: _discovered,
    DISCOVERY_FAILED: _discovery_failed,
    API_AUTH_FAILED: _auth_failed,
    DAEMON_STARTED: _started,
    DAEMON_ALL_DONE: _all_done,
    DAEMON_STOPPING: _stopping,
    DAEMON_STOPPED: _stopped,
    CONFIG_RELOADED: _reloaded,
    CONFIG_RELOAD_FAILED: _reload_failed,
    SINK_DELIVERY_FAILED: _delivery_failed,
    STATE_UNAVAILABLE: _state_unavailable,
    STATE_RECOVERED: _state_recovered,
    "simulator.listening": _listening,
}


def _generic(name: str, level: str) -> Describe:
    # an event this renderer does not know yet: its name, then its fields as key=value
    def describe(f: dict[str, Any]) -> tuple[str, str, str]:
        return level.upper()[: LABEL_WIDTH - 1], _LEVEL_STYLE.get(level, ""), name

    return describe


# -- the line ----------------------------------------------------------------------------------


class ConsoleRenderer:
    """A structlog renderer: the event dict -> one short line (with colour when asked)."""

    def __init__(
        self,
        colour: bool = False,
        verbose: bool = False,
        tz: tzinfo | None = None,
    ) -> None:
        self._console = make_console(None, colour)
        self._verbose = verbose
        self._tz = tz

    def __call__(self, _: WrappedLogger, __: str, event_dict: EventDict) -> str:
        text = self.line(dict(event_dict))
        with self._console.capture() as capture:
            self._console.print(text, end="")
        return capture.get()

    def line(self, fields: dict[str, Any]) -> Text:
        """The line of one event, styled (styles are dropped when colour is off)."""
        name = str(fields.pop("event", ""))
        level = str(fields.pop("level", "info"))
        stamp = fields.pop("timestamp", None)
        describe = DESCRIBE.get(name) or _generic(name, level)
        label, style, detail = describe(fields)
        out = Text()
        out.append(self._clock(stamp), style="dim")
        out.append("  ")
        out.append(label.ljust(LABEL_WIDTH), style=style)
        who = self._who(fields)
        if who:
            out.append(" ")
            out.append(who, style="bold")
        if detail:
            out.append("  " if who else " ")
            out.append(detail)
        labels = fields.pop("labels", None)
        if labels:
            out.append("  ")
            out.append(plain(labels), style="dim")
        debug: dict[str, Any] = {k: fields.pop(k) for k in _DEBUG_FIELDS if k in fields}
        if self._verbose:
            fields.update(debug)
        rest = {k: v for k, v in fields.items() if k not in _PLACED}
        if rest:  # what this renderer does not place: shown, never dropped
            out.append("  ")
            out.append(" ".join(f"{k}={plain(v)}" for k, v in rest.items()), style="dim")
        return out

    def _clock(self, stamp: Any) -> str:
        if not isinstance(stamp, str):
            return "--:--:--"
        try:
            moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        except ValueError:
            return stamp
        local = moment.astimezone(self._tz)
        return local.strftime("%H:%M:%S.%f")[:-3] if self._verbose else local.strftime("%H:%M:%S")

    def _who(self, fields: dict[str, Any]) -> str:
        dataset = fields.get("dataset")
        task_id = fields.get("task_id")
        key = fields.get("task_key")
        parts = []
        if dataset:
            parts.append(str(dataset))
        if task_id:
            parts.append(str(task_id) if self._verbose else short_task_id(str(task_id)))
        if not parts and key:
            parts.append(str(key) if self._verbose else short_task_id(str(key)))
        return "  ".join(parts)


# -- the end-of-run table ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """What the end-of-run table shows of one task."""

    key: str
    dataset: str | None
    status: str | None  # the last status seen (terminal or not)
    polls: int
    watched_s: float | None
    gave_up: str | None = None  # the reason polling stopped without a terminal status


def summary_table(tasks: Iterable[TaskSummary]) -> Table:
    """Every task of a run: key, dataset, final status, polls, time watched, reason given up."""
    table = Table(title="enkwatch: the tasks of this run", title_justify="left")
    table.add_column("task")
    table.add_column("dataset")
    table.add_column("final status")
    table.add_column("polls", justify="right")
    table.add_column("watched", justify="right")
    table.add_column("gave up")
    for task in tasks:
        status = task.status or "-"
        style = "bold red" if task.gave_up else _STATUS_STYLE.get(status, "")
        table.add_row(
            task.key,
            task.dataset or "-",
            Text(status, style=style),
            str(task.polls),
            duration(task.watched_s),
            Text(_reason(task.gave_up), style="bold red") if task.gave_up else Text("-"),
        )
    return table


def print_summary(
    tasks: Iterable[TaskSummary], stream: TextIO, environ: Mapping[str, str] | None = None
) -> None:
    """Print the end-of-run table on `stream` (in colour when `use_colour` says so)."""
    isatty = getattr(stream, "isatty", None)
    # a terminal's own width; a pipe or a file gets room for long task keys
    width = None if isatty is not None and isatty() else SUMMARY_WIDTH
    console = make_console(stream, use_colour(stream, environ), width)
    console.print(summary_table(tasks), soft_wrap=False)
    stream.flush()


def watch_list_table(
    tasks: Iterable[Mapping[str, Any]], now: datetime, title: str = "enkwatch: the watch list"
) -> Table:
    """`enkwatch tasks`: each task as GET /tasks describes it, for people."""
    table = Table(title=title, title_justify="left")
    for name in ("task", "dataset", "status", "since", "polls", "last error", "next poll"):
        table.add_column(name, justify="right" if name == "polls" else "left")
    for task in tasks:
        outcome = str(task.get("outcome") or "")
        if outcome.startswith("gave_up:"):
            status, style = f"gave up ({_reason(outcome[8:])})", "bold red"
        else:
            status = plain(task.get("status"))
            style = _STATUS_STYLE.get(status, "")
        table.add_row(
            str(task.get("task_key")),
            plain(task.get("dataset")),
            Text(status, style=style),
            _ago(task.get("status_since"), now),
            plain(task.get("polls")),
            Text(_clip(plain(task.get("last_error")), 40), style="red")
            if task.get("last_error")
            else Text("-"),
            "-" if outcome else _in(task.get("next_poll_at"), now),
        )
    return table


def _moment(stamp: Any) -> datetime | None:
    if not isinstance(stamp, str):
        return None
    try:
        return datetime.fromisoformat(stamp)
    except ValueError:
        return None


def _ago(stamp: Any, now: datetime) -> str:
    moment = _moment(stamp)
    return "-" if moment is None else f"{duration((now - moment).total_seconds())} ago"


def _in(stamp: Any, now: datetime) -> str:
    moment = _moment(stamp)
    return "-" if moment is None else f"in {duration((moment - now).total_seconds())}"


def print_watch_list(
    tasks: Iterable[Mapping[str, Any]], now: datetime, stream: TextIO, title: str
) -> None:
    """Print `watch_list_table` on `stream` (colour on a terminal, as the events)."""
    isatty = getattr(stream, "isatty", None)
    width = None if isatty is not None and isatty() else SUMMARY_WIDTH
    console = make_console(stream, use_colour(stream), width)
    console.print(watch_list_table(tasks, now, title), soft_wrap=False)
    stream.flush()
