"""The set of watched tasks: loading, the reload diff, and the task API's backend.

One interface (`adopt`, `drop`, `add_task`, `remove_task`, `list_tasks`, `reload`) serves
the admin app, config reloads and the replica owner alike; what depends on who shares the
list is asked of the owner (`ownership`), chosen once at assembly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from enkwatch import events as ev
from enkwatch.admin import TaskExists, TaskNotEnded
from enkwatch.clock import Clock
from enkwatch.config import Config, TaskConfig, load_config, task_key, validate_task_entry
from enkwatch.errors import ConfigError, StateUnavailable
from enkwatch.events import EventWriter
from enkwatch.kinds import KINDS
from enkwatch.models import ListedJob, Observation
from enkwatch.ownership import SOURCE_API, Owner
from enkwatch.schedule import PollScheduler
from enkwatch.sinks import Sink, build_sinks, sink_secrets
from enkwatch.state.base import TaskRecord, TaskState, reset_record
from enkwatch.watch import NEVER, NO_LABELS, SOURCE_DISCOVERED, Listing, TaskWatch

SOURCE_CONFIG: Final = "config"
RESTART_SECTIONS: Final = ("api", "state", "admin")
# poll counts are checkpointed in chunks that each block the loop for a few milliseconds at
# most, even at 100,000 tasks
CHECKPOINT_CHUNK: Final = 1000
# GET /tasks describes this many tasks between two turns of the loop (a few ms)
LISTING_CHUNK: Final = 500


def file_signature(path: str) -> tuple[int, int, int, int, str] | None:
    """What changes when a config file is edited or swapped (also a ConfigMap symlink swap)."""
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_dev, st.st_size, real)


class WatchList:
    """The watched tasks of this process, and every change to them."""

    def __init__(
        self,
        config: Config,
        store: TaskState,
        owner: Owner,
        scheduler: PollScheduler,
        writer: EventWriter,
        clock: Clock,
        config_path: str | None = None,
        on_change: Callable[[], None] = lambda: None,
        on_polling: Callable[[Config], None] = lambda config: None,
        on_sinks: Callable[[Sequence[Sink]], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self._store = store
        self._owner = owner
        self._scheduler = scheduler
        self._writer = writer
        self._clock = clock
        self.config_path = config_path
        self._config_sig = file_signature(config_path) if config_path else None
        # a task ended or left: the service checks whether everything is done
        self._on_change = on_change
        # the polling section changed: the limits shared by all tasks follow it
        self._on_polling = on_polling
        # the sinks section changed: the outbox takes the new sinks (their secrets resolved)
        self._on_sinks = on_sinks
        self.tasks: dict[str, TaskWatch] = {}
        self._config_tasks: dict[str, TaskConfig] = {t.key: t for t in config.tasks}
        self._config_keys: set[str] = set(self._config_tasks)
        self.stopped = False
        # since when each task has its status, from the journal: read once, when first asked
        # (a transition seen by this process is in the task itself)
        self._status_times: dict[str, str] | None = None
        # `discover:` entries whose first sweep has not ended: the list is not complete yet
        self.sweeps_pending: set[int] = set(range(len(config.discover)))
        # the kinds whose list pages the sweeps read (the `discover:` entries at start: the
        # sweeps do not follow reloads)
        self._swept_kinds = frozenset(entry.kind for entry in config.discover)

    # -- loading -----------------------------------------------------------------------------

    async def load_all(self, records: dict[str, TaskRecord]) -> None:
        """The config's tasks (new ones stored, in one transaction) and those added by API."""
        now = self._clock.now().timestamp()
        new: list[TaskRecord] = []
        # each entry's key once (made from its kind and fields: 0.1 s at 100,000 each time)
        for key, cfg in self._config_tasks.items():
            record = records.get(key)
            if record is None:
                record = TaskRecord(key, cfg.ident, cfg.name, watch_started_at=now)
                new.append(record)
            self.tasks[key] = self._watch(cfg, record, SOURCE_CONFIG, key)
        await self._store.add_tasks(new)
        # tasks added through the admin API survive restarts
        for key, record in records.items():
            if key not in self.tasks and (task := self.watch_for_record(record)) is not None:
                self.tasks[key] = task
        self._settle_config()

    async def register_config(self) -> None:
        """Make sure every task of our config has its row (idempotent)."""
        now = self._clock.now().timestamp()
        await self._store.add_tasks(
            [TaskRecord(c.key, c.ident, c.name, now) for c in self._config_tasks.values()]
        )

    def _settle_config(self) -> None:
        # a sole owner forgets the entries once its watches are built (at 100,000 tasks the
        # pydantic models would be half of its memory); replicas build watches from them later
        if not self._owner.keeps_config:
            self._config_tasks = {}
            self.config = self.config.model_copy(update={"tasks": []})

    def _watch(
        self, cfg: TaskConfig, record: TaskRecord, source: str, key: str | None = None
    ) -> TaskWatch:
        task = TaskWatch.from_config(cfg, self.config.polling, record, source, key)
        if cfg.kind in self._swept_kinds:
            # its own answers are recorded from the start: a list read before one is not used
            task.listing = Listing()
        return task

    def watch_for_record(self, record: TaskRecord) -> TaskWatch | None:
        """The watch of a stored task: from our config, else from its API spec; else None."""
        cfg = self._config_tasks.get(record.task_key)
        if cfg is not None:
            return self._watch(cfg, record, SOURCE_CONFIG)
        if record.spec is None:
            return None
        spec = dict(record.spec)
        source = SOURCE_DISCOVERED if spec.pop("source", None) == SOURCE_DISCOVERED else SOURCE_API
        try:
            cfg = validate_task_entry(spec)
        except ConfigError:
            return None
        return self._watch(cfg, record, source)

    async def _watch_for(
        self, cfg: TaskConfig, source: str, record: TaskRecord | None
    ) -> TaskWatch:
        if record is None:
            now = self._clock.now().timestamp()
            record = TaskRecord(cfg.key, cfg.ident, cfg.name, watch_started_at=now)
            await self._store.add_task(record)
        return self._watch(cfg, record, source)

    # -- watching ----------------------------------------------------------------------------

    def adopt(self, task: TaskWatch) -> None:
        """Start watching a task (polled at once unless done)."""
        self.tasks[task.key] = task
        if not task.done and not self.stopped:
            self._scheduler.add(task)

    def drop(self, task: TaskWatch) -> None:
        """Stop watching a task here."""
        self.tasks.pop(task.key, None)
        self._scheduler.remove(task)

    def all_done(self) -> bool:
        """Every task ended, and every `discover:` entry swept once (`--exit-when-done`: with
        only `discover:`, an empty list before the first sweep is not "all done")."""
        return not self.sweeps_pending and all(t.done for t in self.tasks.values())

    def swept(self, entry: int) -> None:
        """Discovery's first sweep of `discover:` entry `entry` ended."""
        if entry in self.sweeps_pending:
            self.sweeps_pending.discard(entry)
            self._on_change()

    def outcomes(self) -> dict[str, int]:
        """How many tasks finished, failed, and were given up."""
        done = self.tasks.values()
        return {
            "finished": sum(1 for t in done if t.finished),
            "failed": sum(1 for t in done if t.failed),
            "gave_up": sum(1 for t in done if t.gave_up),
        }

    async def checkpoint(self) -> None:
        """The periodic job: store the poll counts, in chunks that let due polls start."""
        counts = [(t.key, t.record.polls) for t in self.tasks.values()]
        for start in range(0, len(counts), CHECKPOINT_CHUNK):
            # poll counts are statistics: if the store is down, the next checkpoint has them
            with contextlib.suppress(StateUnavailable):
                await self._store.checkpoint_polls(counts[start : start + CHECKPOINT_CHUNK])
            await asyncio.sleep(0)

    def start_polling(self) -> None:
        self._scheduler.add_many(t for t in self.tasks.values() if not t.done)

    # -- the task API ------------------------------------------------------------------------

    async def list_tasks(self) -> list[dict[str, Any]]:
        """Every watched task as GET /tasks shows it; the loop runs between chunks."""
        await self._load_status_times()
        out = []
        for n, (task, polled_here) in enumerate(await self._owner.listing(), start=1):
            item = self.describe(task)
            if polled_here is not None:
                item["polled_here"] = polled_here
            out.append(item)
            if n % LISTING_CHUNK == 0:
                await asyncio.sleep(0)  # /healthz and due polls go first
        return out

    async def get_task(self, task_key: str) -> dict[str, Any] | None:
        """One task as GET /tasks shows it; None if it is not watched."""
        await self._load_status_times()
        task = self.tasks.get(task_key)
        if task is not None:
            return self.describe(task)
        for other, polled_here in await self._owner.listing():
            if other.key == task_key:
                return {**self.describe(other), "polled_here": polled_here}
        return None

    async def forget_task(self, task_key: str) -> dict[str, Any] | None:
        """`forget`: a task that ended (terminal or given up) is watched again, as new: its
        status, outcome, poll count and deadline start over; its seq goes on. None if the
        state does not know it; TaskNotEnded if it is still being watched."""
        task = self.tasks.get(task_key)
        if task is not None and not task.done:
            raise TaskNotEnded(f"the task {task_key} has not ended: it is still watched")
        now = self._clock.now().timestamp()
        if not await self._store.reset_task(task_key, now):
            if task is None and await self._store.load_task(task_key) is None:
                return None
            raise TaskNotEnded(f"the task {task_key} has not ended: it is still watched")
        if self._status_times is not None:
            self._status_times.pop(task_key, None)
        if task is None:
            return {"task_key": task_key, "watched": await self._owner.watches(task_key)}
        reset_record(task.record, now)
        task.failures = task.not_found = 0
        task.last_error, task.status_since = None, None
        if not self.stopped:
            self._scheduler.add(task)
        return {**self.describe(task), "watched": True}

    async def _load_status_times(self) -> None:
        if self._status_times is None:
            with contextlib.suppress(StateUnavailable):  # asked again next time
                self._status_times = await self._store.status_times()

    async def add_task(self, entry: object) -> dict[str, Any]:
        cfg = validate_task_entry(entry)
        if await self._owner.watches(cfg.key):
            raise TaskExists(f"the task {cfg.key} is already watched")
        # one keyed lookup: a task watched before keeps its seq and last status
        spec = cfg.model_dump(mode="json", exclude_none=True)
        task = await self._watch_for(cfg, SOURCE_API, await self._store.load_task(cfg.key))
        await self._store.set_task_spec(cfg.key, spec)
        task.record.spec = spec
        self._owner.admit(task)
        return self.describe(task)

    async def known_keys(self) -> set[str]:
        """Every task key stored or watched here, also ended and removed ones (discovery)."""
        return set(await self._store.load_tasks()) | set(self.tasks)

    async def discover(self, entry: dict[str, Any], job: object = None) -> bool:
        """Watch a job found by discovery, as if added through the API; False if not new.

        Stored once (an insert if absent: with replicas, whichever sweeps adds it once);
        `task.discovered` is its first event, written by whoever polls it first.
        """
        try:
            cfg = validate_task_entry(entry)
        except ConfigError:
            return False  # a name from the API that cannot travel in a header
        if cfg.key in self.tasks or self.stopped:
            return False
        spec = {**cfg.model_dump(mode="json", exclude_none=True), "source": SOURCE_DISCOVERED}
        now = self._clock.now().timestamp()
        record = TaskRecord(cfg.key, cfg.ident, cfg.name, watch_started_at=now, spec=spec)
        await self._store.add_task(record)
        self._owner.admit(self._watch(cfg, record, SOURCE_DISCOVERED))
        return True

    def monotonic(self) -> float:
        """The clock of poll answers: a list read is ordered against them on it."""
        return self._clock.monotonic()

    def listed(
        self, kind: str, jobs: Iterable[ListedJob], requested_mono: float, covered_s: float = 0.0
    ) -> int:
        """A list answer (one status list, every page, first requested at `requested_mono`)
        as an observation of every watched job it names; the next poll of such a job uses
        it instead of a request (watch.Poller), so every rule of a poll holds. A job the
        list does not name is polled on its own (a dataset that left the lists: confirmed
        with one get-task). A dataset list names datasets: it says nothing of a dataset
        task watched by its task_id (its name may be another task's now). A job named is
        covered by the sweeps for `covered_s` (also a dataset not answered yet: once it is,
        its polls need no request): a poll that finds no newer list sends no request
        before then. Returns how many watched jobs it named."""
        named = 0
        for job in jobs:
            task = self.tasks.get(task_key(kind, job.task_id, job.name))
            if task is None and job.task_id is not None:
                task = self.tasks.get(task_key(kind, None, job.name))
            if task is None or task.done:
                continue
            listing = task.listed_here()
            listing.listed_until = requested_mono + covered_s
            obs = job.observation or listed_observation(task, job)
            if obs is not None:
                listing.listed, listing.listed_mono = obs, requested_mono
                named += 1
        return named

    def unlisted(self, kind: str, since: float) -> None:
        """A sweep that began at `since` read every list of its entry: a job it did not name
        is no longer observed through an older list (its next poll asks the API)."""
        for task in self.tasks.values():
            if (
                (listing := task.listing) is not None
                and listing.listed_mono < since
                and (listing.listed is not None or listing.listed_until > since)
                and task.kind.name == kind
            ):
                listing.listed, listing.listed_until = None, NEVER

    async def remove_task(self, task_key: str) -> bool:
        if not await self._owner.watches(task_key):
            return False
        task = self.tasks.get(task_key)
        if task is not None:
            self.drop(task)
        await self._owner.forget(task_key, task)
        self._on_change()
        return True

    def describe(self, task: TaskWatch) -> dict[str, Any]:
        """A task as GET /tasks shows it."""
        rec = task.record
        next_poll = None
        if task.next_due is not None:
            delta = task.next_due - self._clock.monotonic()
            next_poll = ev.rfc3339(self._clock.now() + timedelta(seconds=delta))
        since: str | None = None
        if task.status_since is not None:
            since = ev.rfc3339(datetime.fromtimestamp(task.status_since, UTC))
        elif rec.last_status is not None and self._status_times is not None:
            since = self._status_times.get(task.key)
        ident = task.task_id if task.task_id is not None else rec.seen_task_id
        name = task.dataset if task.dataset is not None else rec.seen_dataset
        return {
            "task_key": task.key,
            "kind": task.kind.name,
            **task.kind.identity(ident, name),
            "labels": task.labels,
            "source": task.source,
            "status": rec.last_status,
            "status_since": since,
            "unknown_status": rec.last_unknown_status,
            "outcome": rec.outcome,
            "polls": rec.polls,
            "watch_started_at": ev.rfc3339(datetime.fromtimestamp(rec.watch_started_at, UTC)),
            "consecutive_failures": task.failures,
            "last_error": task.last_error,
            "next_poll_at": next_poll,
            "interval_seconds": task.interval_s,
            "deadline_seconds": task.deadline_s,
            "seq": rec.seq,
        }

    # -- reload ------------------------------------------------------------------------------

    async def check_config_file(self) -> None:
        """The periodic job: reload when the config file changed."""
        if self.config_path is None:
            return
        sig = file_signature(self.config_path)
        if sig is not None and sig != self._config_sig:
            self._config_sig = sig
            await self.reload()

    async def reload(self) -> None:
        """Re-read the config file and apply the difference; the old config stays on errors."""
        if self.config_path is None or self.stopped:
            return
        self._config_sig = file_signature(self.config_path)
        try:
            new = load_config(self.config_path)
            # the sinks are built again (their secret files read again: a rotation needs
            # no restart); a missing secret is an error and the old config stays
            sinks = build_sinks(new.sinks, os.environ) if self._on_sinks is not None else None
        except ConfigError as err:
            self._writer.daemon_event(ev.CONFIG_RELOAD_FAILED, ev.ERROR, errors=err.problems)
            return
        if sinks is not None and self._on_sinks is not None:
            self._writer.add_secrets(sink_secrets(sinks))
            await self._on_sinks(sinks)
        await self.apply(new)

    async def apply(self, new: Config) -> None:
        """Apply a new config: tasks added, changed and removed; polling settings."""
        old, old_keys = self.config, self._config_keys
        new_tasks = {t.key: t for t in new.tasks}
        restart_required = [s for s in RESTART_SECTIONS if getattr(old, s) != getattr(new, s)]
        if old.sinks.delivery != new.sinks.delivery:
            restart_required.append("sinks.delivery")
        if new.polling != old.polling:
            self._apply_polling(old, new, new_tasks)
            self._on_polling(new)
        self.config, self._config_tasks, self._config_keys = new, new_tasks, set(new_tasks)
        records = await self._store.load_tasks()
        added, changed = [], []
        for key, cfg in new_tasks.items():
            current = self.tasks.get(key)
            if current is None:
                self._owner.admit(await self._watch_for(cfg, SOURCE_CONFIG, records.get(key)))
                added.append(key)
            elif key not in old_keys or _differs(current, cfg, new):
                _update(current, cfg, new)
                current.source = SOURCE_CONFIG
                changed.append(key)
        removed = [k for k in old_keys - new_tasks.keys() if self._drop_config_task(k)]
        self._settle_config()
        self._writer.daemon_event(
            ev.CONFIG_RELOADED,
            added=sorted(added),
            removed=sorted(removed),
            changed=sorted(changed),
            restart_required=restart_required,
        )
        self._on_change()

    def _drop_config_task(self, key: str) -> bool:
        task = self.tasks.get(key)
        if task is None or task.source != SOURCE_CONFIG:
            return False
        self.drop(task)
        return True

    def _apply_polling(self, old: Config, new: Config, new_tasks: dict[str, TaskConfig]) -> None:
        for task in self.tasks.values():
            cfg = new_tasks.get(task.key)
            own = cfg.interval_seconds if cfg is not None else None
            if own is None and task.interval_s == old.polling.interval_seconds:
                task.interval_s = new.polling.interval_seconds


def _differs(task: TaskWatch, cfg: TaskConfig, config: Config) -> bool:
    return (
        task.kind.name != cfg.kind
        or task.task_id != cfg.ident
        or task.dataset != cfg.name
        or task.labels != cfg.labels
        or task.interval_s != (cfg.interval_seconds or config.polling.interval_seconds)
        or task.deadline_s != cfg.deadline_seconds
        or task.stall_after_s != cfg.stall_after_seconds
    )


def _update(task: TaskWatch, cfg: TaskConfig, config: Config) -> None:
    task.kind = KINDS[cfg.kind]
    task.task_id = cfg.ident
    task.dataset = cfg.name
    task.labels = dict(cfg.labels) if cfg.labels else NO_LABELS
    task.interval_s = cfg.interval_seconds or config.polling.interval_seconds
    task.deadline_s = cfg.deadline_seconds
    task.stall_after_s = cfg.stall_after_seconds


def listed_observation(task: TaskWatch, job: ListedJob) -> Observation | None:
    """A dataset list names a job and its list's status only: an Observation of a task
    answered before (its task id known), else None (its own poll comes first)."""
    ident = task.task_id or task.record.seen_task_id
    if ident is None:
        return None
    kind = task.kind
    return Observation(
        task_id=ident, dataset_name=job.name, status=job.status, created_at=None,
        started_at=None, data={}, known=job.status in kind.statuses,
        terminal=job.status in kind.terminal,
    )  # fmt: skip
