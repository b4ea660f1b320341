"""What a Raft node persists, as a Protocol the shell writes through, and an in-memory implementation.

A `Storage` holds one node's hard state, log and snapshot. `save(ready)` applies one Ready by its
storage contract (see `Ready`) and is durable and atomic when it returns: after a crash, `load()` gives
the state before this Ready or after it, never a mix. The shell may therefore send the Ready's messages
as soon as `save` returns (Raft §5.1: state before replies). `LmdbStorage` (`sllmd.raft.lmdb`) is the
node's; `MemoryStorage` is the reference model the simulator and the storage tests run against.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from sllmd.raft.core import HardState, Ready
from sllmd.raft.messages import Entry, Snapshot


@dataclass(frozen=True, slots=True)
class PersistedState:
    """What `Raft.restore` needs. `is_empty` means a brand-new node: bootstrap or join instead."""

    hard_state: HardState = field(default_factory=HardState)
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None

    @property
    def is_empty(self) -> bool:
        return self.hard_state == HardState() and not self.entries and self.snapshot is None


class Storage(Protocol):
    """One node's durable Raft state. Called by one thread at a time."""

    def save(self, ready: Ready) -> None:
        """Persists `ready`'s snapshot, log changes and hard state atomically and durably (Ready's
        storage contract). Call before sending `ready.messages`."""
        ...

    def load(self) -> PersistedState:
        """Everything saved so far; raises WireError if what is stored does not decode."""
        ...


class MemoryStorage:
    """A `Storage` in memory: durable for as long as the object lives, which is what a simulated crash
    keeps (a crash drops the core and the state machine, never a completed `save`)."""

    def __init__(self, hard_state: HardState | None = None, entries: Iterable[Entry] = (),
                 snapshot: Snapshot | None = None) -> None:
        self._hard_state = hard_state or HardState()
        self._entries: list[Entry] = list(entries)
        self._snapshot = snapshot

    def save(self, ready: Ready) -> None:
        """Raises ValueError, changing nothing, if `ready.entries` would leave a gap in the log."""
        first, last = self._kept_range(ready)
        if ready.entries:
            expected = last + 1 if first <= last else ready.entries[0].index
            if ready.entries[0].index != expected:
                raise ValueError(f"Ready entries start at {ready.entries[0].index}, the log needs {expected}")
        if self._entries:  # the held entries are contiguous, so the kept ones are one slice
            offset = self._entries[0].index
            del self._entries[max(0, last + 1 - offset):]
            del self._entries[:max(0, first - offset)]
        self._entries.extend(ready.entries)
        if ready.snapshot is not None:
            self._snapshot = ready.snapshot
        if ready.hard_state is not None:
            self._hard_state = ready.hard_state

    def _kept_range(self, ready: Ready) -> tuple[int, int]:
        """The indices [first, last] of the held entries that `ready`'s snapshot and truncation keep
        (first > last: none)."""
        if not self._entries:
            return 1, 0
        first, last = self._entries[0].index, self._entries[-1].index
        if ready.snapshot is not None:
            first = max(first, ready.snapshot.index + 1)
        if ready.truncate_from is not None:
            last = min(last, ready.truncate_from - 1)
        return first, last

    def load(self) -> PersistedState:
        return PersistedState(self._hard_state, tuple(self._entries), self._snapshot)
