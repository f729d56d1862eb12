"""PostgreSQL group commit: the events of polls that end close together, in one transaction.

Each event is still fenced on its own: the transaction takes a `FOR SHARE` lock on the lease
rows of every partition in the batch (a claimer's `FOR UPDATE SKIP LOCKED` cannot take them
meanwhile) and compares each event's epoch with its partition's; each task's state is
compare-and-set on its `seq`. An event whose partition was fenced, or whose task another
writer moved, is left out of the transaction (its caller gets `LeaseLost`) while the others
commit: one commit, and one WAL flush, for many polls. A database failure fails every event
of the batch (`StateUnavailable`): none of it was committed, or the commit's answer was lost
(the caller drops the task and a later claim reloads and replays it), as with one event.

The window follows SQLite's (`state/sqlite.py`): while events come more often than one per
window, a batch is committed `commit_delay_s` after its first event, or at once when it holds
half the polls that may run at once; rare events commit at the end of the loop's turn.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Final, Protocol

import asyncpg

from enkwatch.clock import Clock
from enkwatch.errors import LeaseLost, StateUnavailable
from enkwatch.models import TASK_TRANSITION
from enkwatch.state.base import STATE_FIELDS, TaskRecord, state_values
from enkwatch.state.leases import DB_ERRORS, describe_db_error

COMMIT_DELAY_S: Final = 0.05
COMMIT_BATCH_MAX: Final = 256

# an event's state change, compare-and-set on seq: $1 = task_key, then STATE_FIELDS, then seq-1
UPDATE_STATE: Final = (
    "UPDATE enkwatch_tasks SET "
    + ", ".join(f"{c} = ${i}" for i, c in enumerate(STATE_FIELDS, start=2))
    + f" WHERE task_key = $1 AND seq = ${len(STATE_FIELDS) + 2} RETURNING seq"
)
_HELD: Final = (
    "SELECT partition, epoch FROM enkwatch_partition_lease WHERE partition = ANY($1::int[]) "
    "AND owner = $2 AND expires_at > now() ORDER BY partition FOR SHARE"
)
_INSERT_EVENT: Final = (
    "INSERT INTO enkwatch_events (task_key, seq, partition, status, body, replica, epoch) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
_INSERT_DELIVERY: Final = (
    "INSERT INTO enkwatch_outbox (sink, task_key, partition, body, created_at, "
    "next_attempt_at) VALUES ($1, $2, $3, $4, $5, $5)"
)


class Journal(Protocol):
    """What the group commit needs of the store."""

    replica_id: str
    fenced: int
    conflicts: int
    commits: int

    @property
    def pool(self) -> asyncpg.Pool: ...

    def committed(self, task_key: str, seq: int, event: Mapping[str, Any]) -> None: ...


class Staged:
    """One event waiting for its batch: the values as they were when it was recorded."""

    __slots__ = ("body", "done", "epoch", "event", "key", "partition", "seq", "sinks", "state")

    def __init__(
        self,
        record: TaskRecord,
        event: Mapping[str, Any],
        body: str,
        partition: int,
        epoch: int,
        sinks: Sequence[str],
    ) -> None:
        self.key = record.task_key
        self.seq = record.seq
        self.state = state_values(record)
        self.event = event
        self.body = body
        self.partition = partition
        self.epoch = epoch
        self.sinks = sinks
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class GroupCommit:
    """Batches of fenced events, one transaction each (see the module's docstring)."""

    def __init__(
        self, journal: Journal, clock: Clock, commit_delay_s: float = COMMIT_DELAY_S
    ) -> None:
        self._journal = journal
        self._clock = clock
        self.commit_delay_s = commit_delay_s
        self.batch_max = COMMIT_BATCH_MAX
        self._open: list[Staged] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_commit = float("-inf")
        self._commits: set[asyncio.Task[None]] = set()

    async def record(self, staged: Staged) -> None:
        """Add an event to the open batch; returns once it committed (or raises)."""
        loop = asyncio.get_running_loop()
        if self._open is None:
            self._open = []
            delay = self.commit_delay_s
            if delay > 0 and loop.time() - self._last_commit < delay:
                self._timer = loop.call_later(delay, self._flush)
            else:
                loop.call_soon(self._flush)
        self._open.append(staged)
        if len(self._open) >= self.batch_max and self._timer is not None:
            self._timer.cancel()  # full: committed at the end of this turn
            self._timer = None
            loop.call_soon(self._flush)
        await staged.done

    def commit_now(self) -> None:
        """Shutdown: the open batch is committed at the end of this turn, and every later
        one too (no commit window)."""
        self.commit_delay_s = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            asyncio.get_running_loop().call_soon(self._flush)

    def concurrent_writers(self, count: int) -> None:
        """Batches are committed at once when they hold half the polls that may run."""
        self.batch_max = max(1, min(COMMIT_BATCH_MAX, count // 2))

    async def close(self) -> None:
        """Commit what is open and wait for the commits under way."""
        self.commit_now()
        self._flush()
        while self._commits:
            await asyncio.gather(*self._commits, return_exceptions=True)

    def _flush(self) -> None:
        batch, self._open = self._open, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not batch:
            return
        with contextlib.suppress(RuntimeError):
            self._last_commit = asyncio.get_running_loop().time()
        job = asyncio.ensure_future(self._commit(batch))
        self._commits.add(job)
        job.add_done_callback(self._commits.discard)

    async def _commit(self, batch: list[Staged]) -> None:
        journal = self._journal
        try:
            async with journal.pool.acquire() as conn, conn.transaction():
                outcomes = await self._write(conn, batch)
        except DB_ERRORS as err:
            why = describe_db_error(err)
            _settle(batch, [StateUnavailable(s.key, why) for s in batch])
            return
        except asyncio.CancelledError:  # the loop is closing: committed or not, unknown
            _settle(batch, [StateUnavailable(s.key, "the commit was cut short") for s in batch])
            raise
        except Exception as err:  # noqa: BLE001 - a bug: each caller raises it (crash handler)
            _settle(batch, [err] * len(batch))
            return
        journal.commits += 1
        for staged, outcome in zip(batch, outcomes, strict=True):
            if outcome is None:
                journal.committed(staged.key, staged.seq, staged.event)
        _settle(batch, outcomes)

    async def _write(
        self, conn: asyncpg.Connection, batch: list[Staged]
    ) -> list[BaseException | None]:
        """Inside the transaction: each event fenced and compare-and-set; the rest inserted."""
        journal = self._journal
        parts = sorted({s.partition for s in batch})
        rows = await conn.fetch(_HELD, parts, journal.replica_id)
        held = {r["partition"]: r["epoch"] for r in rows}
        outcomes: list[BaseException | None] = []
        ok: list[Staged] = []
        for s in batch:
            if held.get(s.partition) != s.epoch:
                journal.fenced += 1
                outcomes.append(LeaseLost(s.key, "the partition's lease was lost (fenced)"))
            elif await conn.fetchval(UPDATE_STATE, s.key, *s.state, s.seq - 1) is None:
                journal.conflicts += 1
                outcomes.append(LeaseLost(s.key, "another writer moved the task's seq (lost race)"))
            else:
                outcomes.append(None)
                ok.append(s)
        if ok:
            rid = journal.replica_id
            await conn.executemany(
                _INSERT_EVENT,
                [(s.key, s.seq, s.partition, status_of(s.event), s.body, rid, s.epoch) for s in ok],
            )
            now = self._clock.now().timestamp()
            rows = [(k, s.key, s.partition, s.body.encode(), now) for s in ok for k in s.sinks]
            if rows:
                await conn.executemany(_INSERT_DELIVERY, rows)
        return outcomes


def _settle(batch: Sequence[Staged], outcomes: Sequence[BaseException | None]) -> None:
    for staged, outcome in zip(batch, outcomes, strict=True):
        if staged.done.done():
            continue  # its caller was cancelled: the outcome is the journal's alone
        if outcome is None:
            staged.done.set_result(None)
        else:
            staged.done.set_exception(outcome)


def status_of(event: Mapping[str, Any]) -> str | None:
    """The status column of a journaled event: a transition's new status."""
    return event.get("status") if event.get("event") == TASK_TRANSITION else None
