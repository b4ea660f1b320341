"""The state machine a Raft shell drives, as a Protocol, and how committed entries become its calls.

The shell knows commands only as msgpack maps (`Command`); what they mean is the application's
(`sllmd.state.machine.StoreStateMachine` is the node's). Applying must be deterministic: every node
applies the same entries in the same order and must reach the same state and the same outcomes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import msgpack

from sllmd.errors import SllmdError
from sllmd.raft.messages import Entry, EntryKind

Command = dict[str, Any]  # a msgpack-able map; its bytes are a COMMAND entry's data
Outcome = tuple[Entry, Command | None, Any]  # (entry, command or None for NOOP/CONFIG, result or SllmdError)


class StateMachine(Protocol):
    """The application's replicated state, as the shell drives it: called by one thread at a time (the
    shell's driver, through the default executor; never the event loop's own)."""

    def applied_index(self) -> int:
        """The index of the last log entry whose effects are stored (0: none)."""
        ...

    def apply(self, commands: Sequence[Command], applied_index: int) -> list[Any]:
        """Applies `commands` in order and records `applied_index` as applied, in one atomic, durable
        write. Returns one outcome per command: its result, or the exception it raised, in which case
        that command changed nothing."""
        ...

    def snapshot(self) -> tuple[int, bytes]:
        """The whole state as opaque bytes, with the applied index it is as of."""
        ...

    def restore(self, data: bytes, applied_index: int) -> None:
        """Replaces the whole state with a `snapshot`'s bytes (b"": the empty state) and records
        `applied_index`, in one atomic, durable write."""
        ...


def encode_command(command: Command) -> bytes:
    return msgpack.packb(command, use_bin_type=True)


def apply_committed(machine: StateMachine, entries: Sequence[Entry]) -> list[Outcome]:
    """Applies the COMMAND entries among `entries` (non-empty, consecutive) and records the last one's
    index as applied. A command that fails, or bytes that are no command, change nothing and count as
    applied: every node fails them alike. Failures come back as SllmdError (a `{}` command for bytes
    that did not decode)."""
    decoded = [(entry, _decode(entry)) for entry in entries]
    results = iter(machine.apply([c for _, c in decoded if isinstance(c, dict)], entries[-1].index))
    outcomes: list[Outcome] = []
    for entry, command in decoded:
        if isinstance(command, Exception):
            outcomes.append((entry, {}, _as_domain_error(command)))
        elif command is None:
            outcomes.append((entry, None, None))
        else:
            result = next(results)
            outcomes.append((entry, command, _as_domain_error(result) if isinstance(result, Exception) else result))
    return outcomes


def _decode(entry: Entry) -> Command | Exception | None:
    """A COMMAND entry's map, or why its bytes are no command; None for NOOP and CONFIG entries."""
    if entry.kind is not EntryKind.COMMAND:
        return None
    try:
        command = msgpack.unpackb(entry.data, raw=False, strict_map_key=True)
    except Exception as exc:  # hostile or corrupt bytes: whatever the decoder raises
        return exc
    return command if isinstance(command, dict) else TypeError("a command is a map")


def _as_domain_error(exc: Exception) -> SllmdError:
    return exc if isinstance(exc, SllmdError) else SllmdError(f"command not applied: {exc!r}")
