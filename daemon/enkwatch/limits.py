"""The limits every request shares: requests per second, and Retry-After pauses."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiolimiter import AsyncLimiter

from enkwatch.clock import Clock, SystemClock


class RequestGate:
    """Limits shared by every request: requests per second, and a global Retry-After pause."""

    def __init__(
        self,
        max_requests_per_second: float,
        clock: Clock | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._clock = clock or SystemClock()
        self._sleep = sleep
        self._limiter: AsyncLimiter | None = None
        self.set_rate(max_requests_per_second)
        self.paused_until = 0.0
        self.pauses = 0
        # for metrics: requests that had to wait, and how long all waits took together
        self.limit_waits = 0
        self.wait_seconds = 0.0
        # the tasks waiting their turn in acquire(): close() cancels them
        self._waiting: set[asyncio.Task[Any]] = set()
        self.closed = False

    def set_rate(self, max_requests_per_second: float) -> None:
        """(Re)set the limit; 0 = none."""
        # a bucket of one request spaces requests evenly: at most rate + 1 in any one-second window
        self._limiter = (
            AsyncLimiter(1, 1.0 / max_requests_per_second) if max_requests_per_second > 0 else None
        )

    def pause(self, seconds: float) -> None:
        """Hold every request for `seconds` (a Retry-After from the API)."""
        until = self._clock.monotonic() + seconds
        if until > self.paused_until:
            self.paused_until = until
            self.pauses += 1

    def pause_remaining(self) -> float:
        return max(0.0, self.paused_until - self._clock.monotonic())

    def close(self) -> int:
        """Let no more requests through (shutdown): cancel the tasks waiting their turn; how many.

        A poll held by the rate limit or a Retry-After pause has sent nothing yet: sending it
        after SIGTERM would be a new request, and waiting for it would hold up the exit.
        """
        self.closed = True
        waiting = [task for task in self._waiting if not task.done()]
        for task in waiting:
            task.cancel()
        return len(waiting)

    async def acquire(self) -> None:
        """Wait for the global pause to end and for a slot in the rate limit.

        After close() nothing goes through: the caller is cancelled instead.
        """
        if self.closed:
            raise asyncio.CancelledError
        if self._limiter is None and self.paused_until <= self._clock.monotonic():
            return  # the hot path without limits: nothing to wait for, nothing to track
        task = asyncio.current_task()
        if task is not None:
            self._waiting.add(task)
        try:
            await self._wait_turn()
        finally:
            if task is not None:
                self._waiting.discard(task)

    async def _wait_turn(self) -> None:
        # a loop, not an Event: another Retry-After may extend the pause while we wait
        while (wait := self.pause_remaining()) > 0:
            self.wait_seconds += wait
            await self._sleep(wait)
        if self._limiter is not None:
            if self._limiter.has_capacity():
                await self._limiter.acquire()
            else:
                started = self._clock.monotonic()
                self.limit_waits += 1
                await self._limiter.acquire()
                self.wait_seconds += self._clock.monotonic() - started
