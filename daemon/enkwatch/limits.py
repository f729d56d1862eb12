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

    async def acquire(self, give_up_at: float | None = None) -> bool:
        """Wait for the global pause to end and for a slot in the rate limit; True when it is
        this request's turn, False when `give_up_at` (a task's deadline, monotonic) came first.

        A request whose deadline is still ahead waits until its deadline at most. The last poll
        of a task (at or after its deadline) still waits its turn in the rate limit, but never
        through a pause. After close() nothing goes through: the caller is cancelled instead.
        """
        if self.closed:
            raise asyncio.CancelledError
        if self._limiter is None and self.paused_until <= self._clock.monotonic():
            return True  # the hot path without limits: nothing to wait for, nothing to track
        task = asyncio.current_task()
        if task is not None:
            self._waiting.add(task)
        try:
            return await self._wait_pause(give_up_at) and await self._wait_limit(give_up_at)
        finally:
            if task is not None:
                self._waiting.discard(task)

    async def _wait_pause(self, give_up_at: float | None) -> bool:
        # a loop, not an Event: another Retry-After may extend the pause while we wait
        while (wait := self.pause_remaining()) > 0:
            if give_up_at is not None and wait >= give_up_at - self._clock.monotonic():
                left = give_up_at - self._clock.monotonic()
                if left > 0:
                    self.wait_seconds += left
                    await self._sleep(left)
                return False
            self.wait_seconds += wait
            await self._sleep(wait)
        return True

    async def _wait_limit(self, give_up_at: float | None) -> bool:
        if self._limiter is None:
            return True
        if self._limiter.has_capacity():
            await self._limiter.acquire()
            return True
        started = self._clock.monotonic()
        self.limit_waits += 1
        # None: no deadline, or the last poll (its deadline already here): it waits its turn
        left = None if give_up_at is None or give_up_at <= started else give_up_at - started
        try:
            async with asyncio.timeout(left):
                await self._limiter.acquire()
        except TimeoutError:
            return False
        finally:
            self.wait_seconds += self._clock.monotonic() - started
        return True
