"""The one error hierarchy of enkwatch; each class builds its own message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# the `error` values of task.poll_failed (CONTRACT §5): each PollError's `kind`
ERR_TIMEOUT: Final = "timeout"
ERR_CONNECTION: Final = "connection"
ERR_HTTP_STATUS: Final = "http_status"
ERR_RATE_LIMITED: Final = "rate_limited"
ERR_INVALID_RESPONSE: Final = "invalid_response"


class EnkwatchError(Exception):
    """Base of every error enkwatch raises on purpose."""


class ConfigError(EnkwatchError):
    """The configuration (file, environment or arguments) is invalid: exit 2."""

    def __init__(self, problems: Sequence[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid configuration{where}:\n{lines}")


class AuthError(EnkwatchError):
    """The API rejected the key (401/403): exit 4."""

    def __init__(self, http_status: int) -> None:
        self.http_status = http_status
        super().__init__(
            f"the API rejected the key (HTTP {http_status}); check ENKRYPTAI_API_KEY "
            "or api.api_key_file"
        )


class PollError(EnkwatchError):
    """One request for a task did not give an observation."""

    kind: str = ERR_INVALID_RESPONSE

    def __init__(self, detail: str, http_status: int | None = None) -> None:
        self.detail = detail
        self.http_status = http_status
        super().__init__(detail)


class TransientPollError(PollError):
    """Timeout, connection failure, 5xx, 429: worth retrying with backoff."""

    def __init__(
        self,
        kind: str,
        detail: str,
        http_status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.kind = kind
        self.retry_after_s = retry_after_s
        super().__init__(detail, http_status)


class InvalidResponse(PollError):
    """The API answered, but not with an observation of the spec's shape."""

    kind = ERR_INVALID_RESPONSE


class NotFound(PollError):
    """The API does not know the task (404, or a 200 whose error says "not found")."""

    def __init__(self, detail: str, http_status: int | None = None) -> None:
        # a 404 is reported as an http_status failure, a 200 {"error": ...} as invalid_response
        self.kind = ERR_HTTP_STATUS if http_status == 404 else ERR_INVALID_RESPONSE
        super().__init__(detail, http_status)


class UnauthorizedAnswer(PollError):
    """A single 401/403: confirmed by a second try before it becomes an AuthError."""

    kind = ERR_HTTP_STATUS


class DeadlineReached(EnkwatchError):
    """A poll's task reached its deadline while the poll waited its turn (a rate limit or a
    Retry-After pause): nothing was sent; the task is given up."""

    def __init__(self) -> None:
        super().__init__("the task's deadline came while its request waited its turn")


class LeaseLost(EnkwatchError):
    """This replica may not poll or emit for a task (its partition's lease is gone, or another
    writer moved the task on): nothing was emitted; the task is dropped here."""

    def __init__(self, task_key: str, why: str) -> None:
        self.task_key = task_key
        super().__init__(f"{task_key}: {why}")


class StateUnavailable(EnkwatchError):
    """The shared state database could not be reached; what was being written is unknown."""

    def __init__(self, task_key: str | None, why: str) -> None:
        self.task_key = task_key
        super().__init__(f"the state database is unavailable: {why}")


class StateNotWritten(StateUnavailable):
    """The local state refused a write (disk full, I/O error, read-only file system) and
    rolled it back: nothing of the change was committed, so it can be tried again."""
