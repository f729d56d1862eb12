"""What of the SQLite journal was written out: a watermark on the journal's ids, and stragglers.

Journal rows get increasing ids, and the stdout thread writes lines in the order they were
journaled, so "every row up to id W was written" is one number that moves with each
confirmation, instead of a flag set on each row (an UPDATE per event, and an index of the
unwritten rows kept up to date). A confirmation that comes out of order (a line filtered out
by the level, a writer that waited for room) is held in memory until the rows below it are
confirmed. A row that stays unconfirmed while many later ones are confirmed (its poll was
cancelled at shutdown between journal and write) becomes a straggler: remembered on its own,
so the watermark moves past it and memory stays bounded.

The rule that keeps journal before write: a journaled row whose line was not confirmed is
always above the watermark or a straggler, in memory and in every committed state (the
watermark passes a straggler only in the transaction that stores it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

# confirmations held above an unconfirmed row before that row becomes a straggler
AHEAD_MAX: Final = 1_000


@dataclass(frozen=True, slots=True)
class MarkChanges:
    """What a transaction stores of the mark: the watermark (None: unchanged), stragglers to
    add and to drop, and confirmed rows to delete (written task.poll_failed events)."""

    through: int | None
    add: tuple[int, ...]
    drop: tuple[int, ...]
    delete_rows: tuple[int, ...]

    def __bool__(self) -> bool:
        return self.through is not None or bool(self.add or self.drop or self.delete_rows)


class WrittenMark:
    """The confirmed part of the journal: in memory, with what is still to be stored."""

    def __init__(
        self,
        through: int,
        unconfirmed: Iterable[tuple[int, str, int]] = (),
        stragglers: Iterable[tuple[int, str, int]] = (),
    ) -> None:
        """`through`: the stored watermark; `unconfirmed`: the rows above it (id, task_key,
        seq), by id; `stragglers`: the stored stragglers' rows."""
        self.through = through
        self._stored_through = through
        # committed, unconfirmed: by (task_key, seq), and those above the watermark by id
        self._ids: dict[tuple[str, int], int] = {}
        self._order: deque[int] = deque()
        # confirmed above the watermark, waiting for the rows below them
        self._ahead: set[int] = set()
        self.stragglers: set[int] = set()
        # rows deleted once confirmed (task.poll_failed)
        self._transient: set[int] = set()
        # to store with the next transaction
        self._add: list[int] = []
        self._drop: list[int] = []
        self._delete_rows: list[int] = []
        for row_id, key, seq in unconfirmed:
            self._ids[(key, seq)] = row_id
            self._order.append(row_id)
        for row_id, key, seq in stragglers:
            self._ids[(key, seq)] = row_id
            self.stragglers.add(row_id)

    def committed(self, rows: Iterable[tuple[int, str, int]], transient: Iterable[int]) -> None:
        """Rows just committed (ids above every earlier row), not yet written out."""
        for row_id, key, seq in rows:
            self._ids[(key, seq)] = row_id
            self._order.append(row_id)
        self._transient.update(transient)

    def transient(self, row_ids: Iterable[int]) -> None:
        """Rows deleted once confirmed (unconfirmed poll failures found at start)."""
        self._transient.update(row_ids)

    def unconfirmed(self, row_ids: Iterable[int]) -> list[int]:
        """Which of `row_ids` (journal rows) were not confirmed written."""
        return [
            i
            for i in row_ids
            if i in self.stragglers or (i > self.through and i not in self._ahead)
        ]

    def confirm(self, task_key: str, seq: int) -> None:
        """A row's line was written (an unknown or repeated confirmation changes nothing)."""
        row_id = self._ids.pop((task_key, seq), None)
        if row_id is None:
            return
        if row_id in self._transient:
            self._transient.discard(row_id)
            self._delete_rows.append(row_id)
        if row_id in self.stragglers:
            self.stragglers.discard(row_id)
            if row_id in self._add:
                self._add.remove(row_id)  # not stored yet: nothing to drop
            else:
                self._drop.append(row_id)
            return
        self._ahead.add(row_id)
        self._advance()
        while len(self._ahead) > AHEAD_MAX and self._order:
            straggler = self._order.popleft()
            self.stragglers.add(straggler)
            self._add.append(straggler)
            self.through = straggler
            self._advance()

    def _advance(self) -> None:
        order, ahead = self._order, self._ahead
        while order and order[0] in ahead:
            self.through = order.popleft()
            ahead.discard(self.through)

    def changes(self) -> MarkChanges:
        """What the next transaction stores (`saved` once it committed)."""
        return MarkChanges(
            self.through if self.through != self._stored_through else None,
            tuple(self._add),
            tuple(self._drop),
            tuple(self._delete_rows),
        )

    def saved(self, changes: MarkChanges) -> None:
        """`changes` were committed."""
        if changes.through is not None:
            self._stored_through = changes.through
        del self._add[: len(changes.add)]
        del self._drop[: len(changes.drop)]
        del self._delete_rows[: len(changes.delete_rows)]
