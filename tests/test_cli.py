"""The CLI's outcome mapping (CONTRACT §6) and its argument handling, without a subprocess."""

from __future__ import annotations

import pytest

from enkwatch.cli import (
    EXIT_AUTH,
    EXIT_FAILED,
    EXIT_GAVE_UP,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    exit_code,
    main,
    status_exit_code,
)
from enkwatch.errors import (
    AuthError,
    ConfigError,
    InvalidResponse,
    NotFound,
    TransientPollError,
    UnauthorizedAnswer,
)
from enkwatch.health import Outcome, StopReason


@pytest.mark.parametrize(
    ("outcome", "code"),
    [
        (Outcome(StopReason.SIGNAL, auth_failed=False, failed=1, gave_up=1), EXIT_OK),
        (Outcome(StopReason.STOP_REQUESTED, auth_failed=False), EXIT_OK),
        (Outcome(StopReason.SIGNAL, auth_failed=True), EXIT_AUTH),
        (Outcome(StopReason.AUTH_FAILED, auth_failed=True, gave_up=2), EXIT_AUTH),
        (Outcome(StopReason.ALL_DONE, auth_failed=False, finished=3), EXIT_OK),
        (Outcome(StopReason.ALL_DONE, auth_failed=False, finished=1, failed=1), EXIT_FAILED),
        (Outcome(StopReason.ALL_DONE, auth_failed=False, failed=1, gave_up=1), EXIT_GAVE_UP),
    ],
)
def test_outcomes_map_to_the_contracts_exit_codes(outcome: Outcome, code: int) -> None:
    assert exit_code(outcome) == code


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (AuthError(401), EXIT_AUTH),
        (UnauthorizedAnswer("HTTP 403", 403), EXIT_AUTH),
        (NotFound("HTTP 404", 404), EXIT_GAVE_UP),
        (ConfigError(["x"]), EXIT_USAGE),
        (TransientPollError("timeout", "the request timed out"), EXIT_UNREACHABLE),
        (InvalidResponse("the body is not JSON"), EXIT_UNREACHABLE),
    ],
)
def test_status_errors_map_to_the_contracts_exit_codes(error: Exception, code: int) -> None:
    assert status_exit_code(error) == code  # type: ignore[arg-type]


def test_a_usage_mistake_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--no-such-option"]) == EXIT_USAGE
    assert "enkwatch" in capsys.readouterr().err


def test_no_command_prints_help_and_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert "COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["watch"], "name a task: --task-id ID and/or --dataset NAME"),
        (["watch", "--task-id", "x", "--interval", "0"], "--interval: must be greater than 0"),
        (["status"], "name a task: --task-id ID and/or --dataset NAME"),
        (["run"], "no config file: pass --config PATH or set $ENKWATCH_CONFIG"),
        (["check-config", "--config", "/nope.yaml"], "cannot read the config file"),
        (["simulate", "--port", "-1"], "--port: not a port number (0..65535): -1"),
    ],
)
def test_bad_arguments_are_exit_2_naming_what_is_wrong(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ENKWATCH_CONFIG", raising=False)
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_version_is_exit_0(capsys: pytest.CaptureFixture[str]) -> None:
    from enkwatch import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code in (0, None)
    assert __version__ in capsys.readouterr().out
