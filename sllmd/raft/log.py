"""RaftLog: a Raft node's log, the entries that follow its latest snapshot, and their index arithmetic.

Pure in-memory data: no I/O, no clocks, no Raft rules. Whether an append, a truncation or a compaction is
*allowed* (never truncate a committed entry, never compact past the applied index, ...) is the caller's
business (`sllmd.raft.core`); this class only keeps the indices consistent and refuses operations that
would break them.

Contract (holds after every method returns):

- `snapshot` stands in for every entry with index <= `snapshot.index` (all compacted away);
  `snapshot.term` is the term of the entry at `snapshot.index` (0 for the empty index-0 snapshot).
- The held entries are contiguous: the k-th has index `snapshot.index + 1 + k`, so
  `first_index == snapshot.index + 1` and `last_index == snapshot.index + len(entries)`
  (`last_index == snapshot.index` when no entry follows the snapshot, and then `first_index > last_index`).
- `term_at(i)` is known exactly for `snapshot.index <= i <= last_index` and is None outside that range.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from sllmd.raft.messages import Entry, EntryKind, NodeId, Snapshot

__all__ = ["RaftLog"]


class RaftLog:
    """The entries after a snapshot (module doc for the index invariants). Every method is
    O(entries touched), except `config_at`, which scans back from `index` to the latest CONFIG entry."""

    __slots__ = ("_entries", "_snapshot")

    def __init__(self, snapshot: Snapshot | None = None, entries: Iterable[Entry] = ()) -> None:
        """A log that starts at `snapshot` (default: the empty index-0 snapshot with no voters) and holds
        `entries`. Entries already folded into the snapshot (index <= snapshot.index) are skipped, since
        storage may lag one compaction behind; the rest must follow it without a gap (ValueError)."""
        self._snapshot = snapshot if snapshot is not None else Snapshot(0, 0, ())
        self._entries: list[Entry] = []  # self._entries[k].index == self._snapshot.index + 1 + k
        for entry in entries:
            if entry.index <= self._snapshot.index:
                continue
            if entry.index != self.last_index + 1:
                raise ValueError(f"persisted log has a gap: expected index {self.last_index + 1}, "
                                 f"found {entry.index}")
            self._entries.append(entry)

    # ----------------------------------------------------------------------------------------- reading

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def first_index(self) -> int:
        """The index of the first entry held (it may not exist yet: then first_index == last_index + 1)."""
        return self._snapshot.index + 1

    @property
    def last_index(self) -> int:
        """The index of the last entry held, or the snapshot's index when none is."""
        return self._snapshot.index + len(self._entries)

    @property
    def last_term(self) -> int:
        """The term of the last entry held, or the snapshot's term when none is."""
        return self._entries[-1].term if self._entries else self._snapshot.term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, or None if compacted away or beyond the log."""
        if index == self._snapshot.index:
            return self._snapshot.term
        if self._snapshot.index < index <= self.last_index:
            return self._entries[index - self._snapshot.index - 1].term
        return None

    def entries(self, lo: int, hi: int) -> tuple[Entry, ...]:
        """Entries with lo <= index <= hi, clipped to what the log holds."""
        first = self.first_index
        return tuple(self._entries[max(lo, first) - first:max(hi + 1, first) - first])

    def config_at(self, index: int) -> tuple[tuple[NodeId, ...], int]:
        """The voter set in force at `index` (clamped to last_index) and the index of the CONFIG entry, or
        snapshot, that set it: the latest CONFIG entry at or before `index`, else the snapshot's voters."""
        for i in range(min(index, self.last_index), self._snapshot.index, -1):
            entry = self._entries[i - self._snapshot.index - 1]
            if entry.kind is EntryKind.CONFIG:
                return entry.voters, i
        return self._snapshot.voters, self._snapshot.index

    # ---------------------------------------------------------------------------------------- changing

    def append(self, entries: Sequence[Entry]) -> None:
        """Appends entries that directly follow the log (ValueError otherwise, and nothing is appended)."""
        for k, entry in enumerate(entries):
            if entry.index != self.last_index + 1 + k:
                raise ValueError(f"cannot append index {entry.index}: expected {self.last_index + 1 + k}")
        self._entries.extend(entries)

    def truncate(self, index: int) -> None:
        """Drops every entry with index >= `index`. The snapshot cannot be truncated: `index` must be
        above snapshot.index (ValueError otherwise); an index past last_index drops nothing."""
        if index <= self._snapshot.index:
            raise ValueError(f"cannot truncate from {index}: entries up to {self._snapshot.index} are compacted")
        del self._entries[index - self.first_index:]

    def compact(self, index: int, data: bytes) -> Snapshot:
        """Folds the entries up to `index` into a new snapshot with state-machine bytes `data`, the term
        of the entry at `index` and the voter set in force there; drops those entries and returns the
        snapshot. `index` must lie in (snapshot.index, last_index] (ValueError otherwise)."""
        if not self._snapshot.index < index <= self.last_index:
            raise ValueError(f"cannot compact to {index}: the log holds ({self._snapshot.index}, {self.last_index}]")
        voters, _ = self.config_at(index)
        term = self.term_at(index)
        assert term is not None
        del self._entries[:index - self._snapshot.index]
        self._snapshot = Snapshot(index, term, voters, bytes(data))
        return self._snapshot

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """Replaces the whole log by `snapshot`: every entry is discarded, whatever its index (§7)."""
        self._snapshot = snapshot
        self._entries = []
