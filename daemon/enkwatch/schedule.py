"""When each task is polled: a heap of due times, admission control, and APScheduler.

The design, chosen deliberately (the benchmark holds it to 10,000-100,000 tasks):

* One APScheduler 3.x job per task would cost ~1.3 KB and 55-90 µs per `add_job` per
  task (8 s of blocked loop to add 100,000) and double the CPU of every poll. Instead
  every due time lives in one binary heap (a tuple per task, ~200 bytes), and ONE
  APScheduler job, the dispatcher, is what wakes us: its next run time is moved to the
  earliest due time whenever that gets earlier, and an interval of one second is its
  heartbeat. APScheduler keeps doing what it is good at (the timer, misfire handling,
  the periodic housekeeping jobs of the service) without paying for it per task.
* Admission control: at most `max_in_flight` polls run at once. A due task beyond that
  stays in the heap (one tuple), and the next due task starts as soon as a poll ends,
  without waiting for a timer. An overloaded daemon therefore grows late, never large:
  memory stays flat and no backlog of coroutines piles up.
* Requests per second and Retry-After pauses are enforced in the client's `RequestGate`,
  shared by every request; the dispatcher also does not start polls during a pause. A
  pause never holds a deadline: during one, a due task whose deadline has come is ended
  by `expire` (no request), and any other due task waits, re-pushed at the earlier of its
  deadline and the pause's end, so the heap's head stays the next thing to do.
* Stall checks (`task.stalled`) have their own heap of monotonic due times and their own
  APScheduler job, `StallTimer`: a task's check is (re)computed whenever the task is pushed
  back on the poll heap, costs nothing while its due time is unchanged, and sends no request.
* Due times are monotonic; APScheduler 3 keeps its jobs in wall time. A step of the wall
  clock (NTP, a VM resumed) would shift every job by the step: a step back of two hours
  left the dispatcher and the housekeeping jobs asleep for two hours. `ClockStepGuard`
  watches the wall clock against the monotonic one and, on a step, runs every job once
  at once, which re-bases its next run on the new wall clock.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import UTC, timedelta
from typing import Any, Final, Protocol

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from enkwatch.clock import Clock
from enkwatch.config import PollingConfig
from enkwatch.limits import RequestGate
from enkwatch.watch import DONE, LOST, AuthRejected, PollEnd, Poller, PollResult, TaskWatch

# polls due within this much of now start together, saving a wake-up each
DISPATCH_SLACK_S: Final = 0.005
HEARTBEAT_S: Final = 1.0
LOST_WAKEUP_S: Final = 0.1
DISPATCH_JOB_ID: Final = "enkwatch-dispatch"
STALL_JOB_ID: Final = "enkwatch-stall-checks"
# a stall check's due time that moved by less than this is left where it is
STALL_SLACK_S: Final = 0.05
# runs of the dispatch job that may be pending at once (see ApschedulerWakeup)
DISPATCH_INSTANCES: Final = 4
# a heap is rebuilt without its stale entries (tasks removed or re-pushed: lazy deletion)
# once they are more than this share of it and more than COMPACT_MIN_STALE: memory stays
# within 1/(1 - share) of the live entries, at an amortized O(1) per stale entry
COMPACT_SHARE: Final = 1 / 8
COMPACT_MIN_STALE: Final = 256
# how often the wall clock is compared with the monotonic one, and how large a difference
# between their advances counts as a step (NTP slews by at most 0.5 ms a second)
CLOCK_CHECK_EVERY_S: Final = 1.0
CLOCK_STEP_S: Final = 1.0

PollFn = Callable[[TaskWatch], Awaitable[PollResult]]


Entry = tuple[float, int, TaskWatch]


def _went_stale(heap: list[Entry], stale: int, gen: str) -> int:
    """One more entry of `heap` is stale (its task's `gen` attribute moved on): the count of
    stale entries, after dropping them all once they are too many (O(n), in place:
    amortized O(1) per stale entry)."""
    stale += 1
    if stale > COMPACT_MIN_STALE and stale > len(heap) * COMPACT_SHARE:
        heap[:] = [entry for entry in heap if entry[1] == getattr(entry[2], gen)]
        heapq.heapify(heap)
        return 0
    return stale


class StallSource(Protocol):
    """What the stall checks need of the poller."""

    def stall_due_in(self, task: TaskWatch) -> float | None:
        """Seconds until the task counts as stalled (<= 0: now), None: nothing to watch."""
        ...

    async def check_stall(self, task: TaskWatch) -> float | PollEnd | None:
        """Emit task.stalled if due: None (done with this status), seconds to wait, or LOST."""
        ...


class Wakeup(Protocol):
    """Something that calls the dispatcher back at (or a little after) a monotonic time."""

    def arm(self, at: float) -> None: ...


# builds the wake-up of a dispatcher, given the dispatcher's `dispatch`
WakeupFactory = Callable[[Callable[[], None]], Wakeup]


class ManualWakeup:
    """A wake-up that only records: tests call `dispatch()` themselves."""

    def __init__(self) -> None:
        self.armed: float | None = None

    def arm(self, at: float) -> None:
        self.armed = at if self.armed is None else min(self.armed, at)


class StallTimer:
    """When each task's stall check is due: a heap of monotonic due times and one wake-up.

    The poller says in how many seconds a task counts as stalled and emits `task.stalled`;
    the poll scheduler calls `follow` each time it pushes a task back on its heap and
    `forget` when it drops one.
    """

    def __init__(
        self, source: StallSource, clock: Clock, wakeup: WakeupFactory | None = None
    ) -> None:
        self._check = source.check_stall
        self._due_in = source.stall_due_in
        self._clock = clock
        self._heap: list[Entry] = []
        # entries of the heap whose task was forgotten or pushed again since
        self._stale = 0
        self._next_gen = 0
        self.running: set[asyncio.Task[None]] = set()
        self.wakeup: Wakeup = wakeup(self.fire) if wakeup is not None else ManualWakeup()
        self.stopped = False
        self.on_lost: Callable[[TaskWatch], None] = lambda task: None
        self.on_crash: Callable[[BaseException], None] = lambda exc: None

    def __len__(self) -> int:
        """Entries in the heap, stale ones included."""
        return len(self._heap)

    def pending(self) -> int:
        """Stall checks waiting for their time."""
        return sum(1 for _, gen, task in self._heap if gen == task.stall_gen)

    def follow(self, task: TaskWatch) -> None:
        """(Re)compute when the task's check is due: O(1) when unchanged, else O(log n)."""
        due_in = self._due_in(task)
        if due_in is None:
            self.forget(task)
            return
        due = self._clock.monotonic() + max(0.0, due_in)
        if task.stall_due is not None and abs(task.stall_due - due) < STALL_SLACK_S:
            return
        self._push(task, due)

    def _push(self, task: TaskWatch, due: float) -> None:
        queued = task.stall_due is not None
        self._next_gen += 1
        task.set_stall(self._next_gen, due)
        heapq.heappush(self._heap, (due, self._next_gen, task))
        if queued:
            self._went_stale()  # its entry before this one
        if not self.stopped:
            self.wakeup.arm(self._heap[0][0])

    def forget(self, task: TaskWatch) -> None:
        if task.stall_due is None:
            return  # no check queued (most tasks: every push of a task comes here)
        task.set_stall(-1, None)
        self._went_stale()

    def _went_stale(self) -> None:
        self._stale = _went_stale(self._heap, self._stale, "stall_gen")

    def fire(self) -> None:
        """Start the checks that are due, then arm the wake-up for the next."""
        heap = self._heap
        horizon = self._clock.monotonic() + DISPATCH_SLACK_S
        while heap and not self.stopped and heap[0][0] <= horizon:
            _, gen, task = heapq.heappop(heap)
            if gen != task.stall_gen:
                self._stale -= 1
                continue
            task.set_stall(-1, None)
            job = asyncio.ensure_future(self._run(task))
            self.running.add(job)
            job.add_done_callback(self._finished)
        while heap and heap[0][1] != heap[0][2].stall_gen:
            heapq.heappop(heap)  # stale entries: dropped, not armed for
            self._stale -= 1
        if heap and not self.stopped:
            self.wakeup.arm(heap[0][0])

    async def _run(self, task: TaskWatch) -> None:
        result = await self._check(task)
        if result is LOST:
            self.on_lost(task)
        elif isinstance(result, float) and task.stall_due is None and not self.stopped:
            # not yet, its poll under way, or the state refused the write: look again then
            self._push(task, self._clock.monotonic() + result)

    def _finished(self, job: asyncio.Task[None]) -> None:
        self.running.discard(job)
        if not job.cancelled() and (exc := job.exception()) is not None:
            self.on_crash(exc)  # only a bug: expected endings are results

    def stop(self) -> None:
        self.stopped = True


class PollScheduler:
    """Starts each task's poll when it is due, never more than `max_in_flight` at once."""

    def __init__(
        self,
        poll: PollFn,
        clock: Clock,
        max_in_flight: int,
        on_task_done: Callable[[TaskWatch], None],
        on_crash: Callable[[BaseException], None],
        paused_for: Callable[[], float] = lambda: 0.0,
        on_end: Callable[[TaskWatch, PollResult], None] | None = None,
        wakeup: WakeupFactory | None = None,
        expire: PollFn | None = None,
        stalls: StallTimer | None = None,
    ) -> None:
        self._poll = poll
        # ends a task at its deadline without a request (during a pause); None: never asked
        self._expire = expire
        self._clock = clock
        self.max_in_flight = max_in_flight
        self._on_task_done = on_task_done
        self._on_crash = on_crash
        # a poll that ended otherwise than done (lost, auth rejected): the caller decides
        self._on_end = on_end
        self._paused_for = paused_for
        self._heap: list[Entry] = []
        # entries of the heap whose task was removed or pushed again since (lazy deletion)
        self._stale = 0
        self._next_gen = 0
        self.in_flight: set[asyncio.Task[PollResult]] = set()
        self.wakeup: Wakeup = wakeup(self.dispatch) if wakeup is not None else ManualWakeup()
        self.stopped = False
        self.started_polls = 0
        # lateness of each start (actual minus due), for the benchmark
        self.lateness_hook: Callable[[float], None] | None = None
        # task.stalled: its checks follow the tasks of this heap
        self.stalls = stalls
        if stalls is not None:
            stalls.on_crash = on_crash
            stalls.on_lost = lambda task: self._ended(task, LOST)

    def __len__(self) -> int:
        return len(self._heap)

    # -- the watch list ------------------------------------------------------------------

    def add(self, task: TaskWatch, due: float | None = None) -> None:
        """Schedule `task` at monotonic time `due` (now when None); O(log n), no I/O."""
        now = self._clock.monotonic()
        if task.started_mono is None and task.deadline_s is not None:
            # its deadline, on the monotonic clock from here on (others: at their first poll)
            task.anchor(self._clock.now().timestamp(), now)
        self._push(task, now if due is None else due)
        self._arm()

    def add_many(self, tasks: Iterable[TaskWatch]) -> None:
        """Schedule tasks due now (a watch list loading): one wake-up for them all."""
        now = self._clock.monotonic()
        wall = self._clock.now().timestamp()
        memo: dict[float, float] = {}  # tasks that began together share their start's float
        for task in tasks:
            task.anchor(wall, now, memo)  # the deadline, on the monotonic clock from here on
            self._push(task, now)
        self._arm()

    def _arm(self) -> None:
        if self._heap and not self.stopped and len(self.in_flight) < self.max_in_flight:
            self.wakeup.arm(self._heap[0][0])

    def remove(self, task: TaskWatch) -> None:
        """Never poll `task` again (an in-flight poll finishes, its result is dropped)."""
        queued = task.next_due is not None
        task.sched_gen = -1
        task.next_due = None
        if queued:
            self._went_stale()  # its entry in the heap
        if self.stalls is not None:
            self.stalls.forget(task)

    def _went_stale(self) -> None:
        self._stale = _went_stale(self._heap, self._stale, "sched_gen")

    def _push(self, task: TaskWatch, due: float) -> None:
        queued = task.next_due is not None
        self._next_gen += 1
        task.sched_gen = self._next_gen
        task.next_due = due
        heapq.heappush(self._heap, (due, self._next_gen, task))
        if queued:
            self._went_stale()  # added again while queued: its entry before this one
        if self.stalls is not None:
            self.stalls.follow(task)

    # -- dispatching ---------------------------------------------------------------------

    def dispatch(self) -> None:
        """Start every due task there is room for, then arm the wake-up for the next."""
        if self.stopped:
            return
        heap = self._heap
        now = self._clock.monotonic()
        paused = self._paused_for()
        if paused > DISPATCH_SLACK_S:
            self._dispatch_paused(now, now + paused)
            return
        horizon = now + DISPATCH_SLACK_S
        while heap and len(self.in_flight) < self.max_in_flight:
            due, gen, task = heap[0]
            if gen != task.sched_gen:
                heapq.heappop(heap)
                self._stale -= 1
                continue
            if due > horizon:
                break
            heapq.heappop(heap)
            self._start(task, due, now)
        if heap and len(self.in_flight) < self.max_in_flight:
            self.wakeup.arm(heap[0][0])

    def _dispatch_paused(self, now: float, resume_at: float) -> None:
        """During a pause: end the due tasks whose deadline has come, hold the others."""
        heap = self._heap
        horizon = now + DISPATCH_SLACK_S
        while heap and len(self.in_flight) < self.max_in_flight:
            due, gen, task = heap[0]
            if gen != task.sched_gen:
                heapq.heappop(heap)
                self._stale -= 1
                continue
            if due > horizon:
                break
            heapq.heappop(heap)
            task.next_due = None
            deadline = task.deadline_at
            if deadline is not None and deadline <= horizon and self._expire is not None:
                self._start(task, due, now, self._expire)
            elif deadline is not None and deadline > horizon:
                self._push(task, min(deadline, resume_at))
            else:
                self._push(task, resume_at)
        if heap and len(self.in_flight) < self.max_in_flight:
            self.wakeup.arm(heap[0][0])

    def _start(self, task: TaskWatch, due: float, now: float, run: PollFn | None = None) -> None:
        task.next_due = None
        if run is None:  # a poll (an expiry sends nothing)
            self.started_polls += 1
            if self.lateness_hook is not None:
                self.lateness_hook(now - due)
        job = asyncio.ensure_future((run or self._poll)(task))
        gen = task.sched_gen
        self.in_flight.add(job)
        job.add_done_callback(lambda j: self._finished(task, gen, j))

    def _finished(self, task: TaskWatch, gen: int, job: asyncio.Task[PollResult]) -> None:
        self.in_flight.discard(job)
        if job.cancelled():
            return
        exc = job.exception()
        if exc is not None:
            self._on_crash(exc)  # only a bug: expected endings are results
            return
        result = job.result()
        if task.sched_gen != gen:
            pass  # removed (or re-added) while in flight: this result schedules nothing
        elif result is DONE:
            task.sched_gen = -1
            if self.stalls is not None:
                self.stalls.forget(task)
            self._on_task_done(task)
        elif isinstance(result, PollEnd | AuthRejected):
            self._ended(task, result)
            return
        elif not self.stopped:
            self._push(task, self._clock.monotonic() + result)
        self.dispatch()

    def _ended(self, task: TaskWatch, result: PollResult) -> None:
        # lost, or the key rejected: the caller decides
        task.sched_gen = -1
        if self.stalls is not None:
            self.stalls.forget(task)
        if self._on_end is not None:
            self._on_end(task, result)

    # -- shutdown ------------------------------------------------------------------------

    def stop(self) -> None:
        """Start no new polls (and no stall checks)."""
        self.stopped = True
        if self.stalls is not None:
            self.stalls.stop()

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for in-flight polls (and stall checks), then cancel the rest;
        how many polls were cancelled."""
        checks: set[asyncio.Future[Any]] = set(self.stalls.running if self.stalls else ())
        jobs = checks | set(self.in_flight)
        if not jobs:
            return 0
        _, pending = await asyncio.wait(jobs, timeout=timeout_s)
        for job in pending:
            job.cancel()
        if pending:
            await asyncio.wait(pending)
        return len(pending - checks)


class ApschedulerWakeup:
    """The dispatcher as one APScheduler job whose next run time follows the heap's head."""

    def __init__(
        self,
        scheduler: AsyncIOScheduler,
        dispatch: Callable[[], None],
        clock: Clock,
        job_id: str = DISPATCH_JOB_ID,
    ) -> None:
        self._clock = clock
        self._dispatch = dispatch
        self._armed_at: float | None = None
        # An instance counts as running until its asyncio task has run, a loop iteration or
        # two after it fired. With max_instances=1 a wake-up armed in that gap was skipped
        # (with a warning) and replaced by the next heartbeat, while `_armed_at` still held
        # the lost time: polls then waited up to HEARTBEAT_S (the benchmark saw p99 lateness
        # of 0.7 s at 70% load). A second instance only dispatches again, which is harmless.
        # coalesce and no grace limit: a late wake-up still runs, once
        self._job = scheduler.add_job(
            self._tick,
            "interval",
            seconds=HEARTBEAT_S,
            id=job_id,
            max_instances=DISPATCH_INSTANCES,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=clock.now(),
        )

    async def _tick(self) -> None:
        self._armed_at = None
        self._dispatch()

    def arm(self, at: float) -> None:
        now = self._clock.monotonic()
        # an armed time already past by more than LOST_WAKEUP_S is a wake-up that was lost:
        # arm again; one just past is still coming (a busy loop runs it a little late)
        if self._armed_at is not None and now - LOST_WAKEUP_S < self._armed_at <= at:
            return
        self._armed_at = at
        delay = max(0.0, at - now)
        self._job.modify(next_run_time=self._clock.now() + timedelta(seconds=delay))


class ClockStepGuard:
    """Keeps APScheduler's jobs on time when the wall clock steps, either way.

    It runs on the event loop's own (monotonic) timer, since APScheduler's may be the one
    asleep. On a step it moves every scheduled job's next run to now and wakes the
    scheduler: each runs once (the dispatcher re-arms itself from the heap of monotonic due
    times; the periodic jobs then follow their interval on the new wall clock). A step
    forward therefore runs nothing twice and polls no task early; a step back stalls
    nothing for longer than CLOCK_CHECK_EVERY_S.
    """

    def __init__(
        self,
        scheduler: AsyncIOScheduler,
        clock: Clock,
        on_step: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self._scheduler = scheduler
        self._clock = clock
        self._on_step = on_step
        self._offset = self._wall_offset()
        self._timer: asyncio.TimerHandle | None = None

    def _wall_offset(self) -> float:
        return self._clock.now().timestamp() - self._clock.monotonic()

    def start(self) -> None:
        """Check every CLOCK_CHECK_EVERY_S from now on (in the running loop)."""
        self._offset = self._wall_offset()
        self._timer = asyncio.get_running_loop().call_later(CLOCK_CHECK_EVERY_S, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self.check()
        self._timer = asyncio.get_running_loop().call_later(CLOCK_CHECK_EVERY_S, self._tick)

    def check(self) -> float:
        """Compare the clocks once; re-base the jobs on a step. The step in seconds, or 0."""
        offset = self._wall_offset()
        step = offset - self._offset
        self._offset = offset
        if abs(step) < CLOCK_STEP_S:
            return 0.0
        now = self._clock.now()
        for job in self._scheduler.get_jobs():
            if job.next_run_time is not None:  # None: a paused job
                job.modify(next_run_time=now)
        self._scheduler.wakeup()
        self._on_step(step)
        return step


class _ExpectedJobNoise(logging.Filter):
    """What APScheduler 3 logs about our jobs that is by design, not a problem.

    - "Error running job" with CancelledError: `shutdown(wait=False)` cancels the runs it
      submitted that have not started yet (a dispatcher wake-up armed just before SIGTERM).
    - "skipped: maximum number of running instances reached": a periodic job (a lease
      renewal after a freeze, a checkpoint of a large list) still running when its next run
      comes; one instance at a time is the setting, and the next run follows anyway.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0] if record.exc_info else None
        if exc is not None and issubclass(exc, asyncio.CancelledError):
            return False
        return "maximum number of running instances reached" not in record.getMessage()


def make_apscheduler() -> AsyncIOScheduler:
    """An AsyncIOScheduler on the running loop, quiet at INFO."""
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    for name in ("apscheduler.executors.default", "apscheduler.scheduler"):
        noisy = logging.getLogger(name)
        if not any(isinstance(f, _ExpectedJobNoise) for f in noisy.filters):
            noisy.addFilter(_ExpectedJobNoise())
    return AsyncIOScheduler(
        event_loop=asyncio.get_running_loop(),
        timezone=UTC,
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
    )


class Timers:
    """The daemon's one APScheduler: the dispatcher's wake-up and the periodic jobs.

    Started inside the running loop; every job is an `async def`, coalesced, one instance
    at a time, never skipped for being late.
    """

    def __init__(
        self, clock: Clock, on_clock_step: Callable[[float], None] = lambda seconds: None
    ) -> None:
        self._clock = clock
        self._on_clock_step = on_clock_step
        self._aps: AsyncIOScheduler | None = None
        self._guard: ClockStepGuard | None = None

    def start(self) -> None:
        self._aps = make_apscheduler()
        self._aps.start()
        self._guard = ClockStepGuard(self._aps, self._clock, self._on_clock_step)
        self._guard.start()

    @property
    def _scheduler(self) -> AsyncIOScheduler:
        if self._aps is None:
            raise RuntimeError("Timers used before start()")
        return self._aps

    def every(
        self, seconds: float, job: Callable[[], Coroutine[Any, Any, None]], name: str
    ) -> None:
        """Run `job` every `seconds` (the first run one period from now)."""
        self._scheduler.add_job(job, "interval", seconds=seconds, id=name)

    def wakeup(self, dispatch: Callable[[], None]) -> ApschedulerWakeup:
        """A WakeupFactory: the poll dispatcher as one job of this scheduler."""
        return ApschedulerWakeup(self._scheduler, dispatch, self._clock)

    def stall_wakeup(self, fire: Callable[[], None]) -> ApschedulerWakeup:
        """A WakeupFactory: the stall checks as one more job of this scheduler."""
        return ApschedulerWakeup(self._scheduler, fire, self._clock, STALL_JOB_ID)

    def pause(self) -> None:
        """Shutdown, first step: no job runs any more."""
        if self._aps is not None:
            self._aps.pause()

    def shutdown(self) -> None:
        if self._guard is not None:
            self._guard.stop()
            self._guard = None
        if self._aps is not None:
            self._aps.shutdown(wait=False)
            self._aps = None


def follow_polling(
    polling: PollingConfig, sched: PollScheduler, poller: Poller, gate: RequestGate
) -> None:
    """A reloaded config's polling settings, applied to the running pieces."""
    sched.max_in_flight = polling.max_concurrency
    poller.use_polling(polling)
    gate.set_rate(polling.max_requests_per_second)
