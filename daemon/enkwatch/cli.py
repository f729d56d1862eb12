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
from collections.abc import Sequence
from typing import Any, Final

from enkwatch import __version__
from enkwatch import events as ev
from enkwatch.admin import ADMIN_TOKEN_ENV
from enkwatch.client import ApiClient
from enkwatch.clock import SystemClock
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
    UnauthorizedAnswer,
)
from enkwatch.events import EventWriter
from enkwatch.health import Outcome, StopReason
from enkwatch.kinds import DEFAULT_KIND
from enkwatch.limits import RequestGate
from enkwatch.models import Observation
from enkwatch.output import StdoutUnusable
from enkwatch.redact import redact_url
from enkwatch.service import Service
from enkwatch.sinks import build_sinks

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
    config: Config, api_key: str, task_id: str | None, dataset: str | None
) -> Observation:
    """One request for `status`: an Observation or a typed error."""
    api = config.api
    async with ApiClient(api.base_url, api_key, api.timeout_seconds, RequestGate(0), 1) as client:
        return await client.get_task(DEFAULT_KIND, task_id, dataset)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # exit 2 with one line, as for any bad usage
        raise _UsageError(f"{self.prog}: {message}")


def _common_options(parser: argparse.ArgumentParser, top: bool) -> None:
    default = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=default,
        help="json (default when stdout is not a terminal) or console",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error", "critical"),
        default=default if not top else "info",
        help="the lowest level written (default info)",
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
    parser = _Parser(prog="enkwatch", description="Watch Enkrypt AI dataset-generation tasks.")
    parser.add_argument("--version", action="version", version=f"enkwatch {__version__}")
    _common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="the daemon, on a config file")
    run.add_argument("--config", help=f"the YAML config (default ${CONFIG_PATH_ENV})")
    run.add_argument(
        "--exit-when-done",
        action="store_true",
        help="exit once every task is terminal or given up, with the exit code of the outcome",
    )

    watch = sub.add_parser("watch", help="watch tasks until done, without a config file")
    _task_options(watch)
    watch.add_argument("--interval", type=float, help="seconds between polls of a task")
    watch.add_argument("--deadline", type=float, help="give up after this many seconds")

    status = sub.add_parser("status", help="one request: print the task as JSON")
    _task_options(status)

    check = sub.add_parser("check-config", help="validate a config and print the watch list")
    check.add_argument("--config", help=f"the YAML config (default ${CONFIG_PATH_ENV})")

    sim = sub.add_parser("simulate", help="a local simulated Enkrypt API")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=_port, default=8080, help="0..65535 (default 8080)")
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
    health.add_argument("--config", help=f"the YAML config (default ${CONFIG_PATH_ENV})")
    health.add_argument("--url", help="the URL to ask (default: http://<admin.listen>/healthz)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")

    for child in (run, watch, status, check, sim, sub.choices["demo"], health, migrate):
        _common_options(child, top=False)
    return parser


def _port(text: str) -> int:
    """A TCP port for argparse: 0..65535 (0: any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (0..65535): {port}")
    return port


def _task_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-id", dest="task_id", action=_TaskArg, metavar="ID")
    parser.add_argument("--dataset", dest="dataset", action=_TaskArg, metavar="NAME")


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
    ev.configure_logging(log_format, args.log_level)
    try:
        return _dispatch(args)
    except StdoutUnusable as err:
        return _stdout_unusable(str(err))
    except ConfigError as err:
        print(f"enkwatch: {err}", file=sys.stderr)
        return EXIT_USAGE
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
    if command == "run":
        path = _config_path(args)
        config = load_config(path)
        return asyncio.run(_run_service(config, args.exit_when_done, config_path=path))
    if command == "watch":
        config = _adhoc_config(args, need_tasks=True)
        return asyncio.run(_run_service(config, exit_when_done=True))
    if command == "status":
        return asyncio.run(_status(args))
    if command == "check-config":
        return _check_config(args)
    if command == "simulate":
        return asyncio.run(_simulate(args))
    if command == "migrate-state":
        if not os.path.isfile(args.source):
            raise ConfigError([f"--from: {args.source} is not a file"])
        return asyncio.run(_migrate(args))
    if command == "healthcheck":
        return _healthcheck(args)
    if command == "demo":
        return asyncio.run(_demo())
    raise AssertionError(command)


def _config_path(args: argparse.Namespace) -> str:
    path: str | None = args.config or os.environ.get(CONFIG_PATH_ENV)
    if not path:
        raise ConfigError([f"no config file: pass --config PATH or set ${CONFIG_PATH_ENV}"])
    return path


def _adhoc_config(args: argparse.Namespace, need_tasks: bool) -> Config:
    targets: list[tuple[str, str]] = getattr(args, "targets", None) or []
    if need_tasks and not targets:
        raise ConfigError(["give at least one --task-id ID or --dataset NAME"])
    tasks: list[dict[str, Any]] = [{kind: value} for kind, value in targets]
    overrides: dict[str, Any] = {}
    if getattr(args, "interval", None) is not None:
        overrides["polling"] = {"interval_seconds": args.interval}
    if getattr(args, "deadline", None) is not None:
        for task in tasks:
            task["deadline_seconds"] = args.deadline
    overrides["tasks"] = tasks
    raw: dict[str, Any] = {"state": {"path": ":memory:"}}
    try:
        return parse_config(raw, os.environ, source="the command line", overrides=overrides)
    except ConfigError as err:
        fields = {
            "task_id": "--task-id",
            "dataset": "--dataset",
            "deadline_seconds": "--deadline",
            "interval_seconds": "--interval",
        }
        problems = []
        for problem in err.problems:
            for i, (kind, _) in enumerate(targets):
                prefix = f"tasks[{i}]"
                if problem.startswith(prefix):
                    rest = problem[len(prefix) :]
                    field, _, message = rest.lstrip(".").partition(":")
                    option = fields.get(field.strip(), fields[kind])
                    problem = f"{option} (task {i + 1} on the command line):{message}"
            problems.append(problem.replace("polling.interval_seconds", "--interval"))
        raise ConfigError(problems, "the command line") from None


async def _run_service(config: Config, exit_when_done: bool, config_path: str | None = None) -> int:
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
    outcome = await service.run()
    if outcome.problem is not None:
        return _stdout_unusable(outcome.problem)
    return exit_code(outcome)


async def _demo() -> int:
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
    return EXIT_OK if demo_ok(service.running.watchlist.tasks.values()) else EXIT_FAILED


async def _status(args: argparse.Namespace) -> int:
    targets: list[tuple[str, str]] = getattr(args, "targets", None) or []
    kinds = {kind for kind, _ in targets}
    if not targets or len(targets) != len(kinds):
        raise ConfigError(["status takes one task: --task-id ID and/or --dataset NAME"])
    config = _adhoc_config(args, need_tasks=True)
    api_key = load_api_key(config)
    task = config.tasks[0]
    try:
        obs = await fetch_status(config, api_key, task.task_id, task.dataset)
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
    config = load_config(_config_path(args))
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
        raise ConfigError(
            [f"--host/--port: cannot listen on {args.host}:{args.port}: {reason}"],
            "the command line",
        ) from None
    return EXIT_OK
