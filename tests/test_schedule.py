"""The heap scheduler: due times, admission control, pauses, and the APScheduler wake-up."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest

from enkwatch.clock import FakeClock, SystemClock
from enkwatch.config import PollingConfig, TaskConfig
from enkwatch.schedule import (
    DISPATCH_SLACK_S,
    ApschedulerWakeup,
    ClockStepGuard,
    ManualWakeup,
    PollScheduler,
    make_apscheduler,
)
from enkwatch.state.base import TaskRecord
from enkwatch.watch import DONE, PollResult, TaskWatch

POLLING = PollingConfig()


def make_task(name: str, deadline_s: float | None = None, started_at: float = 0.0) -> TaskWatch:
    cfg = TaskConfig(task_id=name, deadline_seconds=deadline_s)
    return TaskWatch.from_config(cfg, POLLING, TaskRecord(name, name, None, started_at))


class FakePolls:
    """Each poll waits until the test resolves it with a delay (or None, or an exception)."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[PollResult]] = {}
        self.started: list[str] = []
        self.expired: list[str] = []

    async def expire(self, task: TaskWatch) -> PollResult:
        self.expired.append(task.key)
        return DONE

    async def poll(self, task: TaskWatch) -> PollResult:
        fut: asyncio.Future[PollResult] = asyncio.get_running_loop().create_future()
        self.pending[task.key] = fut
        self.started.append(task.key)
        return await fut

    async def finish(self, key: str, delay: float | None) -> None:
        self.pending.pop(key).set_result(DONE if delay is None else delay)
        await settle()

    async def fail(self, key: str, exc: BaseException) -> None:
        self.pending.pop(key).set_exception(exc)
        await settle()


async def settle() -> None:
    # let done-callbacks and the polls they start run; no wall-clock time passes
    for _ in range(5):
        await asyncio.sleep(0)


class Rig:
    def __init__(self, max_in_flight: int = 2) -> None:
        self.clock = FakeClock()
        self.polls = FakePolls()
        self.done: list[str] = []
        self.crashes: list[BaseException] = []
        self.pause = 0.0
        self.wakeup = ManualWakeup()
        self.sched = PollScheduler(
            self.polls.poll,
            self.clock,
            max_in_flight,
            on_task_done=lambda t: self.done.append(t.key),
            on_crash=self.crashes.append,
            paused_for=lambda: self.pause,
            wakeup=lambda dispatch: self.wakeup,
            expire=self.polls.expire,
        )

    async def tick(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.wakeup.armed = None
        self.sched.dispatch()
        await settle()


async def test_nothing_starts_before_it_is_due() -> None:
    rig = Rig()
    now = rig.clock.monotonic()
    rig.sched.add(make_task("a"), due=now + 10)
    assert rig.wakeup.armed == now + 10
    await rig.tick(9)
    assert rig.polls.started == []
    await rig.tick(1)
    assert rig.polls.started == ["a"]


async def test_earliest_due_first() -> None:
    rig = Rig(max_in_flight=1)
    now = rig.clock.monotonic()
    for name, due in (("c", 3), ("a", 1), ("b", 2)):
        rig.sched.add(make_task(name), due=now + due)
    await rig.tick(5)
    for name in ("a", "b", "c"):
        assert rig.polls.started[-1] == name
        await rig.polls.finish(name, 100)
    assert rig.polls.started == ["a", "b", "c"]


async def test_slack_starts_polls_due_a_moment_later_together() -> None:
    rig = Rig(max_in_flight=10)
    now = rig.clock.monotonic()
    rig.sched.add(make_task("a"), due=now)
    rig.sched.add(make_task("b"), due=now + DISPATCH_SLACK_S / 2)
    rig.sched.add(make_task("c"), due=now + 1)
    await rig.tick()
    assert rig.polls.started == ["a", "b"]


async def test_tasks_removed_and_added_again_leave_a_bounded_heap() -> None:
    # lazy deletion leaves a stale entry per removal (a reload, the task API, the
    # benchmark's rescheduling): they are dropped once they are an eighth of the heap (and 256)
    rig = Rig(max_in_flight=10_000)
    now = rig.clock.monotonic()
    tasks = [make_task(f"t{i}") for i in range(2_000)]
    for task in tasks:
        rig.sched.add(task, due=now + 100)
    for task in tasks:
        rig.sched.remove(task)
        rig.sched.add(task, due=now + 50)
    for task in tasks[:500]:
        rig.sched.add(task, due=now + 40)  # added again while queued: its entry goes stale
    assert len(rig.sched) <= 2_400  # 4,500 entries without compaction
    await rig.tick(45)
    assert sorted(rig.polls.started) == sorted(t.key for t in tasks[:500])
    await rig.tick(10)
    assert sorted(rig.polls.started) == sorted(t.key for t in tasks)  # each once


async def test_admission_control_caps_in_flight_and_refills_at_once() -> None:
    rig = Rig(max_in_flight=2)
    for name in "abcde":
        rig.sched.add(make_task(name))
    await rig.tick()
    assert rig.polls.started == ["a", "b"]
    assert len(rig.sched.in_flight) == 2
    # a finished poll starts the next due task without waiting for a timer
    await rig.polls.finish("a", 30)
    assert rig.polls.started == ["a", "b", "c"]
    assert len(rig.sched.in_flight) == 2
    assert len(rig.sched) == 3  # d, e waiting as heap entries, a rescheduled


async def test_finished_poll_is_rescheduled_after_its_delay() -> None:
    rig = Rig()
    task = make_task("a")
    rig.sched.add(task)
    await rig.tick()
    await rig.polls.finish("a", 30)
    assert task.next_due == pytest.approx(rig.clock.monotonic() + 30)
    await rig.tick(29)
    assert rig.polls.started == ["a"]
    await rig.tick(1)
    assert rig.polls.started == ["a", "a"]


async def test_a_done_task_is_never_polled_again() -> None:
    rig = Rig()
    rig.sched.add(make_task("a"))
    await rig.tick()
    await rig.polls.finish("a", None)
    assert rig.done == ["a"]
    await rig.tick(3600)
    assert rig.polls.started == ["a"]
    assert len(rig.sched.in_flight) == 0


async def test_removed_task_is_not_started_and_in_flight_result_dropped() -> None:
    rig = Rig()
    a, b = make_task("a"), make_task("b")
    rig.sched.add(a)
    rig.sched.add(b, due=rig.clock.monotonic() + 5)
    await rig.tick()
    rig.sched.remove(a)  # in flight
    rig.sched.remove(b)  # queued
    await rig.polls.finish("a", 1)
    await rig.tick(10)
    assert rig.polls.started == ["a"]
    assert rig.done == []


async def test_pause_holds_every_task_and_arms_for_its_end() -> None:
    rig = Rig()
    rig.sched.add(make_task("a"))
    rig.pause = 7.0
    await rig.tick()
    assert rig.polls.started == []
    assert rig.wakeup.armed == pytest.approx(rig.clock.monotonic() + 7)
    rig.pause = 0.0
    await rig.tick(7)
    assert rig.polls.started == ["a"]


async def test_a_pause_never_holds_a_deadline() -> None:
    rig = Rig(max_in_flight=4)
    wall = rig.clock.now().timestamp()
    now = rig.clock.monotonic()
    soon = make_task("soon", deadline_s=5, started_at=wall)
    later = make_task("later", deadline_s=60, started_at=wall)
    free = make_task("free")
    for task in (soon, later, free):
        rig.sched.add(task, due=now + 1)
    rig.pause = 3600.0  # a Retry-After of an hour
    await rig.tick(1)
    assert rig.polls.started == [] and rig.polls.expired == []
    # each due task is held until the earlier of its deadline and the pause's end
    assert (soon.next_due, later.next_due, free.next_due) == (now + 5, now + 60, now + 3601)
    assert rig.wakeup.armed == now + 5
    await rig.tick(4)  # at the deadline: ended without a request, the pause still on
    assert rig.polls.expired == ["soon"] and rig.done == ["soon"]
    assert rig.polls.started == [] and rig.wakeup.armed == now + 60
    rig.pause = 0.0
    await rig.tick(55)  # the pause ended early: polling goes on as before
    assert rig.polls.started == ["later"] and rig.polls.expired == ["soon"]


async def test_a_deadline_is_anchored_once_on_the_monotonic_clock() -> None:
    rig = Rig()
    wall = rig.clock.now().timestamp()
    task = make_task("a", deadline_s=100, started_at=wall - 30)  # began 30 s ago
    rig.sched.add(task)
    assert task.deadline_at == pytest.approx(rig.clock.monotonic() + 70)
    rig.clock.set_wall(rig.clock.now() + timedelta(hours=2))  # a step: nothing moves
    rig.sched.add(task)
    assert task.deadline_at == pytest.approx(rig.clock.monotonic() + 70)


async def test_a_crashing_poll_is_reported_not_swallowed() -> None:
    rig = Rig()
    rig.sched.add(make_task("a"))
    await rig.tick()
    boom = RuntimeError("bug")
    await rig.polls.fail("a", boom)
    assert rig.crashes == [boom]


async def test_stop_starts_nothing_and_drain_cancels_stragglers() -> None:
    rig = Rig()
    rig.sched.add(make_task("a"))
    rig.sched.add(make_task("b"), due=rig.clock.monotonic() + 1)
    await rig.tick()
    rig.sched.stop()
    await rig.tick(5)
    assert rig.polls.started == ["a"]
    cancelled = await rig.sched.drain(0.01)
    assert cancelled == 1
    assert not rig.sched.in_flight


async def test_drain_waits_for_polls_that_finish() -> None:
    rig = Rig()
    rig.sched.add(make_task("a"))
    await rig.tick()
    rig.sched.stop()
    drain = asyncio.ensure_future(rig.sched.drain(30))
    await settle()
    await rig.polls.finish("a", 5)
    assert await drain == 0


async def test_apscheduler_wakeup_dispatches_at_the_armed_time() -> None:
    fired = asyncio.Event()
    clock = SystemClock()

    async def poll(task: TaskWatch) -> PollResult:
        fired.set()
        return DONE

    aps = make_apscheduler()
    aps.start()
    try:
        sched = PollScheduler(
            poll,
            clock,
            4,
            on_task_done=lambda t: None,
            on_crash=lambda e: None,
            wakeup=lambda dispatch: ApschedulerWakeup(aps, dispatch, clock),
        )
        await asyncio.sleep(0)  # let the first heartbeat tick find an empty heap
        sched.add(make_task("a"), due=clock.monotonic() + 0.05)
        await asyncio.wait_for(fired.wait(), timeout=5)
        jobs: list[Any] = aps.get_jobs()
        assert [j.id for j in jobs] == ["enkwatch-dispatch"]  # one job, however many tasks
    finally:
        aps.shutdown(wait=False)


@pytest.mark.parametrize("step_s", [-7200.0, 7200.0])
async def test_a_wall_clock_step_rebases_every_job_on_the_new_wall_time(step_s: float) -> None:
    clock = FakeClock()
    aps = make_apscheduler()
    aps.start()
    try:
        job = aps.add_job(_nothing, "interval", seconds=30, id="housekeeping")
        steps: list[float] = []
        guard = ClockStepGuard(aps, clock, steps.append)
        clock.advance(0.5)
        assert guard.check() == 0.0  # both clocks moved alike: no step
        clock.set_wall(clock.now() + timedelta(seconds=step_s))
        assert guard.check() == pytest.approx(step_s)
        assert steps == [pytest.approx(step_s)]
        # runs at once, then every 30 s on the new wall clock (not after the step's length)
        assert job.next_run_time == clock.now()
        assert guard.check() == 0.0  # reported once
    finally:
        aps.shutdown(wait=False)


async def _nothing() -> None:
    return None


async def test_apscheduler_noise_by_design_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    make_apscheduler()
    caplog.set_level(logging.WARNING)
    skipped = 'Execution of job "tick" skipped: maximum number of running instances reached (1)'
    logging.getLogger("apscheduler.scheduler").warning(skipped)
    try:
        raise asyncio.CancelledError
    except asyncio.CancelledError:
        logging.getLogger("apscheduler.executors.default").exception("Error running job tick")
    logging.getLogger("apscheduler.scheduler").warning("a real problem")
    assert [r.getMessage() for r in caplog.records] == ["a real problem"]
