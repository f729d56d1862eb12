"""Several replicas on one PostgreSQL: which tasks this replica polls, and handing them over.

The store (`pgstore.PgStore`) owns the leases and the fenced writes; this module turns lease
changes into changes of the local watch list: a gained partition's unconfirmed events are
written again and its tasks start polling; a lost partition's tasks stop at once. A task
dropped for a lost race or a database error comes back with the next reconcile, reloaded
from the database, so nothing is emitted from stale memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from enkwatch import events as ev
from enkwatch.errors import StateUnavailable
from enkwatch.state.base import JournaledEvent, TaskRecord
from enkwatch.state.leases import DB_ERRORS
from enkwatch.state.postgres import PgStore
from enkwatch.watch import TaskWatch

RECONCILE_EVERY_S: Final = 30.0


class LocalWatchList(Protocol):
    """What the coordinator needs of the service."""

    tasks: dict[str, TaskWatch]

    def watch_for_record(self, record: TaskRecord) -> TaskWatch | None: ...

    def adopt(self, task: TaskWatch) -> None: ...

    def drop(self, task: TaskWatch) -> None: ...

    def replay(self, events: Iterable[JournaledEvent]) -> None: ...

    def log(self, name: str, level: str = ev.INFO, **fields: object) -> None: ...


class Coordinator:
    """Keeps the local watch list equal to the tasks of the partitions this replica holds."""

    def __init__(self, store: PgStore, local: LocalWatchList, monotonic: Callable[[], float]):
        self.store = store
        self.local = local
        self._monotonic = monotonic
        self._lock = asyncio.Lock()
        self._last_reconcile = float("-inf")
        self._unavailable = False
        self._pending_keys: set[str] = set()
        self.stopped = False
        self._jobs: set[asyncio.Task[None]] = set()

    async def tick(self) -> None:
        """The periodic job: balance leases, apply gains and losses, reconcile now and then."""
        if self.stopped:
            return
        async with self._lock:
            try:
                gained, lost = await self.store.leases.balance()
                self._drop_partitions(lost)
                reconcile = self._monotonic() - self._last_reconcile >= RECONCILE_EVERY_S
                if reconcile:
                    await self._load(self.store.leases.owned(), only_missing=True)
                    self._last_reconcile = self._monotonic()
                elif gained:
                    await self._load(gained, only_missing=False)
                if self._pending_keys:
                    await self._refresh(self._pending_keys)
                await self.store.refresh_outbox_stats()
            except (StateUnavailable, *DB_ERRORS) as err:
                self._state_trouble(err)
                return
            if self._unavailable:
                self._unavailable = False
                self.local.log(ev.STATE_RECOVERED, ev.INFO)

    def _state_trouble(self, err: BaseException) -> None:
        # the leases age out on their own (SAFE_S): polling stops if this lasts
        if not self._unavailable:
            self._unavailable = True
            self.local.log(
                ev.STATE_UNAVAILABLE,
                ev.WARNING,
                error=str(StateUnavailable(None, type(err).__name__)),
                retry_in_seconds=round(self.store.leases.renew_every_s, 3),
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
        mine = [k for k in keys if self.store.leases.usable(k)]
        keys.clear()
        if not mine:
            return
        parts = {self.store.leases.partition(k) for k in mine}
        records = await self.store.load_tasks(parts)
        for key in mine:
            current = self.local.tasks.get(key)
            if key not in records:
                if current is not None:
                    self.local.drop(current)
            elif current is None:
                task = self.local.watch_for_record(records[key])
                if task is not None:
                    self.local.adopt(task)

    def task_lost(self, task_key: str) -> None:
        """A poll found the task fenced or the database gone: it comes back on reconcile."""
        task = self.local.tasks.get(task_key)
        if task is not None:
            self.local.drop(task)
        self._last_reconcile = float("-inf")

    def _drop_partitions(self, lost: set[int]) -> None:
        if not lost:
            return
        for task in list(self.local.tasks.values()):
            if self.store.leases.partition(task.key) in lost:
                self.local.drop(task)

    async def _load(self, partitions: Iterable[int], only_missing: bool) -> None:
        parts = list(partitions)
        if not parts:
            return
        # first what a previous owner (or we, before a failure) committed but did not write
        present = set(self.local.tasks)
        unwritten = [
            e for e in await self.store.unwritten_events(parts) if e.task_key not in present
        ]
        self.local.replay(unwritten)
        for e in unwritten:
            await self.store.mark_written(e.task_key, e.seq)
        records = await self.store.load_tasks(parts)
        for key, record in records.items():
            if key in self.local.tasks and only_missing:
                continue
            if key in self.local.tasks:
                self.local.drop(self.local.tasks[key])
            task = self.local.watch_for_record(record)
            if task is not None:
                self.local.adopt(task)

    async def release(self) -> None:
        """SIGTERM: give every partition back at once."""
        self.stopped = True
        async with self._lock:
            try:
                await self.store.leases.release_all()
            except (StateUnavailable, *DB_ERRORS) as err:
                self._state_trouble(err)
