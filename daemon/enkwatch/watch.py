"""One poll of one task: client -> state -> events; backoff, deadlines, not-found counting."""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeAlias

from enkwatch import events as ev
from enkwatch.clock import Clock
from enkwatch.config import PollingConfig, TaskConfig
from enkwatch.errors import (
    AuthError,
    DeadlineReached,
    LeaseLost,
    NotFound,
    PollError,
    StateNotWritten,
    StateUnavailable,
    TransientPollError,
    UnauthorizedAnswer,
)
from enkwatch.events import EventWriter
from enkwatch.kinds import DEFAULT_KIND, KINDS
from enkwatch.models import Observation, TaskKind
from enkwatch.state.base import TaskRecord

# "retried once for the same task within about a second"
AUTH_CONFIRM_DELAY_S: Final = 1.0
# a poll this close to the deadline counts as at the deadline (timers fire a little early)
DEADLINE_SLACK_S: Final = 0.05
GAVE_UP_PREFIX: Final = "gave_up:"
# a write the local state refused (disk full) is tried again at the earliest this much later
STATE_RETRY_MIN_S: Final = 1.0
# a task found by a `discover:` sweep (its first event is task.discovered)
SOURCE_DISCOVERED: Final = "discovered"
# the outcome of a request, besides the error kinds (the `outcome` label of enkwatch_polls)
OUTCOME_OK: Final = "ok"
OUTCOME_NOT_FOUND: Final = "not_found"
OUTCOME_UNAUTHORIZED: Final = "unauthorized"

# a stall check that finds the task's poll in flight looks again this much later
STALL_BUSY_RETRY_S: Final = 0.5

# a time (monotonic) before every other: a task the sweeps do not cover
NEVER: Final = float("-inf")

# the labels of a task without labels (never mutated: labels are replaced, not edited)
NO_LABELS: Final[dict[str, str]] = {}


class PollEnd(enum.Enum):
    """How a poll can end without a next delay."""

    # terminal or given up: never polled again
    DONE = "done"
    # this replica may not (or could not) write for the task: nothing was emitted; the
    # owner drops it here (it comes back, reloaded from the state, if still ours)
    LOST = "lost"


@dataclass(frozen=True, slots=True)
class AuthRejected:
    """The API confirmed that it rejects the key (a second 401/403): the daemon stops."""

    http_status: int


# what one poll returns: the seconds until the next poll, or how it ended
PollResult: TypeAlias = float | PollEnd | AuthRejected
DONE: Final = PollEnd.DONE
LOST: Final = PollEnd.LOST


class TaskClient(Protocol):
    """What the poller needs of the API client."""

    async def get_task(
        self,
        kind: TaskKind,
        task_id: str | None,
        dataset: str | None,
        give_up_at: float | None = None,
    ) -> Observation: ...


@dataclass(slots=True, eq=False)
class TaskWatch:
    """A watched task: its config, its durable record, and what lives only in memory."""

    key: str
    # the job's id (a run's run_id) and name (a dataset's name, a red-team test's test_name)
    task_id: str | None
    dataset: str | None
    labels: dict[str, str]
    interval_s: float
    deadline_s: float | None
    record: TaskRecord
    # the kind of Enkrypt job: its request, answer and status words
    kind: TaskKind = DEFAULT_KIND
    source: str = "config"
    failures: int = 0
    not_found: int = 0
    last_error: str | None = None
    next_due: float | None = None
    # the task's own stall threshold (None: polling.stall_after_seconds)
    stall_after_s: float | None = None
    # the scheduler's generation of this task's heap entry (lazy deletion), and of its
    # stall check's entry with the monotonic time it is due
    sched_gen: int = 0
    # when watching began on this process's monotonic clock (see `anchor`): deadlines and
    # watched_seconds are measured from it, so a step of the wall clock moves neither
    started_mono: float | None = None
    stall_gen: int = 0
    stall_due: float | None = None
    # status from list pages (issue 10): the last list answer naming this task, and when
    # that list was requested; used by the next poll instead of a request only if newer
    # than the task's last own answer (`answered_mono`, monotonic)
    listed: Observation | None = None
    listed_mono: float = 0.0
    answered_mono: float = float("-inf")
    # until when (monotonic) the sweeps cover the task: a poll that finds no newer list
    # answer sends no request before then, it waits for the next sweep's
    listed_until: float = NEVER

    @classmethod
    def from_config(
        cls,
        task: TaskConfig,
        polling: PollingConfig,
        record: TaskRecord,
        source: str = "config",
        key: str | None = None,  # task.key, when the caller has it already
    ) -> TaskWatch:
        return cls(
            key=task.key if key is None else key,
            task_id=task.ident,
            dataset=task.name,
            # most tasks have none: share one empty mapping instead of a dict each
            labels=dict(task.labels) if task.labels else NO_LABELS,
            interval_s=task.interval_seconds or polling.interval_seconds,
            deadline_s=task.deadline_seconds,
            stall_after_s=task.stall_after_seconds,
            record=record,
            kind=KINDS[task.kind],
            source=source,
        )

    def anchor(self, wall_now: float, mono_now: float) -> float:
        """Convert the stored wall-clock start (`watch_started_at`, what survives restarts)
        to this process's monotonic clock, once: at adoption, or at the first poll."""
        if self.started_mono is None:
            elapsed = max(0.0, wall_now - self.record.watch_started_at)
            self.started_mono = mono_now - elapsed
        return self.started_mono

    @property
    def deadline_at(self) -> float | None:
        """The deadline on the monotonic clock (None: none, or not anchored yet)."""
        if self.deadline_s is None or self.started_mono is None:
            return None
        return self.started_mono + self.deadline_s

    @property
    def status_since(self) -> float | None:
        """Wall time (epoch seconds) at which the current status was first seen (kept in the
        state with the task: a restart does not move it)."""
        return self.record.status_since

    @status_since.setter
    def status_since(self, value: float | None) -> None:
        self.record.status_since = value

    @property
    def done(self) -> bool:
        """Terminal or given up: never polled again."""
        return self.record.outcome is not None

    @property
    def gave_up(self) -> bool:
        return (self.record.outcome or "").startswith(GAVE_UP_PREFIX)

    @property
    def failed(self) -> bool:
        """Ended in a status its kind counts as Failed."""
        return self.record.outcome in self.kind.failed

    @property
    def finished(self) -> bool:
        """Ended in a terminal status that is not a failure."""
        outcome = self.record.outcome
        return outcome in self.kind.terminal and outcome not in self.kind.failed


class Poller:
    """Polls one task once and turns the answer into state and events."""

    def __init__(
        self,
        client: TaskClient,
        writer: EventWriter,
        clock: Clock,
        polling: PollingConfig,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        may_poll: Callable[[str], bool] | None = None,
        observe_poll: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self._client = client
        self._writer = writer
        self._clock = clock
        self.polling = polling
        writer.concurrent_writers(polling.max_concurrency)
        self._rng = rng or random.Random()
        self._sleep = sleep
        # with leases: may this replica poll the task now (does it hold a fresh lease)?
        self._may_poll = may_poll
        # after each request: the job's kind, "ok" or the error kind, and the seconds it took
        self._observe_poll = observe_poll
        # the durable fields of each task being polled (by watch: a task dropped and adopted
        # again is another watch) as last committed, rolled back to when the local state
        # refuses a write; an entry lives only during its poll
        self._committed: dict[TaskWatch, tuple[Any, ...]] = {}
        # writes refused in a row by the local state (its retries back off on this)
        self.state_failures = 0
        # the tasks whose poll or stall check is under way: never both at once (one writer
        # per task: the state's compare-and-set on seq would take a second one for a race)
        self._busy: set[str] = set()

    def use_polling(self, polling: PollingConfig) -> None:
        """A reloaded config's polling settings (the journal's group commits follow its
        max_concurrency)."""
        self.polling = polling
        self._writer.concurrent_writers(polling.max_concurrency)

    # -- the poll ---------------------------------------------------------------------

    async def poll(self, task: TaskWatch) -> PollResult:
        """Poll `task` once: the seconds until its next poll, or how polling it ended.

        Expected endings are results (DONE, LOST, AuthRejected); only a bug raises.
        """
        if self._may_poll is not None and not self._may_poll(task.key):
            return LOST
        if task.key in self._busy:
            return STALL_BUSY_RETRY_S  # its stall event is being written: poll right after
        self._busy.add(task.key)
        try:
            return await self._poll(task)
        finally:
            self._busy.discard(task.key)

    async def _poll(self, task: TaskWatch) -> PollResult:
        # one coroutine per poll, as before: the endings are caught here, not one level down
        started = self._clock.monotonic()
        self._committed[task] = _durable(task.record)
        try:
            if task.source == SOURCE_DISCOVERED and task.record.seq == 0:
                await self._emit(task, ev.TASK_DISCOVERED, ev.INFO, source=SOURCE_DISCOVERED)
            if (listed := self._take_listed(task)) is not None:
                task.record.polls += 1  # an observation without a request: still a poll
                return await self._observed(task, listed)
            if self._covered(task):
                # the last list named it and the next sweep will say more: no request
                return await self._within_deadline(task, self.next_interval(task))
            try:
                obs = await self._request(task)
            except NotFound as err:
                self._observe(task, OUTCOME_NOT_FOUND, started)
                return await self._not_found(task, err)
            except PollError as err:
                self._observe(task, err.kind, started)
                return await self._failed(task, err)
            self._observe(task, OUTCOME_OK, started)
            return await self._observed(task, obs)
        except AuthError as err:
            self._observe(task, OUTCOME_UNAUTHORIZED, started)
            return AuthRejected(err.http_status)
        except DeadlineReached:
            return await self.expire(task)
        except StateNotWritten:
            # nothing was committed: forget what this poll changed, so that the change is
            # seen again, and emitted, once the state takes writes again
            _restore(task.record, self._committed[task])
            return self._state_retry(task)
        except (LeaseLost, StateUnavailable):
            return LOST
        finally:
            self._committed.pop(task, None)

    async def expire(self, task: TaskWatch) -> PollResult:
        """End `task` at its deadline without a request (the gate holds every request, as a
        Retry-After pause does); before its deadline, the seconds left until it."""
        if self._may_poll is not None and not self._may_poll(task.key):
            return LOST
        saved = _durable(task.record)
        try:
            return await self._within_deadline(task, self.next_interval(task))
        except StateNotWritten:
            _restore(task.record, saved)  # the give-up is tried again, as a refused poll is
            return self._state_retry(task)
        except (LeaseLost, StateUnavailable):
            return LOST

    @staticmethod
    def _take_listed(task: TaskWatch) -> Observation | None:
        """The list answer about `task` read after its last own answer, if any (once)."""
        obs, task.listed = task.listed, None
        return obs if obs is not None and task.listed_mono > task.answered_mono else None

    def _covered(self, task: TaskWatch) -> bool:
        """A sweep's list named the task and the sweeps cover it still (until the next sweep
        has had its time): the next sweep says more than a request would. An own answer
        newer than that list does not end this (the next sweep names the task again, or
        drops it: `WatchList.unlisted`). Not before the task's first observation (a
        dataset's list does not give its task id: its first poll asks the API)."""
        return task.record.last_status is not None and (task.listed_until > self._clock.monotonic())

    def _observe(self, task: TaskWatch, outcome: str, started: float) -> None:
        if self._observe_poll is not None:
            self._observe_poll(task.kind.name, outcome, self._clock.monotonic() - started)

    async def _send(self, task: TaskWatch) -> Observation:
        """One request for `task`, counted in its polls if it was sent."""
        remaining = self.deadline_remaining(task)
        give_up_at = None if remaining is None else self._clock.monotonic() + remaining
        task.record.polls += 1
        try:
            obs = await self._client.get_task(task.kind, task.task_id, task.dataset, give_up_at)
            task.answered_mono = self._clock.monotonic()
            return obs
        except DeadlineReached:
            task.record.polls -= 1  # nothing was sent
            raise

    async def _request(self, task: TaskWatch) -> Observation:
        try:
            return await self._send(task)
        except UnauthorizedAnswer as first:
            await self._sleep(AUTH_CONFIRM_DELAY_S)
            try:
                obs = await self._send(task)
            except UnauthorizedAnswer as second:
                raise AuthError(second.http_status or 401) from None
            except PollError:
                await self._report_failure(task, first, AUTH_CONFIRM_DELAY_S)
                raise
            await self._report_failure(task, first, AUTH_CONFIRM_DELAY_S)
            return obs

    # -- outcomes -----------------------------------------------------------------------

    async def _observed(self, task: TaskWatch, obs: Observation) -> float | PollEnd:
        rec = task.record
        task.failures = 0
        task.not_found = 0
        task.last_error = None
        # keep the configured string objects when the API says the same (memory per task)
        if obs.dataset_name != rec.seen_dataset:
            rec.seen_dataset = (
                task.dataset if obs.dataset_name == task.dataset else obs.dataset_name
            )
        if obs.task_id != rec.seen_task_id:
            rec.seen_task_id = task.task_id if obs.task_id == task.task_id else obs.task_id
        if obs.known:
            if obs.status != rec.last_status:
                previous = rec.last_status
                rec.last_status = obs.status
                rec.last_unknown_status = None
                if obs.terminal:
                    rec.outcome = obs.status
                rec.status_since = self._clock.now().timestamp()
                # the next transition ends a stall (PagerDuty resolves on it)
                stall = {"stall_ended": True} if rec.stalled_status is not None else {}
                rec.stalled_status = None
                await self._emit(
                    task,
                    ev.TASK_TRANSITION,
                    ev.WARNING if obs.status in task.kind.failed else ev.INFO,
                    previous_status=previous,
                    status=obs.status,
                    terminal=obs.terminal,
                    polls=rec.polls,
                    created_at=obs.created_at,
                    started_at=obs.started_at,
                    watched_seconds=round(self._watched_s(task), 3),
                    **stall,
                )
            if obs.terminal:
                return DONE
        elif obs.status != rec.last_unknown_status:
            rec.last_unknown_status = obs.status
            await self._emit(task, ev.TASK_UNKNOWN_STATUS, ev.WARNING, status=obs.status)
        return await self._within_deadline(task, self.next_interval(task))

    async def _not_found(self, task: TaskWatch, err: NotFound) -> float | PollEnd:
        task.not_found += 1
        if task.not_found >= self.polling.not_found_attempts:
            task.failures += 1
            task.last_error = err.kind
            await self._give_up(task, ev.GAVE_UP_NOT_FOUND)
            return DONE
        not_found = task.not_found
        delay = await self._failed(task, err)
        task.not_found = not_found  # _failed resets it for other errors
        return delay

    async def _failed(self, task: TaskWatch, err: PollError) -> float | PollEnd:
        task.failures += 1
        task.not_found = 0
        task.last_error = err.kind
        delay = self.backoff(task)
        if isinstance(err, TransientPollError) and err.retry_after_s is not None:
            delay = max(delay, err.retry_after_s)
        delay_or_end = await self._within_deadline(task, delay)
        if isinstance(delay_or_end, float):
            await self._report_failure(task, err, delay_or_end, counted=True)
        return delay_or_end

    async def _report_failure(
        self, task: TaskWatch, err: PollError, retry_in_s: float, counted: bool = False
    ) -> None:
        if not counted:
            task.failures += 1
            task.last_error = err.kind
        await self._emit(
            task,
            ev.TASK_POLL_FAILED,
            ev.WARNING,
            error=err.kind,
            http_status=err.http_status,
            detail=err.detail,
            attempt=task.failures,
            retry_in_seconds=round(retry_in_s, 3),
        )

    async def _give_up(self, task: TaskWatch, reason: str) -> None:
        task.record.outcome = GAVE_UP_PREFIX + reason
        await self._emit(
            task,
            ev.TASK_GAVE_UP,
            ev.ERROR,
            reason=reason,
            last_status=task.record.last_status,
            polls=task.record.polls,
            watched_seconds=round(self._watched_s(task), 3),
        )

    # -- timing -------------------------------------------------------------------------

    def next_interval(self, task: TaskWatch) -> float:
        """interval x (1 + u), u uniform in [-jitter, +jitter]."""
        jitter = self.polling.jitter
        return task.interval_s * (1.0 + self._rng.uniform(-jitter, jitter))

    def backoff(self, task: TaskWatch) -> float:
        """Full jitter: uniform in [0, min(max_backoff, interval x 2^attempt)], floored."""
        exponent = min(task.failures, 32)
        ceiling = min(self.polling.max_backoff_seconds, task.interval_s * 2.0**exponent)
        # never hammer: at least a tenth of the ceiling
        return max(self._rng.uniform(0.0, ceiling), ceiling / 10.0)

    def _started_mono(self, task: TaskWatch) -> float:
        if task.started_mono is not None:
            return task.started_mono
        return task.anchor(self._clock.now().timestamp(), self._clock.monotonic())

    def _state_retry(self, task: TaskWatch) -> float:
        """The delay before a task whose event the local state refused is polled again."""
        self.state_failures += 1
        base = max(STATE_RETRY_MIN_S, task.interval_s)
        ceiling = min(self.polling.max_backoff_seconds, base * 2.0 ** min(self.state_failures, 16))
        ceiling = max(ceiling, STATE_RETRY_MIN_S)
        return self._rng.uniform(ceiling / 2, ceiling)

    def _watched_s(self, task: TaskWatch) -> float:
        return max(0.0, self._clock.monotonic() - self._started_mono(task))

    def deadline_remaining(self, task: TaskWatch) -> float | None:
        """Seconds until the task's deadline (negative: past), on the monotonic clock."""
        if task.deadline_s is None:
            return None
        return self._started_mono(task) + task.deadline_s - self._clock.monotonic()

    async def _within_deadline(self, task: TaskWatch, delay: float) -> float | PollEnd:
        remaining = self.deadline_remaining(task)
        if remaining is None:
            return delay
        if remaining <= DEADLINE_SLACK_S:
            await self._give_up(task, ev.GAVE_UP_DEADLINE)
            return DONE
        return min(delay, remaining)

    # -- stalls -------------------------------------------------------------------------

    def stall_after(self, task: TaskWatch) -> float | None:
        """The task's stall threshold in seconds: its own, else the polling default."""
        own = task.stall_after_s
        return own if own is not None else self.polling.stall_after_seconds

    def stall_due_in(self, task: TaskWatch) -> float | None:
        """Seconds until the task counts as stalled in its status (<= 0: it does), or None
        when there is nothing to watch for: no threshold, done, no status yet, or reported."""
        after = self.stall_after(task)
        rec = task.record
        if after is None or task.done or rec.last_status is None or rec.stalled_status:
            return None
        now = self._clock.now().timestamp()
        if rec.status_since is None:
            rec.status_since = now  # a state of an older enkwatch: counted from now on
        return rec.status_since + after - now

    async def check_stall(self, task: TaskWatch) -> float | PollEnd | None:
        """Emit task.stalled if the task is stalled now: None when nothing more is to be
        checked for this status, seconds until the next check, or LOST (state refused)."""
        due_in = self.stall_due_in(task)
        if due_in is None:
            return None
        if due_in > 0:
            return due_in
        if task.key in self._busy:
            return STALL_BUSY_RETRY_S
        if task.next_due is not None and task.next_due <= self._clock.monotonic():
            # a poll is due (after a restart: every task): its answer may end the stall
            return STALL_BUSY_RETRY_S
        if self._may_poll is not None and not self._may_poll(task.key):
            return None  # no longer ours: its new owner checks it
        self._busy.add(task.key)
        rec = task.record
        saved = _durable(rec)
        try:
            rec.stalled_status = rec.last_status
            stalled_s = self._clock.now().timestamp() - (rec.status_since or 0.0)
            await self._emit(
                task,
                ev.TASK_STALLED,
                ev.WARNING,
                status=rec.last_status,
                stalled_seconds=round(stalled_s, 3),
                polls=rec.polls,
                watched_seconds=round(self._watched_s(task), 3),
            )
        except StateNotWritten:
            _restore(rec, saved)  # not emitted: tried again once the state takes writes
            return self._state_retry(task)
        except (LeaseLost, StateUnavailable):
            return LOST
        finally:
            self._busy.discard(task.key)
        return None

    # -- events -------------------------------------------------------------------------

    async def _emit(self, task: TaskWatch, name: str, level: str, **fields: Any) -> None:
        """Journal the event with the task's new state, then write it out (the one writer)."""
        await self._writer.task_event(task, name, level, fields)
        self.state_failures = 0
        if task in self._committed:
            self._committed[task] = _durable(task.record)


# what a poll may change of a record besides the poll count (rolled back on a refused write)
_DURABLE: Final = (
    "last_status",
    "last_unknown_status",
    "seen_dataset",
    "seen_task_id",
    "seq",
    "outcome",
    "status_since",
    "stalled_status",
)


def _durable(record: TaskRecord) -> tuple[Any, ...]:
    return tuple(getattr(record, name) for name in _DURABLE)


def _restore(record: TaskRecord, values: tuple[Any, ...]) -> None:
    for name, value in zip(_DURABLE, values, strict=True):
        setattr(record, name, value)
