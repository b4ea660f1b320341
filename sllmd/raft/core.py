# long: the Raft state machine; every transition reads and writes the same fields (term, role, log, progress),
# so split by role its invariants would span files.
"""The Raft consensus core: pure, synchronous, deterministic (etcd raft's shape).

No sockets, clocks, threads or I/O live here. The shell feeds the core three kinds of input —
`step(message)` for every message from a peer, `tick()` every `tick_ms`, and `propose*()` for writes —
and then drains its output:

    if raft.has_ready():
        ready = raft.ready()
        persist ready.hard_state, ready.truncate_from + ready.entries, ready.snapshot   # ONE fsynced txn
        send ready.messages                          # only after the persist above is durable
        if ready.restore_snapshot: replace the state machine with ready.snapshot.data
        apply ready.committed, in order
        raft.advance(ready)

No input may be given between `ready()` and `advance()` (RuntimeError). Persist-before-send is what lets
a vote or an append acknowledgement mean "durable" (Raft paper §5.1, Figure 2 "Persistent state").

Section references: "§n" is the Raft paper (Ongaro & Ousterhout, USENIX ATC 2014); "thesis §n" is
Ongaro's PhD thesis "Consensus: Bridging Theory and Practice" (2014).

Beyond the paper's Figure 2 this core implements:
- PreVote (thesis §9.6). Before bumping its term, a node whose election timer fired asks the voters
  whether they *would* vote for it at term+1. A node that is partitioned away therefore never raises its
  term, and when it rejoins it cannot depose a stable leader with a higher-term message. Voters refuse
  (pre-)votes while they have heard from a leader within the minimum election timeout (thesis §4.2.3),
  which also stops removed servers from disrupting the cluster.
- Check-quorum (thesis §6.2): a leader that has not heard from a majority of voters within the minimum
  election timeout steps down, so a leader stranded in a minority partition stops accepting writes.
- Fast log backtracking (§5.3, the "optimisation" paragraph): a rejection carries the conflicting term
  and the first index the follower holds of that term, so the leader skips a whole term per round trip.
- Snapshots and log compaction (§7): the state machine's snapshot is opaque bytes given by the shell to
  `compact()`; followers whose next entry was compacted away get it by InstallSnapshot (not chunked).
- Single-server membership changes (thesis §4.1): a CONFIG entry carries the complete new voter set and
  takes effect as soon as it is appended (on every node, committed or not); the leader accepts one only
  after every earlier one is committed and after it has committed an entry of its own term (the fix
  Ongaro posted to raft-dev in 2015). A leader that removes itself keeps replicating without counting
  itself in majorities, and steps down once the removal commits (thesis §4.2.2).

The peer messages and their wire codec live in `sllmd.raft.messages` (import them from there); the log
itself (the entries after the snapshot and their index arithmetic) is a `RaftLog` from `sllmd.raft.log`.
What a node persists, and the `Storage` it goes through, is `sllmd.raft.storage`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from sllmd.raft.log import RaftLog
from sllmd.raft.messages import (
    FROM_LEADER,
    AppendEntries,
    AppendResponse,
    Entry,
    EntryKind,
    Heartbeat,
    HeartbeatResponse,
    InstallSnapshot,
    Message,
    MessageType,
    NodeId,
    Snapshot,
    VoteRequest,
    VoteResponse,
)

__all__ = ["ConfigChangeRejected", "HardState", "NotLeader", "Raft", "RaftConfig", "Ready", "Role", "Status"]


class Role(Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"  # asking for pre-votes; term not yet incremented (thesis §9.6)
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message of the same Ready leaves (Figure 2), plus the commit index."""

    term: int = 0
    voted_for: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Timing in logical ticks (the shell ticks every tick_ms). Election timeouts are drawn uniformly from
    [election_ticks_min, election_ticks_max] (§5.2); the minimum is also the leader-lease and check-quorum
    window (thesis §4.2.3, §6.2)."""

    election_ticks_min: int = 10
    election_ticks_max: int = 20
    heartbeat_ticks: int = 2
    max_entries_per_append: int = 64
    pre_vote: bool = True
    check_quorum: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.heartbeat_ticks < self.election_ticks_min <= self.election_ticks_max:
            raise ValueError("need 1 <= heartbeat_ticks < election_ticks_min <= election_ticks_max")
        if self.max_entries_per_append < 1:
            raise ValueError("max_entries_per_append must be >= 1")


@dataclass(frozen=True, slots=True)
class Ready:
    """The core's output since the last advance(), in the order the shell must process it (module doc).

    Storage contract: if `snapshot` is set, store it and drop persisted entries with index <= its index;
    if `truncate_from` is set, drop persisted entries with index >= truncate_from; then write `entries`
    (contiguous, starting at truncate_from); then `hard_state` if set. All in one durable transaction.
    """

    hard_state: HardState | None = None
    truncate_from: int | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    restore_snapshot: bool = False  # the state machine must be replaced by snapshot.data
    messages: tuple[Message, ...] = ()
    committed: tuple[Entry, ...] = ()  # apply in order; NOOP and CONFIG included (the shell skips NOOPs)

    @property
    def has_state_to_persist(self) -> bool:
        """Whether the storage contract above has anything to write."""
        return (self.hard_state is not None or self.truncate_from is not None or bool(self.entries)
                or self.snapshot is not None)


@dataclass(frozen=True, slots=True)
class NotLeader:
    """A proposal refused because this node is not the leader. `leader_id` is a forwarding hint."""

    leader_id: NodeId | None


@dataclass(frozen=True, slots=True)
class ConfigChangeRejected:
    reason: str


@dataclass(frozen=True, slots=True)
class Status:
    node_id: NodeId
    role: Role
    term: int
    leader_id: NodeId | None
    commit: int
    applied: int
    snapshot_index: int
    last_index: int
    voters: tuple[NodeId, ...]


@dataclass(slots=True)
class _Progress:
    """The leader's view of one follower (Figure 2 nextIndex/matchIndex)."""

    next: int
    match: int = 0
    is_recent_active: bool = False  # heard from since the last check-quorum (thesis §6.2)
    snapshot_wait: int = 0  # ticks before an unanswered InstallSnapshot may be re-sent


# ---------------------------------------------------------------------------------------------- core


class Raft:
    """One node's Raft state machine. Not thread-safe; every method is O(entries touched)."""

    def __init__(self, node_id: NodeId, rng: random.Random, config: RaftConfig | None = None) -> None:
        """An empty node that belongs to no configuration: it never campaigns and waits for a leader
        to add it (a joining node). Use `bootstrap` for a new cluster and `restore` after a restart."""
        self.id = node_id
        self.config = config or RaftConfig()
        self._rng = rng
        self._term = 0
        self._voted_for: NodeId | None = None
        self._commit = 0
        self._applied = 0
        self._log = RaftLog()  # the snapshot and the entries after it
        self._voters: tuple[NodeId, ...] = ()
        self._config_index = 0  # index of the entry (or snapshot) that set self._voters
        self._role = Role.FOLLOWER
        self._leader_id: NodeId | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = 0
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, _Progress] = {}
        self._term_start_index = 0  # index of the leader's no-op
        # Output not yet handed out through a Ready:
        self._outbox: list[Message] = []
        self._unstable_from: int | None = None  # lowest log index changed since the last persist
        self._unsaved_snapshot: Snapshot | None = None
        self._is_restore_pending = False
        self._is_broadcast_pending = False  # coalesces appends from many proposals into one round
        self._saved_hard_state = HardState()
        self._outstanding: Ready | None = None
        self._reset_election_timer()

    @classmethod
    def bootstrap(cls, node_id: NodeId, voters: Iterable[NodeId], rng: random.Random,
                  config: RaftConfig | None = None) -> Raft:
        """A node of a brand-new cluster whose initial voters are `voters` (the same on every member).
        The configuration is an index-0 snapshot, persisted by the first Ready."""
        members = tuple(sorted(set(voters)))
        if not members:
            raise ValueError("bootstrap needs at least one voter")
        node = cls(node_id, rng, config)
        node._unsaved_snapshot = Snapshot(0, 0, members)
        node._log.install_snapshot(node._unsaved_snapshot)
        node._reload_config()
        return node

    @classmethod
    def restore(cls, node_id: NodeId, hard_state: HardState, entries: Sequence[Entry], snapshot: Snapshot | None,
                rng: random.Random, config: RaftConfig | None = None, *, applied: int | None = None) -> Raft:
        """Rebuilds a node from what its storage persisted. `applied` is the state machine's own applied
        index (default: the snapshot's). If it is behind the snapshot, the first Ready asks the shell to
        restore the state machine from the snapshot; committed entries after it are re-delivered."""
        node = cls(node_id, rng, config)
        node._log = RaftLog(snapshot, entries)  # skips entries the snapshot holds; ValueError on a gap
        snapshot_index = node._log.snapshot.index
        node._term, node._voted_for = hard_state.term, hard_state.voted_for
        node._commit = max(hard_state.commit, snapshot_index)
        if node._commit > node.last_index:
            raise ValueError(f"persisted commit {node._commit} is beyond the last entry {node.last_index}")
        state_applied = snapshot_index if applied is None else applied
        if state_applied > node._commit:
            raise ValueError(f"state machine applied {state_applied} is beyond the commit index {node._commit}")
        if state_applied < snapshot_index:
            node._unsaved_snapshot, node._is_restore_pending = node._log.snapshot, True
            state_applied = snapshot_index
        node._applied = state_applied
        node._saved_hard_state = HardState(node._term, node._voted_for, node._commit)
        node._reload_config()
        node._reset_election_timer()
        return node

    # ------------------------------------------------------------------------------------ read state

    @property
    def role(self) -> Role:
        return self._role

    @property
    def term(self) -> int:
        return self._term

    @property
    def voted_for(self) -> NodeId | None:
        return self._voted_for

    @property
    def leader_id(self) -> NodeId | None:
        return self._leader_id

    @property
    def is_leader(self) -> bool:
        return self._role is Role.LEADER

    @property
    def voters(self) -> tuple[NodeId, ...]:
        return self._voters

    @property
    def commit_index(self) -> int:
        return self._commit

    @property
    def applied_index(self) -> int:
        return self._applied

    @property
    def snapshot(self) -> Snapshot:
        return self._log.snapshot

    @property
    def first_index(self) -> int:
        return self._log.first_index

    @property
    def last_index(self) -> int:
        return self._log.last_index

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, or None if compacted away or beyond the log."""
        return self._log.term_at(index)

    def entries(self, lo: int, hi: int) -> tuple[Entry, ...]:
        """Entries with lo <= index <= hi, clipped to what the log holds."""
        return self._log.entries(lo, hi)

    def status(self) -> Status:
        return Status(self.id, self._role, self._term, self._leader_id, self._commit, self._applied,
                      self._log.snapshot.index, self.last_index, self._voters)

    # ---------------------------------------------------------------------------------------- inputs

    def tick(self) -> None:
        """One logical clock tick: election timeout for followers (§5.2), heartbeats and check-quorum for
        the leader (§5.2, thesis §6.2)."""
        self._check_no_outstanding_ready()
        if self._role is Role.LEADER:
            self._tick_leader()
            return
        self._election_elapsed += 1
        if self._election_elapsed >= self._timeout and self.id in self._voters:
            self._campaign(is_pre_vote=self.config.pre_vote)

    def step(self, msg: Message) -> None:
        """Handles one message from a peer. Term rules first (Figure 2 "Rules for Servers")."""
        self._check_no_outstanding_ready()
        if msg.to != self.id or msg.sender == self.id:
            return
        if msg.term > self._term:
            is_vote = msg.type in (MessageType.PRE_VOTE, MessageType.VOTE)
            if is_vote and self._in_lease():
                return  # we hear from a live leader: the asker is partitioned or removed (thesis §4.2.3)
            is_pre_vote_traffic = msg.type is MessageType.PRE_VOTE or (
                isinstance(msg, VoteResponse) and msg.type is MessageType.PRE_VOTE_RESPONSE and msg.granted)
            if not is_pre_vote_traffic:  # a PreVote changes nothing on either side (thesis §9.6)
                self._become_follower(msg.term, msg.sender if msg.type in FROM_LEADER else None)
        elif msg.term < self._term:
            self._answer_stale(msg)
            return
        match msg:
            case VoteRequest():
                self._on_vote_request(msg)
            case VoteResponse():
                self._on_vote_response(msg)
            case AppendEntries():
                self._on_append(msg)
            case AppendResponse():
                self._on_append_response(msg)
            case Heartbeat():
                self._on_heartbeat(msg)
            case HeartbeatResponse():
                self._on_heartbeat_response(msg)
            case InstallSnapshot():
                self._on_snapshot(msg)

    def propose(self, command: bytes) -> int | NotLeader:
        """Appends a command on the leader and returns its index; it is applied once it appears in
        `Ready.committed` (it may still be lost if leadership changes first: the shell retries)."""
        self._check_no_outstanding_ready()
        if self._role is not Role.LEADER or self.id not in self._voters:
            return NotLeader(None if self._role is Role.LEADER else self._leader_id)
        return self._leader_append(EntryKind.COMMAND, data=bytes(command))

    def propose_add_node(self, node_id: NodeId) -> int | NotLeader | ConfigChangeRejected:
        """Adds a voter (thesis §4.1). It catches up by AppendEntries or InstallSnapshot."""
        if self._role is Role.LEADER and node_id in self._voters:
            return ConfigChangeRejected(f"{node_id} is already a voter")
        return self._propose_config((*self._voters, node_id))

    def propose_remove_node(self, node_id: NodeId) -> int | NotLeader | ConfigChangeRejected:
        """Removes a voter, possibly the leader itself (it steps down once the removal commits)."""
        if self._role is Role.LEADER and node_id not in self._voters:
            return ConfigChangeRejected(f"{node_id} is not a voter")
        if self._role is Role.LEADER and self._voters == (node_id,):
            return ConfigChangeRejected("cannot remove the last voter")
        return self._propose_config(tuple(v for v in self._voters if v != node_id))

    def compact(self, index: int, data: bytes) -> None:
        """Log compaction (§7): `data` is the state machine's snapshot as of applied index `index`.
        Entries up to `index` are dropped; the next Ready carries the snapshot to persist."""
        self._check_no_outstanding_ready()
        if index <= self._log.snapshot.index:
            return
        if index > self._applied:
            raise ValueError(f"cannot compact to {index}: only {self._applied} is applied")
        self._unsaved_snapshot = self._log.compact(index, data)

    # ---------------------------------------------------------------------------------------- output

    def has_ready(self) -> bool:
        return bool(self._outbox or self._is_broadcast_pending or self._unstable_from is not None
                    or self._unsaved_snapshot is not None or self._applied < self._commit
                    or self._hard_state() != self._saved_hard_state)

    def ready(self) -> Ready:
        """Everything to persist, send and apply since the last advance(). Call advance() next."""
        self._check_no_outstanding_ready()
        if self._is_broadcast_pending:
            self._is_broadcast_pending = False
            if self._role is Role.LEADER:
                self._broadcast_append()
        hard_state = self._hard_state()
        truncate_from, entries = None, ()
        if self._unstable_from is not None:
            truncate_from = max(self._unstable_from, self.first_index)
            entries = self.entries(truncate_from, self.last_index)
        ready = Ready(
            hard_state=None if hard_state == self._saved_hard_state else hard_state,
            truncate_from=truncate_from,
            entries=entries,
            snapshot=self._unsaved_snapshot,
            restore_snapshot=self._is_restore_pending,
            messages=tuple(self._outbox),
            committed=self.entries(self._applied + 1, self._commit),
        )
        self._outstanding = ready
        return ready

    def advance(self, ready: Ready) -> None:
        """Acknowledges that `ready` was persisted, sent and applied."""
        if ready is not self._outstanding:
            raise RuntimeError("advance() must be given the Ready returned by the last ready()")
        self._outstanding = None
        if ready.hard_state is not None:
            self._saved_hard_state = ready.hard_state
        self._unstable_from = None
        self._unsaved_snapshot = None
        self._is_restore_pending = False
        self._outbox = []
        if ready.committed:
            self._applied = ready.committed[-1].index

    # -------------------------------------------------------------------------------- elections §5.2

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        for progress in self._progress.values():
            progress.snapshot_wait = max(0, progress.snapshot_wait - 1)
        if self._election_elapsed >= self.config.election_ticks_min:
            self._election_elapsed = 0
            if self.config.check_quorum and not self._is_quorum_active():
                self._become_follower(self._term, None)  # thesis §6.2: we may be in a minority partition
                return
            for progress in self._progress.values():
                progress.is_recent_active = False
        if self._heartbeat_elapsed >= self.config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            for peer, progress in self._progress.items():
                self._send(Heartbeat(sender=self.id, to=peer, term=self._term,
                                     commit=min(progress.match, self._commit)))

    def _is_quorum_active(self) -> bool:
        active = sum(1 for v in self._voters if v == self.id or self._progress[v].is_recent_active)
        return active > len(self._voters) // 2

    def _in_lease(self) -> bool:
        """True while we believe a leader is alive: heard from one within the minimum election timeout.
        A leader resets its own counter every check-quorum window, so it is always in its lease."""
        return self._leader_id is not None and self._election_elapsed < self.config.election_ticks_min

    def _campaign(self, *, is_pre_vote: bool) -> None:
        if is_pre_vote:
            self._role, term, mtype = Role.PRE_CANDIDATE, self._term + 1, MessageType.PRE_VOTE
        else:
            self._term += 1
            self._voted_for = self.id
            self._role, term, mtype = Role.CANDIDATE, self._term, MessageType.VOTE
        self._leader_id = None
        self._votes = {self.id: True}
        self._reset_election_timer()
        last_index, last_term = self.last_index, self._log.last_term
        for peer in self._voters:
            if peer != self.id:
                self._send(VoteRequest(type=mtype, sender=self.id, to=peer, term=term,
                                       last_index=last_index, last_term=last_term))
        self._tally_votes()

    def _on_vote_request(self, msg: VoteRequest) -> None:
        is_pre_vote = msg.type is MessageType.PRE_VOTE
        # §5.4.1 election restriction: the candidate's log must be at least as up-to-date as ours.
        is_up_to_date = (msg.last_term, msg.last_index) >= (self._log.last_term, self.last_index)
        # A PreVote only needs a later term (the lease was checked in step()); a vote is one per term (§5.2).
        can_vote = msg.term > self._term if is_pre_vote else self._voted_for in (None, msg.sender)
        is_granted = can_vote and is_up_to_date
        if is_granted and not is_pre_vote:
            self._voted_for = msg.sender  # durable before the response leaves (Ready order)
            self._election_elapsed = 0  # Figure 2: granting a vote resets the election timer
        self._send(VoteResponse(
            type=MessageType.PRE_VOTE_RESPONSE if is_pre_vote else MessageType.VOTE_RESPONSE,
            sender=self.id, to=msg.sender, term=msg.term if is_granted else self._term, granted=is_granted))

    def _on_vote_response(self, msg: VoteResponse) -> None:
        if msg.type is MessageType.PRE_VOTE_RESPONSE:
            if self._role is not Role.PRE_CANDIDATE or (msg.granted and msg.term != self._term + 1):
                return
        elif self._role is not Role.CANDIDATE:
            return
        if msg.sender in self._voters:
            self._votes.setdefault(msg.sender, msg.granted)  # duplicates must not count twice
        self._tally_votes()

    def _tally_votes(self) -> None:
        num_granted = sum(1 for v in self._voters if self._votes.get(v) is True)
        num_refused = sum(1 for v in self._voters if self._votes.get(v) is False)
        majority = len(self._voters) // 2 + 1
        if num_granted >= majority:
            if self._role is Role.PRE_CANDIDATE:
                self._campaign(is_pre_vote=False)
            else:
                self._become_leader()
        elif num_refused >= majority:
            self._become_follower(self._term, None)

    def _become_follower(self, term: int, leader_id: NodeId | None) -> None:
        assert term >= self._term
        if term > self._term:
            self._term, self._voted_for = term, None
        self._role = Role.FOLLOWER
        self._leader_id = leader_id
        self._progress = {}
        self._votes = {}
        self._reset_election_timer()

    def _become_leader(self) -> None:
        self._role = Role.LEADER
        self._leader_id = self.id
        self._votes = {}
        self._election_elapsed = self._heartbeat_elapsed = 0
        self._progress = {p: _Progress(next=self.last_index + 1) for p in self._voters if p != self.id}
        # §5.4.2 / §8: a leader may only count replicas for entries of its own term, so it appends a
        # no-op at once; committing it commits every earlier entry too.
        self._term_start_index = self._leader_append(EntryKind.NOOP)

    def _follow(self, leader_id: NodeId) -> None:
        """A message from the leader of our current term: follow it and restart the election timer."""
        assert self._role is not Role.LEADER, "two leaders in one term"
        if self._role is not Role.FOLLOWER or self._leader_id != leader_id:
            self._become_follower(self._term, leader_id)
        else:
            self._election_elapsed = 0

    def _answer_stale(self, msg: Message) -> None:
        """A request from an older term gets our term back, so a deposed leader or a lagging candidate
        catches up at once (Figure 2: "if RPC request or response contains term T > currentTerm...")."""
        if msg.type in FROM_LEADER:
            self._send(AppendResponse(sender=self.id, to=msg.sender, term=self._term, success=False))
        elif msg.type in (MessageType.PRE_VOTE, MessageType.VOTE):
            response_type = (MessageType.PRE_VOTE_RESPONSE if msg.type is MessageType.PRE_VOTE
                             else MessageType.VOTE_RESPONSE)
            self._send(VoteResponse(type=response_type, sender=self.id, to=msg.sender, term=self._term,
                                    granted=False))

    # ------------------------------------------------------------------------- replication §5.3, §7

    def _leader_append(self, kind: EntryKind, data: bytes = b"", voters: tuple[NodeId, ...] = ()) -> int:
        index = self.last_index + 1
        self._append([Entry(index, self._term, kind, data, voters)])
        self._is_broadcast_pending = True  # sent at ready(): many proposals share one round
        self._maybe_commit()  # a single-voter cluster commits at once
        return index

    def _broadcast_append(self) -> None:
        for peer in self._progress:
            self._send_append(peer)
        if self._commit >= self._config_index:
            # Nodes just removed got this last round (which normally carries their removal, so they stop
            # campaigning); from now on the leader leaves them alone.
            for peer in [p for p in self._progress if p not in self._voters]:
                del self._progress[peer]

    def _send_append(self, peer: NodeId) -> None:
        progress = self._progress[peer]
        prev_index = progress.next - 1
        prev_term = self.term_at(prev_index)
        if prev_term is None:  # the entries this follower needs were compacted away (§7)
            if progress.snapshot_wait == 0:
                progress.snapshot_wait = self.config.election_ticks_max
                self._send(InstallSnapshot(sender=self.id, to=peer, term=self._term, snapshot=self._log.snapshot))
            return
        last = min(self.last_index, prev_index + self.config.max_entries_per_append)
        self._send(AppendEntries(sender=self.id, to=peer, term=self._term, prev_index=prev_index,
                                 prev_term=prev_term, entries=self.entries(prev_index + 1, last),
                                 commit=self._commit))

    def _on_append(self, msg: AppendEntries) -> None:
        self._follow(msg.sender)
        prev_index, prev_term, entries = msg.prev_index, msg.prev_term, msg.entries
        if prev_index < self._commit:
            # Our committed prefix already equals the leader's (Leader Completeness, §5.4): skip it.
            skip = self._commit - prev_index
            if skip >= len(entries):
                self._send(AppendResponse(sender=self.id, to=msg.sender, term=self._term, success=True,
                                          match_index=self._commit))
                return
            prev_index, prev_term, entries = self._commit, entries[skip - 1].term, entries[skip:]
        if self.term_at(prev_index) != prev_term:  # §5.3 consistency check
            self._send(self._rejection(msg.sender, prev_index))
            return
        for k, entry in enumerate(entries):
            existing_term = self.term_at(entry.index)
            if existing_term == entry.term:
                continue  # already have it (a duplicate or reordered append)
            if existing_term is not None:
                self._truncate(entry.index)  # §5.3: delete the conflicting entry and all that follow
            self._append(entries[k:])
            break
        last_new_index = prev_index + len(entries)
        if msg.commit > self._commit:  # Figure 2: min(leaderCommit, index of last new entry)
            self._commit = max(self._commit, min(msg.commit, last_new_index))
        self._send(AppendResponse(sender=self.id, to=msg.sender, term=self._term, success=True,
                                  match_index=last_new_index))

    def _rejection(self, leader: NodeId, prev_index: int) -> AppendResponse:
        if prev_index > self.last_index:
            conflict_term, conflict_index = 0, self.last_index + 1
        else:
            conflict_term = self.term_at(prev_index)
            assert conflict_term is not None  # prev_index > commit >= snapshot index here
            conflict_index = prev_index
            while conflict_index - 1 > self._commit and self.term_at(conflict_index - 1) == conflict_term:
                conflict_index -= 1
        return AppendResponse(sender=self.id, to=leader, term=self._term, success=False, reject_index=prev_index,
                              conflict_term=conflict_term, conflict_index=conflict_index)

    def _on_append_response(self, msg: AppendResponse) -> None:
        progress = self._progress.get(msg.sender) if self._role is Role.LEADER else None
        if progress is None:
            return
        progress.is_recent_active = True
        if msg.success:
            if msg.match_index <= progress.match:
                return  # a duplicate or reordered answer; heartbeats drive any retransmission
            progress.match = msg.match_index
            progress.next = max(progress.next, msg.match_index + 1)
            progress.snapshot_wait = 0
            self._maybe_commit()
            if self._role is Role.LEADER and progress.next <= self.last_index:
                self._send_append(msg.sender)  # stream the rest of the backlog
            return
        if msg.reject_index != progress.next - 1 or msg.reject_index <= progress.match:
            return  # a stale rejection (duplicated or reordered); the current probe will be answered
        progress.next = max(progress.match + 1, min(self._backtrack(msg), progress.next - 1))
        self._send_append(msg.sender)

    def _backtrack(self, msg: AppendResponse) -> int:
        """The next index to try after a rejection: skip the follower's whole conflicting term (§5.3)."""
        if msg.conflict_term == 0:
            return msg.conflict_index
        index = min(msg.reject_index, self.last_index)
        while index > self._log.snapshot.index:
            term = self.term_at(index)
            assert term is not None
            if term == msg.conflict_term:
                return index + 1  # we hold that term too: resume right after our last entry of it
            if term < msg.conflict_term:
                break  # terms only grow along the log, so we hold none of it
            index -= 1
        return msg.conflict_index

    def _on_heartbeat(self, msg: Heartbeat) -> None:
        self._follow(msg.sender)
        self._commit = max(self._commit, min(msg.commit, self.last_index))
        self._send(HeartbeatResponse(sender=self.id, to=msg.sender, term=self._term))

    def _on_heartbeat_response(self, msg: HeartbeatResponse) -> None:
        progress = self._progress.get(msg.sender) if self._role is Role.LEADER else None
        if progress is None:
            return
        progress.is_recent_active = True
        if progress.match < self.last_index:
            self._send_append(msg.sender)  # retransmission of lost appends rides on the heartbeat

    def _on_snapshot(self, msg: InstallSnapshot) -> None:
        self._follow(msg.sender)
        snapshot = msg.snapshot
        if snapshot.index <= self._commit:
            match_index = self._commit  # nothing new in it
        elif self.term_at(snapshot.index) == snapshot.term:
            # §7: our log already holds the snapshot's last entry, so it matches the leader up to there;
            # keep the suffix and let those entries apply normally.
            self._commit = match_index = snapshot.index
        else:
            # §7: discard the entire log and the state machine; both restart from the snapshot.
            self._log.install_snapshot(snapshot)
            self._unsaved_snapshot = snapshot
            self._commit = self._applied = match_index = snapshot.index
            self._unstable_from = snapshot.index + 1  # storage drops every entry past it
            self._is_restore_pending = True
            self._reload_config()
        self._send(AppendResponse(sender=self.id, to=msg.sender, term=self._term, success=True,
                                  match_index=match_index))

    def _maybe_commit(self) -> None:
        """Commit the highest index stored on a majority of voters, only if it is of the current term
        (§5.4.2, Figure 8). The leader counts its own unpersisted entries: they are persisted in the same
        Ready transaction, before any message that reveals the new commit index is sent."""
        matches = sorted((self.last_index if v == self.id else self._progress[v].match for v in self._voters),
                         reverse=True)
        if not matches:
            return
        candidate = matches[len(matches) // 2]
        if candidate <= self._commit or self.term_at(candidate) != self._term:
            return
        self._commit = candidate
        self._is_broadcast_pending = True  # tell the followers promptly
        if self.id not in self._voters and self._commit >= self._config_index:
            self._broadcast_append()  # our removal is committed: hand over the final commit index...
            self._become_follower(self._term, None)  # ...and step down (thesis §4.2.2)

    # ----------------------------------------------------------------------- membership, thesis §4

    def _propose_config(self, voters: tuple[NodeId, ...]) -> int | NotLeader | ConfigChangeRejected:
        self._check_no_outstanding_ready()
        if self._role is not Role.LEADER:
            return NotLeader(self._leader_id)
        if self._config_index > self._commit:
            return ConfigChangeRejected("another configuration change is not yet committed")
        if self._commit < self._term_start_index:
            # A new leader's log may end in an uncommitted config entry of an earlier term; changing the
            # configuration on top of it could produce two disjoint majorities (raft-dev, 2015).
            return ConfigChangeRejected("the leader has not yet committed an entry of its term")
        return self._leader_append(EntryKind.CONFIG, voters=tuple(sorted(voters)))

    def _append(self, entries: Sequence[Entry]) -> None:
        """Appends entries that directly follow the log. Config entries take effect now (thesis §4.1)."""
        if not entries:
            return
        assert entries[0].index == self.last_index + 1
        self._log.append(entries)
        self._mark_unstable(entries[0].index)
        for entry in entries:
            if entry.kind is EntryKind.CONFIG:
                self._set_voters(entry.voters, entry.index)

    def _truncate(self, index: int) -> None:
        assert index > self._commit, "never truncate a committed entry"
        self._log.truncate(index)
        self._mark_unstable(index)
        if self._config_index >= index:
            self._reload_config()  # we dropped an uncommitted config entry: the one before it rules again

    def _mark_unstable(self, index: int) -> None:
        self._unstable_from = index if self._unstable_from is None else min(self._unstable_from, index)

    def _reload_config(self) -> None:
        self._set_voters(*self._log.config_at(self.last_index))

    def _set_voters(self, voters: tuple[NodeId, ...], index: int) -> None:
        self._voters, self._config_index = voters, index
        if self._role is not Role.LEADER:
            return
        for peer in voters:
            if peer != self.id and peer not in self._progress:
                # Grace for check-quorum: a brand-new member has had no chance to answer yet.
                self._progress[peer] = _Progress(next=self.last_index + 1, is_recent_active=True)
        # A removed peer keeps its progress (but no say in quorums) until the removal commits, so that
        # it normally receives the entry that removes it; _broadcast_append() then drops it.

    # --------------------------------------------------------------------------------------- helpers

    def _hard_state(self) -> HardState:
        return HardState(self._term, self._voted_for, self._commit)

    def _reset_election_timer(self) -> None:
        self._election_elapsed = 0
        self._timeout = self._rng.randint(self.config.election_ticks_min, self.config.election_ticks_max)

    def _send(self, msg: Message) -> None:
        self._outbox.append(msg)

    def _check_no_outstanding_ready(self) -> None:
        if self._outstanding is not None:
            raise RuntimeError("call advance() for the outstanding Ready before giving the core more input")
