"""The callers waiting on a Raft shell's log: their errors, and the futures the driver settles.

A write goes queued (until the driver hands it to the core) -> pending (proposed at a log index, in a
term) -> settled when that index applies: with apply's result, with its domain error, or with
ProposalDropped if a new leader replaced the entry. `wait_applied` callers wait for an applied index
instead. Everything here runs on the event loop that owns the shell.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sllmd.raft.core import ConfigChangeRejected, NotLeader, Raft
from sllmd.raft.messages import Entry


class NotLeaderError(Exception):
    """Not proposed: this node is not the leader. Safe to retry at `leader_id` (None: unknown yet)."""

    def __init__(self, leader_id: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader_id})")
        self.leader_id = leader_id


class ProposalDropped(Exception):
    """Proposed, but a new leader replaced the entry before it committed: it was not applied and never
    will be (Log Matching: one index, one committed term). Safe to retry."""


class ConfigChangeError(Exception):
    """The core refused a membership change for now (another one is pending, or the node already is /
    is not a voter); the message says which."""


@dataclass(eq=False)
class Proposal:
    """One write for the core: a command's bytes, or a voter to add or remove."""

    command: bytes = b""
    add_voter: str | None = None
    remove_voter: str | None = None
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Proposals:
    """The futures of one shell's callers, from queued to settled (module doc). Not thread-safe."""

    def __init__(self) -> None:
        self._queued: list[Proposal] = []
        self._pending: dict[int, tuple[int, asyncio.Future[Any]]] = {}  # log index -> (term, future)
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []

    def queue(self, proposal: Proposal) -> None:
        self._queued.append(proposal)

    def propose_queued(self, raft: Raft) -> None:
        """Hands `raft` the proposals queued since the last call whose callers still wait. A refusal
        settles its caller at once; an accepted one waits for its log index to apply."""
        queued, self._queued = self._queued, []
        for proposal in queued:
            if proposal.future.done():
                continue  # the caller gave up before it was proposed
            if proposal.add_voter is not None:
                outcome = raft.propose_add_node(proposal.add_voter)
            elif proposal.remove_voter is not None:
                outcome = raft.propose_remove_node(proposal.remove_voter)
            else:
                outcome = raft.propose(proposal.command)
            if isinstance(outcome, NotLeader):
                settle(proposal.future, error=NotLeaderError(outcome.leader_id))
            elif isinstance(outcome, ConfigChangeRejected):
                settle(proposal.future, error=ConfigChangeError(outcome.reason))
            else:
                self._pending[outcome] = (raft.term, proposal.future)

    def applied(self, entry: Entry, result: Any) -> None:
        """`entry` applied with `result` (an exception for a command that failed)."""
        term, future = self._pending.pop(entry.index, (None, None))
        if future is None:
            return
        if term != entry.term:
            settle(future, error=ProposalDropped(f"entry {entry.index} was replaced by a new leader"))
        elif isinstance(result, BaseException):
            settle(future, error=result)
        else:
            settle(future, result=result)

    def replaced_by_snapshot(self, index: int, error: BaseException) -> None:
        """A snapshot up to `index` replaced the state: entries up to it will never apply here one by one."""
        for pending in [i for i in self._pending if i <= index]:
            settle(self._pending.pop(pending)[1], error=error)

    def wait_applied(self, index: int) -> asyncio.Future[None]:
        """A future resolved by `reached` once the applied index is `index` or past it."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waiters.append((index, future))
        return future

    def reached(self, applied_index: int) -> None:
        waiting = []
        for index, future in self._applied_waiters:
            if index <= applied_index:
                settle(future)
            elif not future.done():
                waiting.append((index, future))
        self._applied_waiters = waiting

    def fail_all(self, error: BaseException) -> None:
        """Settle every caller with `error` (applied-index waiters are cancelled)."""
        for proposal in self._queued:
            settle(proposal.future, error=error)
        for _, future in self._pending.values():
            settle(future, error=error)
        for _, future in self._applied_waiters:
            future.cancel()
        self._queued, self._pending, self._applied_waiters = [], {}, []


def settle(future: asyncio.Future[Any], *, result: Any = None, error: BaseException | None = None) -> None:
    """Resolve `future` unless something already did."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
