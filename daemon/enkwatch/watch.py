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


@dataclass(frozen=True, slots=True)
class WatchSpec:
    """What a task's config says besides its identity: one object shared by the tasks that
    say the same (`spec_for`); replaced, never edited."""

    interval_s: float
    deadline_s: float | None
    # the task's own stall threshold (None: polling.stall_after_seconds)
    stall_after_s: float | None
    labels: dict[str, str]
    source: str


# the specs made so far, by value (tasks without labels): 100,000 tasks of one config share
# one; cleared when it grows past SPEC_CACHE_MAX (sharing saves memory, nothing relies on it)
_SPECS: dict[tuple[float, float | None, float | None, str], WatchSpec] = {}
SPEC_CACHE_MAX: Final = 1024


def spec_for(
    interval_s: float,
    deadline_s: float | None = None,
    stall_after_s: float | None = None,
    labels: dict[str, str] = NO_LABELS,
    source: str = "config",
) -> WatchSpec:
    """The spec of these values: a shared one when the task has no labels."""
    if labels:
        return WatchSpec(interval_s, deadline_s, stall_after_s, labels, source)
    key = (interval_s, deadline_s, stall_after_s, source)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) >= SPEC_CACHE_MAX:
            _SPECS.clear()
        spec = _SPECS[key] = WatchSpec(interval_s, deadline_s, stall_after_s, NO_LABELS, source)
    return spec


class Trouble:
    """What only a task with failing polls or a stall check due has (most have none)."""

    __slots__ = ("failures", "last_error", "not_found", "stall_due", "stall_gen")

    def __init__(self) -> None:
        self.failures = 0
        self.not_found = 0
        self.last_error: str | None = None
        # the generation of the task's entry in the stall heap, and when that check is due
        self.stall_gen = -1
        self.stall_due: float | None = None

    @property
    def plain(self) -> bool:
        """Every field at its default: the task needs no `Trouble`."""
        failing = self.failures or self.not_found or self.last_error is not None
        return not failing and self.stall_due is None


class Listing:
    """Status from list pages (issue 10), for a task of a kind that `discover:` sweeps."""

    __slots__ = ("answered_mono", "listed", "listed_mono", "listed_until")

    def __init__(self, answered_mono: float = NEVER) -> None:
        # the last list answer naming this task, and when that list was requested; used by
        # the next poll instead of a request only if newer than the task's last own answer
        # (`answered_mono`, monotonic: a list read while the task's own poll was answered
        # is older than that answer)
        self.listed: Observation | None = None
        self.listed_mono = 0.0
        self.answered_mono = answered_mono
        # until when (monotonic) the sweeps cover the task: a poll that finds no newer list
        # answer sends no request before then, it waits for the next sweep's
        self.listed_until = NEVER


# a listing made for a task whose own answers were not recorded: any list read before its
# next own answer may be older than its last one, so none is used until then
ANSWER_UNKNOWN: Final = float("inf")


class TaskWatch:
    """A watched task: its config, its durable record, and what lives only in memory.

    Memory per task is the daemon's main cost (100,000 tasks): what most tasks never use
    lives in side objects, `spec` shared, `trouble` and `listing` made only when needed.
    """

    __slots__ = (
        "dataset",
        "key",
        "kind",
        "listing",
        "next_due",
        "record",
        "sched_gen",
        "spec",
        "started_mono",
        "task_id",
        "trouble",
    )

    def __init__(
        self,
        key: str,
        # the job's id (a run's run_id) and name (a dataset's name, a red-team test's name)
        task_id: str | None,
        dataset: str | None,
        labels: dict[str, str],
        interval_s: float,
        deadline_s: float | None,
        record: TaskRecord,
        # the kind of Enkrypt job: its request, answer and status words
        kind: TaskKind = DEFAULT_KIND,
        source: str = "config",
        stall_after_s: float | None = None,
    ) -> None:
        self.key = key
        self.task_id = task_id
        self.dataset = dataset
        self.record = record
        self.kind = kind
        self.spec = spec_for(interval_s, deadline_s, stall_after_s, labels, source)
        self.trouble: Trouble | None = None
        # None: a kind no `discover:` entry sweeps
        self.listing: Listing | None = None
        self.next_due: float | None = None
        # the scheduler's generation of this task's heap entry (lazy deletion)
        self.sched_gen = 0
        # when watching began on this process's monotonic clock (see `anchor`): deadlines
        # and watched_seconds are measured from it, so a step of the wall clock moves neither
        self.started_mono: float | None = None

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

    def __repr__(self) -> str:
        return f"TaskWatch({self.key!r}, {self.record!r})"

    # -- the spec's fields (a change replaces the spec) -------------------------------------

    def _respec(self, **changes: Any) -> None:
        old = self.spec
        values = {
            "interval_s": old.interval_s,
            "deadline_s": old.deadline_s,
            "stall_after_s": old.stall_after_s,
            "labels": old.labels,
            "source": old.source,
            **changes,
        }
        self.spec = spec_for(**values)

    @property
    def interval_s(self) -> float:
        return self.spec.interval_s

    @interval_s.setter
    def interval_s(self, value: float) -> None:
        old = self.spec  # set for every task at once by a reload (or the benchmark): quick
        if value != old.interval_s:
            self.spec = spec_for(value, old.deadline_s, old.stall_after_s, old.labels, old.source)

    @property
    def deadline_s(self) -> float | None:
        return self.spec.deadline_s

    @deadline_s.setter
    def deadline_s(self, value: float | None) -> None:
        self._respec(deadline_s=value)

    @property
    def stall_after_s(self) -> float | None:
        return self.spec.stall_after_s

    @stall_after_s.setter
    def stall_after_s(self, value: float | None) -> None:
        self._respec(stall_after_s=value)

    @property
    def labels(self) -> dict[str, str]:
        return self.spec.labels

    @labels.setter
    def labels(self, value: dict[str, str]) -> None:
        self._respec(labels=value)

    @property
    def source(self) -> str:
        return self.spec.source

    @source.setter
    def source(self, value: str) -> None:
        self._respec(source=value)

    # -- failures and the stall check (a `Trouble` while any is not at its default) ---------

    def _troubled(self) -> Trouble:
        if self.trouble is None:
            self.trouble = Trouble()
        return self.trouble

    def _settle(self) -> None:
        if self.trouble is not None and self.trouble.plain:
            self.trouble = None

    @property
    def failures(self) -> int:
        return 0 if self.trouble is None else self.trouble.failures

    @failures.setter
    def failures(self, value: int) -> None:
        if value or self.trouble is not None:
            self._troubled().failures = value
            self._settle()

    @property
    def not_found(self) -> int:
        return 0 if self.trouble is None else self.trouble.not_found

    @not_found.setter
    def not_found(self, value: int) -> None:
        if value or self.trouble is not None:
            self._troubled().not_found = value
            self._settle()

    @property
    def last_error(self) -> str | None:
        return None if self.trouble is None else self.trouble.last_error

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        if value is not None or self.trouble is not None:
            self._troubled().last_error = value
            self._settle()

    @property
    def stall_gen(self) -> int:
        return -1 if self.trouble is None else self.trouble.stall_gen

    @property
    def stall_due(self) -> float | None:
        return None if self.trouble is None else self.trouble.stall_due

    def set_stall(self, gen: int, due: float | None) -> None:
        """The stall heap's entry for this task (-1, None: none)."""
        if due is not None or self.trouble is not None:
            trouble = self._troubled()
            trouble.stall_gen, trouble.stall_due = gen, due
            self._settle()

    def clear_failures(self) -> None:
        """An answer: no failures in a row any more."""
        if self.trouble is not None:
            self.trouble.failures = self.trouble.not_found = 0
            self.trouble.last_error = None
            self._settle()

    def listed_here(self) -> Listing:
        """The task's listing, made now if it has none (its own answers were not recorded)."""
        if self.listing is None:
            self.listing = Listing(ANSWER_UNKNOWN)
        return self.listing

    def anchor(
        self, wall_now: float, mono_now: float, memo: dict[float, float] | None = None
    ) -> float:
        """Convert the stored wall-clock start (`watch_started_at`, what survives restarts)
        to this process's monotonic clock, once: at adoption, or at the first poll. `memo`
        (for many tasks anchored at one moment): the float made for each start, shared."""
        if self.started_mono is None:
            started = self.record.watch_started_at
            if memo is not None and (known := memo.get(started)) is not None:
                self.started_mono = known
                return known
            elapsed = max(0.0, wall_now - started)
            self.started_mono = mono_now - elapsed
            if memo is not None:
                memo[started] = self.started_mono
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
        listing = task.listing
        if listing is None:
            return None
        obs, listing.listed = listing.listed, None
        return obs if obs is not None and listing.listed_mono > listing.answered_mono else None

    def _covered(self, task: TaskWatch) -> bool:
        """A sweep's list named the task and the sweeps cover it still (until the next sweep
        has had its time): the next sweep says more than a request would. An own answer
        newer than that list does not end this (the next sweep names the task again, or
        drops it: `WatchList.unlisted`). Not before the task's first observation (a
        dataset's list does not give its task id: its first poll asks the API)."""
        listing = task.listing
        return (
            listing is not None
            and task.record.last_status is not None
            and listing.listed_until > self._clock.monotonic()
        )

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
            if task.listing is not None:  # a list read before now is older than this answer
                task.listing.answered_mono = self._clock.monotonic()
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
        task.clear_failures()
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
