"""Who may poll what: one role, chosen once at assembly.

* `SoleOwner`: one process on a SQLite state polls every task of its watch list.
* `PartitionOwner`: replicas on one PostgreSQL share the watch list; the lease protocol
  (`state.leases`) decides which partitions this replica polls. Lease changes become
  changes of the local watch list: a gained partition's unconfirmed events are written
  again and its tasks start polling; a lost partition's tasks stop at once. A task dropped
  for a lost race or a database error comes back with the next reconcile, reloaded from
  the database, so nothing is emitted from stale memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol

from enkwatch import events as ev
from enkwatch.clock import Clock
from enkwatch.errors import ConfigError, StateNotWritten, StateUnavailable
from enkwatch.events import EventWriter
from enkwatch.state.base import Store, TaskRecord
from enkwatch.state.leases import DB_ERRORS
from enkwatch.state.postgres import PgStore
from enkwatch.state.sqlite import SqliteStore
from enkwatch.watch import SOURCE_DISCOVERED, STATE_RETRY_MIN_S, TaskWatch

RECONCILE_EVERY_S: Final = 30.0
SOURCE_API: Final = "api"


class LocalWatchList(Protocol):
    """What an owner needs of the watch list (`watchlist.WatchList`)."""

    tasks: dict[str, TaskWatch]

    def watch_for_record(self, record: TaskRecord) -> TaskWatch | None: ...

    def adopt(self, task: TaskWatch) -> None: ...

    def drop(self, task: TaskWatch) -> None: ...

    async def load_all(self, records: dict[str, TaskRecord]) -> None: ...

    async def register_config(self) -> None: ...


class Periodic(Protocol):
    """Where an owner registers its periodic job (`schedule.Timers`)."""

    def every(self, seconds: float, job: Callable[[], Any], name: str) -> None: ...


class Owner(Protocol):
    """The role: may_poll (None: every task is ours), lost, stats, load/start/stop, and
    the few watch-list operations whose meaning depends on who shares the list."""

    @property
    def may_poll(self) -> Callable[[str], bool] | None: ...

    @property
    def keeps_config(self) -> bool: ...

    async def load(self, local: LocalWatchList) -> None: ...

    async def start(self, timers: Periodic) -> None: ...

    async def stop(self) -> None: ...

    def lost(self, task_key: str) -> None: ...

    def stats(self) -> dict[str, float] | None: ...

    def admit(self, task: TaskWatch) -> None: ...

    async def watches(self, task_key: str) -> bool: ...

    async def forget(self, task_key: str, task: TaskWatch | None) -> None: ...

    async def listing(self) -> Sequence[tuple[TaskWatch, bool | None]]: ...


class SoleOwner:
    """One process, every task: the local watch list is the whole watch list."""

    may_poll: Callable[[str], bool] | None = None
    # the config's entries are dropped once the watches are built (memory at 100,000 tasks)
    keeps_config = False

    def __init__(self, store: Store, writer: EventWriter) -> None:
        self._store = store
        self._writer = writer
        self._local: LocalWatchList | None = None
        if isinstance(store, SqliteStore):
            store.on_availability = self.availability

    def availability(self, trouble: str | None) -> None:
        """The local state refused a write (`trouble`: why), or took one again (None).

        Nothing is lost meanwhile: a refused event is rolled back and its poll tried again
        (with backoff); the change it reported is emitted once the state takes writes.
        """
        if trouble is not None:
            self._writer.daemon_event(
                ev.STATE_UNAVAILABLE,
                ev.WARNING,
                error=str(StateUnavailable(None, trouble)),
                retry_in_seconds=STATE_RETRY_MIN_S,
            )
        else:
            self._writer.daemon_event(ev.STATE_RECOVERED, ev.INFO)

    async def load(self, local: LocalWatchList) -> None:
        """Write again what was journaled but not confirmed; then load every stored task.

        A state that refuses writes at start (disk full) stops the start: nothing was polled.
        """
        self._local = local
        try:
            # each is confirmed once its line was written
            await self._writer.replay(await self._store.unwritten_events())
            await local.load_all(await self._store.load_tasks())
        except StateNotWritten as err:
            raise ConfigError([f"state.path: {err}"]) from None

    async def start(self, timers: Periodic) -> None:
        return None

    async def stop(self) -> None:
        return None

    def lost(self, task_key: str) -> None:
        if self._local is not None and (task := self._local.tasks.get(task_key)) is not None:
            self._local.drop(task)

    def stats(self) -> dict[str, float] | None:
        return None

    def admit(self, task: TaskWatch) -> None:
        if self._local is not None:
            self._local.adopt(task)

    async def watches(self, task_key: str) -> bool:
        return self._local is not None and task_key in self._local.tasks

    async def forget(self, task_key: str, task: TaskWatch | None) -> None:
        if task is not None and task.source in (SOURCE_API, SOURCE_DISCOVERED):
            await self._store.set_task_spec(task_key, None)

    async def listing(self) -> Sequence[tuple[TaskWatch, bool | None]]:
        tasks = self._local.tasks.values() if self._local is not None else ()
        return [(t, None) for t in tasks]


class PartitionOwner:
    """Keeps the local watch list equal to the tasks of the partitions this replica holds."""

    keeps_config = True

    def __init__(
        self,
        store: PgStore,
        writer: EventWriter,
        clock: Clock,
        wake_outbox: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        # the outbox waits to be woken when idle: rows of a partition gained from another
        # replica (or left while the database was down) are found by the lease loop
        self._wake_outbox = wake_outbox
        self.leases = store.leases
        self.may_poll = self.leases.usable
        self._writer = writer
        self._clock = clock
        self._local: LocalWatchList | None = None
        self._lock = asyncio.Lock()
        self._last_reconcile = float("-inf")
        self._unavailable = False
        self._pending_keys: set[str] = set()
        self.stopped = False
        self._jobs: set[asyncio.Task[None]] = set()

    # -- the role ----------------------------------------------------------------------------

    async def load(self, local: LocalWatchList) -> None:
        """The config's tasks get their rows (idempotent); the leases decide the rest."""
        self._local = local
        await local.register_config()

    async def start(self, timers: Periodic) -> None:
        await self.tick()
        timers.every(self.leases.renew_every_s, self.tick, "leases")
        await self.store.listen(self.notified)

    async def stop(self) -> None:
        """SIGTERM: give every partition back at once."""
        self.stopped = True
        async with self._lock:
            try:
                await self.leases.release_all()
            except (StateUnavailable, *DB_ERRORS) as err:
                self._state_trouble(err)

    def lost(self, task_key: str) -> None:
        """A poll found the task fenced or the database gone: it comes back on reconcile."""
        if self._local is not None and (task := self._local.tasks.get(task_key)) is not None:
            self._local.drop(task)
        self._last_reconcile = float("-inf")

    def stats(self) -> dict[str, float] | None:
        return {
            **self.leases.stats(),
            "fenced": self.store.fenced,
            "conflicts": self.store.conflicts,
            "commits": self.store.commits + self.leases.commits,
        }

    def admit(self, task: TaskWatch) -> None:
        self.notified(task.key)  # whichever replica holds its partition polls it

    async def watches(self, task_key: str) -> bool:
        return (self._local is not None and task_key in self._local.tasks) or (
            await self.store.load_task(task_key) is not None
        )

    async def forget(self, task_key: str, task: TaskWatch | None) -> None:
        await self.store.set_task_spec(task_key, None)  # removed for every replica

    async def listing(self) -> Sequence[tuple[TaskWatch, bool | None]]:
        """The whole shared watch list; live details for the tasks polled here."""
        assert self._local is not None
        out = []
        for key, record in sorted((await self.store.load_tasks()).items()):
            local = self._local.tasks.get(key)
            task = local or self._local.watch_for_record(record)
            if task is not None:
                out.append((task, local is not None))
        return out

    # -- the lease loop ----------------------------------------------------------------------

    async def tick(self) -> None:
        """The periodic job: balance leases, apply gains and losses, reconcile now and then."""
        if self.stopped:
            return
        async with self._lock:
            try:
                gained, lost = await self.leases.balance()
                self._drop_partitions(lost)
                reconcile = self._clock.monotonic() - self._last_reconcile >= RECONCILE_EVERY_S
                if reconcile:
                    await self._load(self.leases.owned(), only_missing=True)
                    self._last_reconcile = self._clock.monotonic()
                elif gained:
                    await self._load(gained, only_missing=False)
                if self._pending_keys:
                    await self._refresh(self._pending_keys)
                await self.store.refresh_outbox_stats()
                if self.store.outbox_stats()[0]:
                    self._wake_outbox()
            except (StateUnavailable, *DB_ERRORS) as err:
                self._state_trouble(err)
                return
            if self._unavailable:
                self._unavailable = False
                self._writer.daemon_event(ev.STATE_RECOVERED, ev.INFO)

    def _state_trouble(self, err: BaseException) -> None:
        # the leases age out on their own (safe_s): polling stops if this lasts
        if not self._unavailable:
            self._unavailable = True
            self._writer.daemon_event(
                ev.STATE_UNAVAILABLE,
                ev.WARNING,
                error=str(StateUnavailable(None, type(err).__name__)),
                retry_in_seconds=round(self.leases.renew_every_s, 3),
            )

    def notified(self, task_key: str) -> None:
        """Another replica changed this task in the shared watch list (a hint)."""
        self._pending_keys.add(task_key)
        job = asyncio.ensure_future(self._refresh_soon())
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _refresh_soon(self) -> None:
        async with self._lock:
            if self.stopped or not self._pending_keys:
                return
            try:
                await self._refresh(self._pending_keys)
            except (StateUnavailable, *DB_ERRORS) as err:
                self._state_trouble(err)

    async def _refresh(self, keys: set[str]) -> None:
        local = self._local
        mine = [k for k in keys if self.leases.usable(k)]
        keys.clear()
        if not mine or local is None:
            return
        records = await self.store.load_tasks({self.leases.partition(k) for k in mine})
        for key in mine:
            current = local.tasks.get(key)
            if key not in records:
                if current is not None:
                    local.drop(current)
                continue
            if current is not None and current.done and records[key].outcome is None:
                local.drop(current)  # forgotten (`enkwatch forget`): watched again, as new
                current = None
            if current is None and (task := local.watch_for_record(records[key])) is not None:
                local.adopt(task)

    def _drop_partitions(self, lost: set[int]) -> None:
        if not lost or self._local is None:
            return
        for task in list(self._local.tasks.values()):
            if self.leases.partition(task.key) in lost:
                self._local.drop(task)

    async def _load(self, partitions: Iterable[int], only_missing: bool) -> None:
        parts = list(partitions)
        local = self._local
        if not parts or local is None:
            return
        # first what a previous owner (or we, before a failure) committed but did not write
        unwritten = [
            e for e in await self.store.unwritten_events(parts) if e.task_key not in local.tasks
        ]
        await self._writer.replay(unwritten)  # each confirmed once its line was written
        for key, record in (await self.store.load_tasks(parts)).items():
            if key in local.tasks:
                if only_missing:
                    continue
                local.drop(local.tasks[key])
            if (task := local.watch_for_record(record)) is not None:
                local.adopt(task)


def choose_owner(
    store: Store, writer: EventWriter, clock: Clock, wake_outbox: Callable[[], None] = lambda: None
) -> Owner:
    """The role for this state: partitions on a shared PostgreSQL, else the sole owner."""
    if isinstance(store, PgStore):
        return PartitionOwner(store, writer, clock, wake_outbox)
    return SoleOwner(store, writer)
