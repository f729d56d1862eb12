"""Discovery: sweep a kind's list pages and watch every matching job not seen before.

One `Discoverer` per daemon; each `discover:` entry is swept at start and then every
`every_seconds`, by one replica at a time (the owner's lease on the key `discover:<i>`).
A sweep reads every page of each status (`per_page=100` until `has_next` is false; an
answer without pagination is one page) through the API client, so the rate limit,
Retry-After pauses, the connection cap and the auth check of polls hold for it too. A
failed sweep is retried with backoff and never ends the daemon. A found job is handed to
`add` (the watch list), which stores it once and watches it as if added through the API.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from enkwatch import events as ev
from enkwatch.config import Config, DiscoverConfig, task_key
from enkwatch.errors import PollError, TransientPollError, UnauthorizedAnswer
from enkwatch.kinds import LISTERS
from enkwatch.models import DISCOVERY_FAILED, ListedJob, Lister, ListPage
from enkwatch.watch import AUTH_CONFIRM_DELAY_S

PER_PAGE: Final = 100
# a peer that always says has_next: at most this many pages (100,000 jobs) per status
MAX_PAGES: Final = 1000
FIRST_RETRY_S: Final = 1.0
# a job a sweep's list named sends no request of its own for this many sweep periods,
# unless a newer list says more (a sweep that no longer names it ends this at once)
COVERED_SWEEPS: Final = 2.0


class ListClient(Protocol):
    """What discovery needs of the API client."""

    async def list_page(
        self, lister: Lister, status: str, page: int, per_page: int
    ) -> ListPage: ...


class FoundJobs(Protocol):
    """Where found jobs go (the watch list)."""

    async def known_keys(self) -> set[str]: ...

    async def discover(self, entry: dict[str, Any], job: object = None) -> bool: ...

    def swept(self, entry: int) -> None: ...

    def monotonic(self) -> float: ...

    def unlisted(self, kind: str, since: float) -> None: ...

    def listed(
        self, kind: str, jobs: Iterable[ListedJob], requested_mono: float, covered_s: float = 0.0
    ) -> int: ...


class Periodic(Protocol):
    """The daemon's timers (schedule.Timers)."""

    def every(self, seconds: float, job: Callable[[], Any], name: str) -> None: ...


@dataclass(slots=True)
class SweepStats:
    """What the sweeps did (for metrics, tests and the benchmark)."""

    sweeps: int = 0
    failed: int = 0
    pages: int = 0
    found: int = 0
    added: int = 0
    # pages read again because the list shrank while it was read (jobs moved up a page)
    reread_pages: int = 0
    # watched jobs named by a list (observed without a request of their own)
    listed: int = 0


def matches(entry: DiscoverConfig, job: ListedJob) -> bool:
    """Every `match` glob matches the job's field (a job without the field does not match)."""
    for name, pattern in entry.match.items():
        value = job.fields.get(name)
        if value is None or not fnmatch.fnmatchcase(value, pattern):
            return False
    return True


def job_entry(entry: DiscoverConfig, job: ListedJob) -> dict[str, Any]:
    """The task entry of a found job, as `POST /tasks` would take it."""
    out: dict[str, Any] = {"kind": entry.kind}
    if job.task_id is not None:
        out["task_id"] = job.task_id
    if job.name is not None:
        out["dataset" if entry.kind == "dataset" else "test_name"] = job.name
    for name in ("interval_seconds", "deadline_seconds"):
        if (value := getattr(entry, name)) is not None:
            out[name] = value
    if entry.labels:
        out["labels"] = dict(entry.labels)
    return out


def job_key(entry: DiscoverConfig, job: ListedJob) -> str:
    return task_key(entry.kind, job.task_id, job.name)


class Discoverer:
    """Sweeps the `discover:` entries; hands new jobs to `add`."""

    def __init__(
        self,
        config: Config,
        client: ListClient,
        jobs: FoundJobs,
        writer: ev.EventWriter,
        may_sweep: Callable[[str], bool] | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.entries = list(config.discover)
        self._client = client
        self._jobs = jobs
        self._writer = writer
        # with replicas: does this replica hold the lease of `discover:<i>` (one sweeps)?
        self._may_sweep = may_sweep
        # the API confirmed that it rejects the key: the daemon stops (exit 4)
        self.on_auth_failed: Callable[[int], None] = lambda status: None
        self._max_backoff_s = config.polling.max_backoff_seconds
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._running: dict[int, asyncio.Task[None]] = {}
        self.stopped = False
        self.stats = SweepStats()
        # the metrics' counters by kind of job: (kind, what, count), what as in metrics.py
        self.observe: Callable[[str, str, int], None] = lambda kind, what, count: None

    # -- scheduling ------------------------------------------------------------------------

    def start(self, timers: Periodic) -> Callable[[], Awaitable[None]]:
        """Sweep every entry now, then every `every_seconds` (through the daemon's timers);
        returns `stop`, for the caller's cleanup."""
        for i, entry in enumerate(self.entries):
            self.tick(i)
            timers.every(entry.every_seconds, functools.partial(self._tick, i), f"discover-{i}")
        return self.stop

    async def _tick(self, i: int) -> None:
        self.tick(i)

    def tick(self, i: int) -> None:
        """Start a sweep of entry `i` in its own task, unless one is running (or we stopped)."""
        if self.stopped or i in self._running:
            return
        job = asyncio.ensure_future(self.run(i))
        self._running[i] = job
        job.add_done_callback(lambda _: self._running.pop(i, None))

    async def run(self, i: int) -> None:
        """One sweep of entry `i`, retried with backoff until it succeeds, the daemon stops,
        or (replicas) this replica no longer holds the entry's lease: asked before every
        attempt and every page, so that one replica sweeps at a time."""
        attempt = 0
        while not self.stopped:
            try:
                await self.sweep(self.entries[i], lambda: self._ours(i))
                self._jobs.swept(i)
                return
            except _NotOurs:
                self._jobs.swept(i)  # another replica's
                return
            except _Rejected as err:
                self.on_auth_failed(err.http_status)
                return
            except PollError as err:
                attempt += 1
                self.stats.failed += 1
                self.observe(self.entries[i].kind, "failed_sweeps", 1)
                await self._sleep(self._failed(i, err, attempt))

    def _failed(self, i: int, err: PollError, attempt: int) -> float:
        ceiling = min(self._max_backoff_s, FIRST_RETRY_S * 2.0 ** min(attempt, 32))
        delay = max(self._rng.uniform(0.0, ceiling), ceiling / 10.0)
        if isinstance(err, TransientPollError) and err.retry_after_s is not None:
            delay = max(delay, err.retry_after_s)
        entry = self.entries[i]
        self._writer.daemon_event(
            DISCOVERY_FAILED, ev.WARNING, discover=i, kind=entry.kind, error=err.kind,
            http_status=err.http_status, detail=err.detail, attempt=attempt,
            retry_in_seconds=round(delay, 3),
        )  # fmt: skip
        return delay

    async def stop(self) -> None:
        """No new sweep; the running ones are cancelled (what they found is found again)."""
        self.stopped = True
        jobs = list(self._running.values())
        for job in jobs:
            job.cancel()
        # their CancelledError is collected here; ours (stop() itself cancelled) propagates
        await asyncio.gather(*jobs, return_exceptions=True)

    # -- one sweep -------------------------------------------------------------------------

    def _ours(self, i: int) -> None:
        """Raise _NotOurs unless this replica may sweep entry `i` now."""
        if self._may_sweep is not None and not self._may_sweep(f"discover:{i}"):
            raise _NotOurs

    async def sweep(self, entry: DiscoverConfig, check: Callable[[], None] = lambda: None) -> None:
        """Read every page of every status of `entry`; add the matching jobs not known.
        `check` is called before every page (it raises to end the sweep)."""
        lister = LISTERS[entry.kind]
        # each job found, and when the list that named it was first requested
        found: dict[str, tuple[ListedJob, float]] = {}
        started = self._jobs.monotonic()
        # a job a list names is covered until the next sweep has had its time: two periods
        covered = COVERED_SWEEPS * entry.every_seconds
        for status in entry.statuses:
            requested = self._jobs.monotonic()
            for job in await self._read_status(lister, status, check, covered):
                if matches(entry, job):
                    found[job_key(entry, job)] = (job, requested)  # the later list wins
        self._jobs.unlisted(entry.kind, started)
        self.stats.sweeps += 1
        self.stats.found += len(found)
        self.observe(entry.kind, "sweeps", 1)
        self.observe(entry.kind, "jobs_found", len(found))
        known = await self._jobs.known_keys()
        for key, (job, requested) in found.items():
            if (
                key not in known
                and not self.stopped
                and await self._jobs.discover(job_entry(entry, job), job)
            ):
                self.stats.added += 1
                self.observe(entry.kind, "jobs_added", 1)
                # the list that named it is its first observation (no request of its own)
                self.stats.listed += self._jobs.listed(entry.kind, (job,), requested, covered)

    async def _read_status(
        self, lister: Lister, status: str, check: Callable[[], None], covered_s: float
    ) -> Iterable[ListedJob]:
        """Every job of one status list. A page whose `total_count` is smaller than the
        page before's says that the list shrank while read: the jobs that moved up onto the
        page before are read there again (one request), not the whole list."""
        jobs: list[ListedJob] = []
        requested = self._jobs.monotonic()
        page, before = 1, None
        while True:
            check()
            answer = await self._page(lister, status, page)
            jobs.extend(answer.items)
            total = answer.total_count
            if page > 1 and total is not None and before is not None and total < before:
                check()
                jobs.extend((await self._page(lister, status, page - 1)).items)
                self.stats.reread_pages += 1
            before = total if total is not None else before
            if not answer.has_next or not answer.items or page >= MAX_PAGES:
                break
            page += 1
        # the list is an observation of every watched job it names (status from list pages)
        self.stats.listed += self._jobs.listed(lister.name, jobs, requested, covered_s)
        return jobs

    async def _page(self, lister: Lister, status: str, page: int) -> ListPage:
        self.stats.pages += 1
        self.observe(lister.name, "pages", 1)
        try:
            return await self._client.list_page(lister, status, page, PER_PAGE)
        except UnauthorizedAnswer:
            await self._sleep(AUTH_CONFIRM_DELAY_S)
            self.stats.pages += 1
            self.observe(lister.name, "pages", 1)
            try:
                return await self._client.list_page(lister, status, page, PER_PAGE)
            except UnauthorizedAnswer as second:
                raise _Rejected(second.http_status or 401) from None


class _NotOurs(Exception):
    """This replica does not hold the lease of the entry being swept (any more)."""


class _Rejected(Exception):
    """The API confirmed that it rejects the key during a sweep."""

    def __init__(self, http_status: int) -> None:
        super().__init__(f"HTTP {http_status}")
        self.http_status = http_status
