"""The Raft shell's pure parts: committed entries into StateMachine calls, and the proposal bookkeeping.

The shell itself (ZeroMQ, threads, LMDB) runs end to end in tests/test_replicated.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

import msgpack
import pytest

from sllmd.cluster.proposals import ConfigChangeError, NotLeaderError, Proposal, ProposalDropped, Proposals
from sllmd.cluster.state_machine import Command, apply_committed, encode_command
from sllmd.errors import Conflict, SllmdError
from sllmd.raft.core import Raft
from sllmd.raft.messages import Entry, EntryKind


class ListMachine:
    """A StateMachine keeping the commands it applied; a command {"fail": kind} raises."""

    def __init__(self) -> None:
        self.commands: list[Command] = []
        self.applied = 0

    def applied_index(self) -> int:
        return self.applied

    def apply(self, commands: Sequence[Command], applied_index: int) -> list[Any]:
        outcomes: list[Any] = []
        for command in commands:
            if command.get("fail") == "domain":
                outcomes.append(Conflict("already there"))
            elif command.get("fail") == "bug":
                outcomes.append(KeyError("op"))
            else:
                self.commands.append(command)
                outcomes.append(len(self.commands))
        self.applied = applied_index
        return outcomes

    def snapshot(self) -> tuple[int, bytes]:
        return self.applied, msgpack.packb(self.commands)

    def restore(self, data: bytes, applied_index: int) -> None:
        self.commands, self.applied = (msgpack.unpackb(data) if data else []), applied_index


def test_apply_committed_passes_commands_and_records_the_last_index() -> None:
    machine = ListMachine()
    entries = (Entry(1, 1, EntryKind.NOOP), Entry(2, 1, data=encode_command({"op": "a"})),
               Entry(3, 1, EntryKind.CONFIG, voters=("a",)), Entry(4, 1, data=encode_command({"op": "b"})),
               Entry(5, 1, EntryKind.NOOP))
    outcomes = apply_committed(machine, entries)
    assert [(entry.index, command, result) for entry, command, result in outcomes] == [
        (1, None, None), (2, {"op": "a"}, 1), (3, None, None), (4, {"op": "b"}, 2), (5, None, None)]
    assert machine.applied == 5 and machine.commands == [{"op": "a"}, {"op": "b"}]


def test_apply_committed_turns_every_failure_into_a_domain_error() -> None:
    machine = ListMachine()
    entries = (Entry(1, 1, data=b"\xc1"), Entry(2, 1, data=msgpack.packb([1, 2])),
               Entry(3, 1, data=encode_command({"fail": "domain"})), Entry(4, 1, data=encode_command({"fail": "bug"})),
               Entry(5, 1, data=encode_command({"op": "ok"})))
    outcomes = apply_committed(machine, entries)
    results = [result for _, _, result in outcomes]
    assert all(isinstance(result, SllmdError) for result in results[:4])
    assert isinstance(results[2], Conflict) and "KeyError" in str(results[3])
    assert [command for _, command, _ in outcomes[:2]] == [{}, {}]  # undecodable: no command, still applied
    assert results[4] == 1 and machine.applied == 5


def leader(node_id: str = "a") -> Raft:
    raft = Raft.bootstrap(node_id, [node_id], random.Random(0))
    while not raft.is_leader:
        raft.tick()
    raft.advance(raft.ready())
    return raft


async def test_proposals_settle_with_the_result_or_a_dropped_entry() -> None:
    raft, proposals = leader(), Proposals()
    kept, replaced, gave_up = Proposal(command=b"x"), Proposal(command=b"y"), Proposal(command=b"z")
    for proposal in (kept, replaced, gave_up):
        proposals.queue(proposal)
    gave_up.future.cancel()
    proposals.propose_queued(raft)
    assert raft.last_index == 3  # the leader's no-op, then x and y; z was never proposed
    proposals.applied(Entry(2, raft.term), "result")
    proposals.applied(Entry(3, raft.term + 1), "someone else's")  # a new leader replaced index 3
    assert await kept.future == "result"
    with pytest.raises(ProposalDropped):
        await replaced.future


async def test_proposals_refused_by_the_core_fail_at_once() -> None:
    proposals = Proposals()
    follower, change = Proposal(command=b"x"), Proposal(add_voter="a")
    proposals.queue(follower)
    proposals.propose_queued(Raft("b", random.Random(0)))
    proposals.queue(change)
    proposals.propose_queued(leader("a"))  # "a" already is a voter
    with pytest.raises(NotLeaderError):
        await follower.future
    with pytest.raises(ConfigChangeError):
        await change.future


async def test_applied_waiters_and_fail_all() -> None:
    proposals = Proposals()
    soon, later = proposals.wait_applied(3), proposals.wait_applied(9)
    proposals.reached(5)
    assert soon.done() and not later.done()
    queued = Proposal(command=b"x")
    proposals.queue(queued)
    proposals.fail_all(SllmdError("shutting down"))
    assert later.cancelled()
    with pytest.raises(SllmdError):
        await asyncio.wait_for(queued.future, 1)
