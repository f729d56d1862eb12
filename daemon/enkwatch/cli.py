"""argv -> settings -> logging -> asyncio.run -> exit code: the only place errors meet exits."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import json
import os
import signal
import sys
import traceback
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from enkwatch import __version__
from enkwatch import events as ev
from enkwatch.admin import ADMIN_TOKEN_ENV
from enkwatch.client import ApiClient
from enkwatch.clock import Clock, SystemClock
from enkwatch.config import (
    CONFIG_PATH_ENV,
    Config,
    load_api_key,
    load_config,
    normalized_watch_list,
    parse_config,
)
from enkwatch.errors import (
    AuthError,
    ConfigError,
    EnkwatchError,
    NotFound,
    PollError,
    StateUnavailable,
    UnauthorizedAnswer,
)
from enkwatch.events import EventWriter
from enkwatch.health import Outcome, StopReason
from enkwatch.kinds import DEFAULT_KIND, KINDS
from enkwatch.limits import RequestGate
from enkwatch.models import Observation, TaskKind
from enkwatch.output import StdoutUnusable
from enkwatch.preflight import preflight_problems
from enkwatch.redact import redact_url
from enkwatch.service import Service
from enkwatch.sinks import build_sinks
from enkwatch.taskcmds import (
    DaemonUnreachable,
    admin_base,
    call,
    error_of,
    forget_in_state,
    parse_labels,
    read_state,
)
from enkwatch.watch import GAVE_UP_PREFIX, TaskWatch

if TYPE_CHECKING:
    from enkwatch.console import TaskSummary

# CONTRACT §6
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_GAVE_UP: Final = 3
EXIT_AUTH: Final = 4
EXIT_UNREACHABLE: Final = 5
# an internal error (a bug): not one of the contract's codes; EX_SOFTWARE of sysexits.h
EXIT_INTERNAL: Final = 70


def exit_code(outcome: Outcome) -> int:
    """CONTRACT §6 for a run: a stop by signal is 0 (4 if the key was rejected); else
    4 > 3 > 1 > 0."""
    if outcome.auth_failed:
        return EXIT_AUTH
    if outcome.reason == StopReason.STDOUT_UNUSABLE:
        return EXIT_FAILED
    if outcome.reason in (StopReason.SIGNAL, StopReason.STOP_REQUESTED):
        return EXIT_OK
    if outcome.gave_up:
        return EXIT_GAVE_UP
    if outcome.failed:
        return EXIT_FAILED
    return EXIT_OK


def status_exit_code(err: EnkwatchError) -> int:
    """CONTRACT §6 for `status`."""
    if isinstance(err, AuthError | UnauthorizedAnswer):
        return EXIT_AUTH
    if isinstance(err, NotFound):
        return EXIT_GAVE_UP
    if isinstance(err, ConfigError):
        return EXIT_USAGE
    return EXIT_UNREACHABLE


async def fetch_status(
    config: Config,
    api_key: str,
    task_id: str | None,
    dataset: str | None,
    kind: TaskKind = DEFAULT_KIND,
) -> Observation:
    """One request for `status`: an Observation or a typed error."""
    api = config.api
    async with ApiClient(api.base_url, api_key, api.timeout_seconds, RequestGate(0), 1) as client:
        return await client.get_task(kind, task_id, dataset)


# the task options of `watch` and `status`: option dest -> (kind, the task entry's field)
TASK_OPTIONS: Final[dict[str, tuple[str, str, str]]] = {
    "task_id": ("--task-id", "dataset", "task_id"),
    "dataset": ("--dataset", "dataset", "dataset"),
    "redteam_task": ("--redteam-task", "redteam", "task_id"),
    "test_name": ("--test-name", "redteam", "test_name"),
    "run": ("--run", "redteam_run", "run_id"),
}


class _UsageError(Exception):
    """A mistake on the command line: its usage line, then what is wrong (exit 2)."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, unless it says it or has none to say."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "default" in help_text or action.default in (None, False, argparse.SUPPRESS):
            return help_text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:  # exit 2, as for any bad usage; never a traceback
        raise _UsageError(f"{self.format_usage()}{self.prog}: error: {message}")


def _usage_error(command: str, problems: Sequence[str]) -> _UsageError:
    """A usage error of `enkwatch COMMAND`, with the command's usage line."""
    sub = _subcommands(build_parser()).get(command)
    usage = sub.format_usage() if sub is not None else ""
    lines = "\n".join(f"enkwatch {command}: error: {p}" for p in problems)
    return _UsageError(f"{usage}{lines}\n(enkwatch {command} --help tells more)")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=default,
        help="console: a short line per event, for people; json: one JSON object per line "
        "(default: console when stdout is a terminal, json otherwise)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        default=default if not top else "info",
        help="the lowest level written; debug also shows event ids and the API's "
        "timestamps on the console (default: info)",
    )


class _TaskArg(argparse.Action):
    """--task-id/--dataset in the order given, one task each."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        items = list(getattr(namespace, "targets", None) or [])
        items.append((self.dest, values))
        namespace.targets = items


def build_parser() -> argparse.ArgumentParser:
    """The command line of CONTRACT §2."""
    parser = _Parser(
        prog="enkwatch",
        description="Watch Enkrypt AI jobs: dataset tasks, red-team tasks and runs.",
    )
    parser.add_argument("--version", action="version", version=f"enkwatch {__version__}")
    _common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _watch_commands(sub)
    _list_commands(sub)
    _tool_commands(sub)
    for child in sub.choices.values():
        _common_options(child, top=False)
    return parser


CONFIG_HELP: Final = f"the YAML config (default: ${CONFIG_PATH_ENV})"


def _watch_commands(sub: Any) -> None:
    """run, watch, status, check-config."""
    run = sub.add_parser("run", help="the daemon, on a config file")
    run.add_argument("--config", help=CONFIG_HELP)
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once every task is terminal or given up, with the exit code of the outcome",
    )

    watch = sub.add_parser(
        "watch",
        help="watch tasks until done, without a config file",
        description="Watch tasks until each is done, then exit with the outcome's code. "
        + PAIRING_RULE,
    )
    _task_options(watch)
    watch.add_argument(
        "--interval",
        type=float,
        metavar="S",
        help="seconds between polls of a task (default: 30, or "
        "$ENKWATCH_POLLING__INTERVAL_SECONDS)",
    )
    watch.add_argument(
        "--deadline",
        type=float,
        metavar="S",
        help="give up on a task not done after this many seconds (default: none, wait)",
    )

    status = sub.add_parser(
        "status",
        help="one request: print the task as JSON",
        description="One request for one task: a --task-id, a --dataset, or both.",
    )
    _task_options(status)

    check = sub.add_parser(
        "check-config",
        help="validate a config, and what `run` needs besides, and print the watch list",
    )
    check.add_argument("--config", help=CONFIG_HELP)
    check.add_argument(
        "--file-only",
        action="store_true",
        help="check the file alone, not the API key or the state path (to lint a config "
        "away from where it runs, e.g. in CI); by default both are checked as `run` does",
    )


DAEMON_HELP: Final = (
    "The daemon is found at --url, else at the config's admin.listen (--config, else "
    "$ENKWATCH_CONFIG). Changes need its admin token in $ENKWATCH_ADMIN_TOKEN."
)


def _daemon_options(parser: argparse.ArgumentParser, state: bool) -> None:
    parser.add_argument("--config", help=CONFIG_HELP)
    parser.add_argument(
        "--url",
        help="the daemon's admin API, e.g. http://127.0.0.1:9090 (default: from the config)",
    )
    if state:
        parser.add_argument(
            "--state",
            metavar="PATH_OR_URL",
            help="read this state (SQLite file or postgresql:// URL) instead of asking a daemon "
            "(default: the config's state.path when no daemon answers)",
        )


def _list_commands(sub: Any) -> None:
    """tasks, add, remove, forget."""
    tasks = sub.add_parser(
        "tasks",
        help="the watch list: status, since when, polls, last error, next poll",
        description="The watch list of a running daemon, or of its state when none runs. "
        + DAEMON_HELP,
    )
    _daemon_options(tasks, state=True)
    tasks.add_argument("--json", action="store_true", help="JSON (as GET /tasks) for scripts")
    add = sub.add_parser(
        "add",
        help="watch more tasks (through a running daemon)",
        description="Add tasks to a running daemon's watch list. "
        + PAIRING_RULE
        + " "
        + DAEMON_HELP,
    )
    _task_options(add)
    add.add_argument("--interval", type=float, metavar="S", help="seconds between polls "
                     "(default: the daemon's polling.interval_seconds)")  # fmt: skip
    add.add_argument("--deadline", type=float, metavar="S", help="give up after this many "
                     "seconds (default: none, wait)")  # fmt: skip
    add.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                     help="a label copied into the task's events (repeatable)")  # fmt: skip
    _daemon_options(add, state=False)
    remove = sub.add_parser(
        "remove",
        help="stop watching tasks (through a running daemon)",
        description="Remove tasks from a running daemon's watch list. " + DAEMON_HELP,
    )
    remove.add_argument("keys", nargs="+", metavar="KEY", help="a task key (see `enkwatch tasks`)")
    _daemon_options(remove, state=False)
    forget = sub.add_parser(
        "forget",
        help="watch a finished or given-up task again, as new",
        description="A task that ended (terminal or given up) is watched again as new: its "
        "status, poll count and deadline start over (its event numbers go on). Through a "
        "running daemon; else on the state, taking effect at the next start. " + DAEMON_HELP,
    )
    forget.add_argument("keys", nargs="+", metavar="KEY", help="a task key (see `enkwatch tasks`)")
    _daemon_options(forget, state=True)


def _tool_commands(sub: Any) -> None:
    """simulate, demo, migrate-state, healthcheck."""
    sim = sub.add_parser("simulate", help="a local simulated Enkrypt API")
    sim.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    sim.add_argument("--port", type=_port, default=8080, help="0..65535; 0: any free port")
    sim.add_argument("--scenario", help="a scenario YAML (default: the built-in one)")

    sub.add_parser("demo", help="the simulator and the daemon on the bundled demo config")

    migrate = sub.add_parser(
        "migrate-state", help="copy a SQLite state into PostgreSQL (to run several replicas)"
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="SQLITE_FILE")
    migrate.add_argument("--to", dest="target", required=True, metavar="POSTGRESQL_URL")

    health = sub.add_parser(
        "healthcheck", help="ask a running daemon's /healthz (for a container HEALTHCHECK)"
    )
    health.add_argument("--config", help=CONFIG_HELP)
    health.add_argument("--url", help="the URL to ask (default: http://<admin.listen>/healthz)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")


def _port(text: str) -> int:
    """A TCP port for argparse: 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0..65535): {port}")
    return port


PAIRING_RULE: Final = (
    "Each --task-id and each --dataset is one task, except that a --task-id and a --dataset "
    "given next to each other (in either order) are one task with both, as a task entry of "
    "the config file: `--task-id A --dataset X --dataset Y` watches (A, X) and Y. Likewise "
    "--redteam-task and --test-name (a red-team task); each --run is one run."
)


def _task_options(parser: argparse.ArgumentParser) -> None:
    helps = {
        "task_id": ("ID", "a dataset task's id (repeatable; no default: name at least one task)"),
        "dataset": ("NAME", "a dataset task's dataset (repeatable; next to a --task-id: one task)"),
        "redteam_task": ("ID", "a red-team task's id (kind redteam; repeatable; no default)"),
        "test_name": (
            "NAME",
            "a red-team test name (next to a --redteam-task: one task; no default)",
        ),
        "run": ("RUN_ID", "a red-team run's id (kind redteam_run; repeatable; no default)"),
    }
    for dest, (option, _, _) in TASK_OPTIONS.items():
        metavar, text = helps[dest]
        parser.add_argument(option, dest=dest, action=_TaskArg, metavar=metavar, help=text)


def pair_tasks(targets: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    """The tasks named by the task flags in order (see PAIRING_RULE), as config entries."""
    pairs: list[tuple[str, dict[str, str]]] = []
    for dest, value in targets:
        _, kind, field = TASK_OPTIONS[dest]
        last = pairs[-1] if pairs else None
        # the previous flag made a task of one field, the other one of the same kind: this
        # one completes it
        if last is not None and last[0] == kind and len(last[1]) == 1 and field not in last[1]:
            last[1][field] = value
        else:
            pairs.append((kind, {field: value}))
    return [fields if kind == "dataset" else {"kind": kind, **fields} for kind, fields in pairs]


def main(argv: Sequence[str] | None = None) -> int:
    """The console command; returns the exit code (and `sys.exit`s it from the entry point)."""
    code = _main(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        sys.exit(code)
    return code


def _main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if sys.stdout is None and args.command != "healthcheck":
        # started with stdout closed (`>&-`): a file opened later would get its descriptor
        print(
            "enkwatch: stdout is closed (EBADF): nothing could be written; stopping",
            file=sys.stderr,
        )
        return EXIT_FAILED
    log_format = args.log_format or ("console" if sys.stdout.isatty() else "json")
    args.log_format = log_format
    ev.configure_logging(log_format, args.log_level)
    try:
        return _dispatch(args)
    except StdoutUnusable as err:
        return _stdout_unusable(str(err))
    except _UsageError as err:
        print(err, file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as err:
        print(f"enkwatch: {err}", file=sys.stderr)
        return EXIT_USAGE
    except StateUnavailable as err:  # a task command on a state that refused the change
        print(f"enkwatch: {err}; nothing was changed, try again", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError as err:
        return _stdout_unusable(str(StdoutUnusable(err)))
    except Exception:  # noqa: BLE001 - the last line of defence: a bug, reported, not hidden
        print("enkwatch: internal error, please report it:", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        return EXIT_INTERNAL


def _stdout_unusable(problem: str) -> int:
    """One line on stderr; exit 1. Journaled events not written are written after a restart."""
    with contextlib.suppress(OSError):
        print(f"enkwatch: {problem}; stopping", file=sys.stderr)
    # what Python still holds for stdout goes nowhere at exit (no second complaint)
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno() if sys.stdout is not None else 1)
    return EXIT_FAILED


def _print_out(text: str) -> None:
    """What the commands that only print write on stdout; StdoutUnusable if it cannot be."""
    try:
        print(text, flush=True)
    except OSError as err:
        raise StdoutUnusable(err) from None


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    summary = args.log_format == "console"
    if command == "run":
        path = _config_path(args)
        config = load_config(path)
        if problems := preflight_problems(config):
            raise ConfigError(problems, path)
        run = _run_service(config, args.exit_when_done, config_path=path, summary=summary)
        del config  # the service lets its task entries go once watched: no reference here
        return asyncio.run(run)
    if command == "watch":
        config = _adhoc_config(args)
        return asyncio.run(_run_service(config, exit_when_done=True, summary=summary))
    if command == "status":
        return asyncio.run(_status(args))
    if command == "check-config":
        return _check_config(args)
    if command == "simulate":
        return asyncio.run(_simulate(args))
    if command == "migrate-state":
        if not os.path.isfile(args.source):
            raise _usage_error(command, [f"--from: {args.source} is not a file"])
        return asyncio.run(_migrate(args))
    if command == "healthcheck":
        return _healthcheck(args)
    if command == "demo":
        return asyncio.run(_demo(summary))
    if command in ("tasks", "add", "remove", "forget"):
        return _LIST_COMMANDS[command](args)
    raise AssertionError(command)


# -- tasks, add, remove, forget ---------------------------------------------------------------


def _answer_code(status: int) -> int:
    """The exit code for an admin API answer (as `status` for the Enkrypt API)."""
    if 200 <= status < 300:
        return EXIT_OK
    if status in (400, 401, 403):
        return EXIT_USAGE
    if status == 404:
        return EXIT_GAVE_UP  # not found is 3, as for `status`
    if status == 409:
        return EXIT_FAILED
    return EXIT_UNREACHABLE


def _optional_config(args: argparse.Namespace) -> Config | None:
    path: str | None = args.config or os.environ.get(CONFIG_PATH_ENV)
    return load_config(path) if path else None


def _no_daemon(command: str) -> _UsageError:
    return _usage_error(
        command,
        ["name a daemon: --url URL, or --config PATH (or $ENKWATCH_CONFIG) with admin.listen"],
    )


def _tasks(args: argparse.Namespace) -> int:
    config = _optional_config(args)
    tasks: list[dict[str, Any]] | int | None = None
    where = ""
    if args.state is None and (base := admin_base(config, args.url)) is not None:
        tasks, where = _tasks_of_daemon(base, fall_back=args.url is None and config is not None)
    if isinstance(tasks, int):
        return tasks
    if tasks is None:
        path = args.state or (config.state.path if config is not None else None)
        if path is None:
            raise _usage_error("tasks", ["name a daemon or a state: --url, --config or --state"])
        tasks = asyncio.run(read_state(path, config))
        where = f"the state {redact_url(path)}"
    if args.json:
        print(json.dumps({"tasks": tasks}, ensure_ascii=False), flush=True)
    else:
        from enkwatch.console import print_watch_list

        title = f"enkwatch: {len(tasks)} task{'' if len(tasks) == 1 else 's'}, from {where}"
        print_watch_list(tasks, SystemClock().now(), sys.stdout, title)
    return EXIT_OK


def _tasks_of_daemon(base: str, fall_back: bool) -> tuple[list[dict[str, Any]] | int | None, str]:
    """(the daemon's watch list, or an exit code, or None to read the state; where from)."""
    try:
        answer = call(base, "GET", "/tasks")
    except DaemonUnreachable as err:
        if not fall_back:
            print(f"enkwatch: {err}", file=sys.stderr)
            return EXIT_UNREACHABLE, ""
        print(f"enkwatch: {err}; reading the state instead", file=sys.stderr)
        return None, ""
    if answer.status != 200:
        print(f"enkwatch: {error_of(answer)}", file=sys.stderr)
        return _answer_code(answer.status), ""
    return list(answer.body["tasks"]), f"the daemon at {redact_url(base)}"


def _add(args: argparse.Namespace) -> int:
    entries: list[dict[str, Any]] = pair_tasks(getattr(args, "targets", None) or [])
    if not entries:
        raise _usage_error("add", [NAME_A_TASK])
    labels = parse_labels(args.label)
    for entry in entries:
        entry.update({k: v for k, v in (("interval_seconds", args.interval),
                      ("deadline_seconds", args.deadline), ("labels", labels)) if v})  # fmt: skip
    base = admin_base(_optional_config(args), args.url)
    if base is None:
        raise _no_daemon("add")
    return _each(entries, lambda e: call(base, "POST", "/tasks", e, token=True), "watching")


def _remove(args: argparse.Namespace) -> int:
    base = admin_base(_optional_config(args), args.url)
    if base is None:
        raise _no_daemon("remove")
    return _each(
        args.keys,
        lambda k: call(base, "DELETE", f"/tasks/{_quoted(k)}", token=True),
        "stopped watching",
    )


def _forget(args: argparse.Namespace) -> int:
    config = _optional_config(args)
    base = None if args.state is not None else admin_base(config, args.url)
    if base is not None:
        try:
            return _each(
                args.keys,
                lambda k: call(base, "POST", f"/tasks/{_quoted(k)}/forget", token=True),
                "watching again",
                unreachable_ok=args.url is None,
            )
        except DaemonUnreachable as err:
            print(f"enkwatch: {err}; changing the state instead", file=sys.stderr)
    path = args.state or (config.state.path if config is not None else None)
    if path is None:
        raise _usage_error("forget", ["name a daemon or a state: --url, --config or --state"])
    code = EXIT_OK
    for key in args.keys:
        done = asyncio.run(forget_in_state(path, key))
        if done:
            print(f"{key}: forgotten in the state; watched again from the next start", flush=True)
            continue
        why = "has not ended" if done is False else "is not in the state"
        print(f"enkwatch: {key}: {why}", file=sys.stderr)
        code = max(code, EXIT_FAILED if done is False else EXIT_GAVE_UP)
    return code


def _quoted(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def _each(items: Sequence[Any], send: Any, done: str, unreachable_ok: bool = False) -> int:
    """Send one request per item; report each; the worst exit code. DaemonUnreachable
    before the first request is raised when `unreachable_ok` (the caller falls back)."""
    code = EXIT_OK
    for i, item in enumerate(items):
        try:
            answer = send(item)
        except DaemonUnreachable as err:
            if unreachable_ok and i == 0:
                raise
            print(f"enkwatch: {err}", file=sys.stderr)
            return EXIT_UNREACHABLE
        key = item if isinstance(item, str) else (answer.body or {}).get("task_key") or item
        if 200 <= answer.status < 300:
            print(f"{key}: {done}", flush=True)
        else:
            print(f"enkwatch: {key}: {error_of(answer)}", file=sys.stderr)
            code = max(code, _answer_code(answer.status))
    return code


_LIST_COMMANDS: Final = {"tasks": _tasks, "add": _add, "remove": _remove, "forget": _forget}


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get(CONFIG_PATH_ENV)
    if not path:
        raise _usage_error(
            args.command, [f"no config file: pass --config PATH or set ${CONFIG_PATH_ENV}"]
        )
    return path


# the command line's names of task settings by kind (problems are said in the user's words)
_OPTION_OF: Final[dict[str, dict[str, str]]] = {
    "dataset": {"task_id": "--task-id", "dataset": "--dataset", "": "--task-id/--dataset"},
    "redteam": {
        "task_id": "--redteam-task",
        "test_name": "--test-name",
        "": "--redteam-task/--test-name",
    },
    "redteam_run": {"run_id": "--run", "": "--run"},
}
NAME_A_TASK: Final = (
    "name a task: --task-id ID and/or --dataset NAME, --redteam-task ID and/or "
    "--test-name NAME, or --run RUN_ID"
)


def _adhoc_config(args: argparse.Namespace) -> Config:
    """The config of `watch`/`status`: the tasks of the command line, :memory: state."""
    tasks: list[dict[str, Any]] = pair_tasks(getattr(args, "targets", None) or [])
    if not tasks:
        raise _usage_error(args.command, [NAME_A_TASK])
    overrides: dict[str, Any] = {}
    if getattr(args, "interval", None) is not None:
        overrides["polling"] = {"interval_seconds": args.interval}
    if getattr(args, "deadline", None) is not None:
        for task in tasks:
            task["deadline_seconds"] = args.deadline
    overrides["tasks"] = tasks
    raw: dict[str, Any] = {"state": {"path": ":memory:"}}
    try:
        return parse_config(raw, os.environ, source="the environment", overrides=overrides)
    except ConfigError as err:
        usage, other = _command_line_problems(err.problems, tasks)
        if usage:
            raise _usage_error(args.command, usage + other) from None
        raise


def _command_line_problems(
    problems: Sequence[str], tasks: Sequence[dict[str, Any]]
) -> tuple[list[str], list[str]]:
    """(problems of the command line's options, in their names; problems of the environment)."""
    count = len(tasks)
    usage: list[str] = []
    other: list[str] = []
    for problem in problems:
        where, _, message = problem.partition(":")
        if where == "polling.interval_seconds":
            usage.append(f"--interval:{message}")
            continue
        head, _, field = where.partition(".")
        if head.startswith("tasks[") and head.endswith("]") and "(from " not in where:
            number = int(head[6:-1]) + 1
            task = f"task {number} of {count}" if count > 1 else "the task"
            names = _OPTION_OF[tasks[number - 1].get("kind", "dataset")]
            option = "--deadline" if field == "deadline_seconds" else names.get(field, names[""])
            usage.append(f"{option} ({task}):{message}")
            continue
        other.append(problem)
    return usage, other


async def _run_service(
    config: Config,
    exit_when_done: bool,
    config_path: str | None = None,
    summary: bool = False,
) -> int:
    api_key = load_api_key(config)
    sinks = build_sinks(config.sinks, os.environ)
    service = Service(
        config,
        api_key,
        exit_when_done=exit_when_done,
        config_path=config_path,
        sinks=sinks,
        admin_token=os.environ.get(ADMIN_TOKEN_ENV) or None,
    )
    del config  # nor here (see Service._assemble)
    outcome = await service.run()
    if outcome.problem is not None:
        return _stdout_unusable(outcome.problem)
    if summary and exit_when_done:
        _print_summary(service)
    return exit_code(outcome)


def _print_summary(service: Service) -> None:
    """The end-of-run table, for the console format only (a JSON stdout stays one event a line)."""
    from enkwatch.console import print_summary  # rich: only for the console format

    if service.running is not None:
        tasks = service.running.watchlist.tasks.values()
        print_summary(task_summaries(tasks, service.clock), sys.stdout)


def task_summaries(tasks: Iterable[TaskWatch], clock: Clock) -> list[TaskSummary]:
    """The end-of-run view of the tasks, in the order they were listed."""
    from enkwatch.console import TaskSummary

    now = clock.now().timestamp()
    out = []
    for task in tasks:
        rec = task.record
        if task.done and not task.gave_up:
            # time to the terminal status, when this process saw it happen
            end = task.status_since
            watched = None if end is None else end - rec.watch_started_at
        else:
            watched = now - rec.watch_started_at
        reason = rec.outcome.removeprefix(GAVE_UP_PREFIX) if task.gave_up and rec.outcome else None
        out.append(
            TaskSummary(
                key=task.key,
                dataset=task.dataset if task.dataset is not None else rec.seen_dataset,
                status=rec.last_status,
                polls=rec.polls,
                watched_s=watched,
                gave_up=reason,
            )
        )
    return out


async def _demo(summary: bool) -> int:
    """The simulator and the daemon on the bundled demo config; 0 when it ended as scripted."""
    from enkwatch.demo import DEMO_API_KEY, demo_config, demo_ok
    from enkwatch.simulator import default_scenario, start_simulator

    runner, port, _ = await start_simulator(default_scenario(), "127.0.0.1", 0)
    try:
        service = Service(
            demo_config(f"http://127.0.0.1:{port}"), DEMO_API_KEY, exit_when_done=True
        )
        outcome = await service.run()
    finally:
        await runner.cleanup()
    if outcome.problem is not None:
        return _stdout_unusable(outcome.problem)
    assert service.running is not None
    if summary:
        _print_summary(service)
    return EXIT_OK if demo_ok(service.running.watchlist.tasks.values()) else EXIT_FAILED


async def _status(args: argparse.Namespace) -> int:
    tasks = pair_tasks(getattr(args, "targets", None) or [])
    if len(tasks) > 1:
        raise _usage_error(
            "status",
            [
                f"status asks for one task; these flags name {len(tasks)} "
                "(a --task-id and a --dataset, or a --redteam-task and a --test-name, "
                "next to each other are one task)"
            ],
        )
    config = _adhoc_config(args)
    api_key = load_api_key(config)
    task = config.tasks[0]
    try:
        obs = await fetch_status(config, api_key, task.ident, task.name, KINDS[task.kind])
    except PollError as err:
        print(f"enkwatch: {task.key}: {err.kind}: {err.detail}", file=sys.stderr)
        return status_exit_code(err)
    _print_out(json.dumps(obs.data, indent=2, ensure_ascii=False))
    return EXIT_OK


async def _migrate(args: argparse.Namespace) -> int:
    from enkwatch.state.migrate import migrate_state

    report = await migrate_state(args.source, args.target)
    _print_out(
        json.dumps(
            {
                "tasks_copied": report.tasks,
                "tasks_already_there": report.tasks_skipped,
                "events_copied": report.events,
                "deliveries_copied": report.outbox,
                "disabled_sinks_copied": report.disabled_sinks,
            }
        )
    )
    return EXIT_OK


def _healthcheck(args: argparse.Namespace) -> int:
    url = _healthcheck_url(args)
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            healthy = resp.status == 200
    except (OSError, ValueError, http.client.HTTPException) as err:
        # the reason, never str(err): urllib's errors may quote the whole URL
        reason = getattr(err, "reason", None) or getattr(err, "strerror", None)
        print(
            f"enkwatch: unhealthy: {redact_url(url)}: {reason or type(err).__name__}",
            file=sys.stderr,
        )
        return 1
    return EXIT_OK if healthy else 1


def _healthcheck_url(args: argparse.Namespace) -> str:
    """--url, checked; else the /healthz of the config's admin.listen."""
    url: str | None = args.url
    if url is not None:
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(["--url: must be an http:// or https:// URL with a host"])
        return url
    config = load_config(_config_path(args))
    listen = config.admin.host_port
    if listen is None:
        raise ConfigError(["admin.listen: not set, so there is no /healthz to ask"])
    host, port = listen
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address
    return f"http://{host}:{port}/healthz"


def _check_config(args: argparse.Namespace) -> int:
    path = _config_path(args)
    config = load_config(path)
    # what `run` would refuse besides the file itself: the key, the state path, an idle list
    if not args.file_only and (problems := preflight_problems(config)):
        raise ConfigError(problems, path)
    state = config.state.model_dump(mode="json")
    state["path"] = redact_url(state["path"])
    sinks = config.sinks.model_dump(mode="json")
    for hook in sinks["webhooks"]:
        hook["url"] = redact_url(hook["url"])
    out = {
        "api": config.api.model_dump(mode="json"),
        "polling": config.polling.model_dump(mode="json"),
        "state": state,
        "admin": config.admin.model_dump(mode="json"),
        "sinks": sinks,
        "tasks": normalized_watch_list(config),
    }
    _print_out(json.dumps(out, indent=2, ensure_ascii=False))
    return EXIT_OK


async def _simulate(args: argparse.Namespace) -> int:
    from enkwatch.simulator import default_scenario, load_scenario, serve

    scenario = load_scenario(args.scenario) if args.scenario else default_scenario()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def ready(port: int) -> None:
        EventWriter(SystemClock()).daemon_event(
            "simulator.listening",
            host=args.host,
            port=port,
            url=f"http://{args.host}:{port}",
            tasks=len(scenario.tasks),
        )

    try:
        await serve(args.host, args.port, scenario, stop, ready)
    except OSError as err:  # the port is in use, or the host is not ours: a usage error
        reason = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror or err
        raise _usage_error(
            "simulate", [f"--host/--port: cannot listen on {args.host}:{args.port}: {reason}"]
        ) from None
    return EXIT_OK
