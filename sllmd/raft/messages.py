"""Raft peer messages and their wire codec: the data the core exchanges with its peers and storage.

Everything here is plain data with a strict decoder. `to_wire()` gives maps and lists of
str/int/bool/bytes only (msgpack-able, never pickled); `from_wire()` validates every field and raises
`WireError` on anything malformed, so hostile bytes from the network or a corrupted disk never reach
the core. Callers (the core, the shell, storage) import these names from this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar

NodeId = str


class EntryKind(Enum):
    COMMAND = 0  # opaque bytes for the shell's state machine
    NOOP = 1  # appended by every new leader so it can commit earlier terms' entries (§5.4.2, §8)
    CONFIG = 2  # `voters` is the complete new voter set (thesis §4.1)


class MessageType(Enum):
    PRE_VOTE = "pre_vote"
    PRE_VOTE_RESPONSE = "pre_vote_response"
    VOTE = "vote"
    VOTE_RESPONSE = "vote_response"
    APPEND = "append"
    APPEND_RESPONSE = "append_response"  # also answers SNAPSHOT
    HEARTBEAT = "heartbeat"
    HEARTBEAT_RESPONSE = "heartbeat_response"
    SNAPSHOT = "snapshot"


class WireError(ValueError):
    """A message, entry or snapshot from the network (or disk) that does not decode."""


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Entry:
    """One log entry. (index, term) identifies it uniquely across the cluster (§5.3 Log Matching)."""

    index: int
    term: int
    kind: EntryKind = EntryKind.COMMAND
    data: bytes = b""
    voters: tuple[NodeId, ...] = ()  # CONFIG entries only: sorted, complete

    def to_wire(self) -> list[Any]:
        return [self.index, self.term, self.kind.value, self.data, list(self.voters)]

    @classmethod
    def from_wire(cls, wire: Any) -> Entry:
        if not isinstance(wire, list | tuple) or len(wire) != 5:
            raise WireError("entry: expected a 5-item list")
        index, term, kind, data, voters = wire
        return cls(_uint(index, "entry.index"), _uint(term, "entry.term"), _enum(EntryKind, kind, "entry.kind"),
                   _bytes(data, "entry.data"), _node_ids(voters, "entry.voters"))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state machine as of `index` (opaque `data`), with the voter set in force at that index (§7)."""

    index: int
    term: int
    voters: tuple[NodeId, ...]
    data: bytes = b""

    def to_wire(self) -> dict[str, Any]:
        return {"index": self.index, "term": self.term, "voters": list(self.voters), "data": self.data}

    @classmethod
    def from_wire(cls, wire: Any) -> Snapshot:
        if not isinstance(wire, dict):
            raise WireError("snapshot: expected a map")
        return cls(_uint(wire.get("index"), "snapshot.index"), _uint(wire.get("term"), "snapshot.term"),
                   _node_ids(wire.get("voters"), "snapshot.voters"), _bytes(wire.get("data"), "snapshot.data"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of all peer messages. `term` is the sender's term, except in PreVote traffic (see VoteRequest)."""

    TYPES: ClassVar[tuple[MessageType, ...]] = ()
    type: MessageType
    sender: NodeId
    to: NodeId
    term: int

    def __post_init__(self) -> None:
        if self.type not in self.TYPES:
            raise WireError(f"{type(self).__name__} cannot carry type {self.type}")

    def to_wire(self) -> dict[str, Any]:
        """A plain map of str/int/bool/bytes/lists: msgpack-able, never pickled."""
        return {f.name: _encode(getattr(self, f.name)) for f in fields(self)}

    @staticmethod
    def from_wire(wire: Any) -> Message:
        """Decodes and validates a map from `to_wire`; raises WireError on anything malformed."""
        if not isinstance(wire, dict):
            raise WireError("message: expected a map")
        cls = _CLASS_BY_TYPE[_enum(MessageType, wire.get("type"), "type")]
        kwargs = {}
        for f in fields(cls):
            if f.name not in wire:
                raise WireError(f"message {cls.__name__}: missing {f.name!r}")
            kwargs[f.name] = _DECODERS[f.type](wire[f.name], f.name)
        return cls(**kwargs)


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteRequest(Message):
    """RequestVote (§5.2), or its PreVote probe (thesis §9.6), where `term` is the term the sender *would*
    campaign in (its own term + 1) and receivers change nothing."""

    TYPES: ClassVar[tuple[MessageType, ...]] = (MessageType.PRE_VOTE, MessageType.VOTE)
    last_index: int
    last_term: int


@dataclass(frozen=True, slots=True, kw_only=True)
class VoteResponse(Message):
    """A granted PreVote echoes the request's term; a refusal carries the voter's own term."""

    TYPES: ClassVar[tuple[MessageType, ...]] = (MessageType.PRE_VOTE_RESPONSE, MessageType.VOTE_RESPONSE)
    granted: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendEntries(Message):
    TYPES: ClassVar[tuple[MessageType, ...]] = (MessageType.APPEND,)
    type: MessageType = MessageType.APPEND
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int

    def __post_init__(self) -> None:
        Message.__post_init__(self)
        # Entries follow prev_index contiguously, with terms that never decrease and never exceed the
        # leader's: the core relies on this shape, so a malformed message is refused at the door.
        index, term = self.prev_index, self.prev_term
        for entry in self.entries:
            if entry.index != index + 1 or not term <= entry.term <= self.term:
                raise WireError("append: entries must follow prev_index with non-decreasing terms")
            index, term = entry.index, entry.term


@dataclass(frozen=True, slots=True, kw_only=True)
class AppendResponse(Message):
    """Answers AppendEntries and InstallSnapshot. On success `match_index` is the last index known to
    match the leader's log. On rejection `reject_index` is the request's prev_index, and the hint is either
    conflict_term = 0 with conflict_index = follower's last index + 1 (log too short), or the follower's
    term at prev_index and the first index it holds of that term (§5.3)."""

    TYPES: ClassVar[tuple[MessageType, ...]] = (MessageType.APPEND_RESPONSE,)
    type: MessageType = MessageType.APPEND_RESPONSE
    success: bool
    match_index: int = 0
    reject_index: int = 0
    conflict_term: int = 0
    conflict_index: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat(Message):
    """Leader liveness (§5.2). `commit` is min(leader commit, follower's match): safe to adopt as is."""

    TYPES: ClassVar[tuple[MessageType, ...]] = (MessageType.HEARTBEAT,)
    type: MessageType = MessageType.HEARTBEAT
    commit: int


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatResponse(Message):
    TYPES: ClassVar[tuple[MessageType, ...]] = (MessageType.HEARTBEAT_RESPONSE,)
    type: MessageType = MessageType.HEARTBEAT_RESPONSE


@dataclass(frozen=True, slots=True, kw_only=True)
class InstallSnapshot(Message):
    """InstallSnapshot (§7), in one message. Answered with an AppendResponse."""

    TYPES: ClassVar[tuple[MessageType, ...]] = (MessageType.SNAPSHOT,)
    type: MessageType = MessageType.SNAPSHOT
    snapshot: Snapshot


_CLASS_BY_TYPE: dict[MessageType, type[Message]] = {
    mtype: cls
    for cls in (VoteRequest, VoteResponse, AppendEntries, AppendResponse, Heartbeat, HeartbeatResponse,
                InstallSnapshot)
    for mtype in cls.TYPES
}
FROM_LEADER = frozenset({MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT})


# ------------------------------------------------------------------------------------------- wire codec


def _uint(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value < 1 << 64:
        raise WireError(f"{name}: expected an int in [0, 2**64)")
    return value


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise WireError(f"{name}: expected a bool")
    return value


def _str(value: Any, name: str) -> str:
    if type(value) is not str or not value:
        raise WireError(f"{name}: expected a non-empty str")
    return value


def _bytes(value: Any, name: str) -> bytes:
    if type(value) is not bytes:
        raise WireError(f"{name}: expected bytes")
    return value


def _node_ids(value: Any, name: str) -> tuple[NodeId, ...]:
    if not isinstance(value, list | tuple):
        raise WireError(f"{name}: expected a list")
    return tuple(_str(v, name) for v in value)


def _enum(enum: type[Enum], value: Any, name: str) -> Any:
    try:
        return enum(value)
    except (ValueError, TypeError):
        raise WireError(f"{name}: unknown {enum.__name__} {value!r}") from None


def _entries(value: Any, name: str) -> tuple[Entry, ...]:
    if not isinstance(value, list | tuple):
        raise WireError(f"{name}: expected a list")
    return tuple(Entry.from_wire(v) for v in value)


def _encode(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Snapshot):
        return value.to_wire()
    if isinstance(value, tuple):
        return [v.to_wire() for v in value]  # entries
    return value


# Keyed by the dataclass field annotations (strings, under `from __future__ import annotations`).
_DECODERS: dict[str, Callable[[Any, str], Any]] = {
    "MessageType": lambda v, name: _enum(MessageType, v, name),
    "NodeId": _str,
    "int": _uint,
    "bool": _bool,
    "tuple[Entry, ...]": _entries,
    "Snapshot": lambda v, name: Snapshot.from_wire(v),
}
