"""A deterministic simulation of a Raft cluster: pure cores, a lossy network, crashes and restarts.

One seeded `random.Random` drives everything (each core gets its own, seeded from it), and every
collection is iterated in a fixed order, so a seed replays exactly. Time is logical: `tick()` ticks every
live core once, then delivers every message due by now (a delay of 0 arrives within the same tick).

Each node is run the way the real shell runs it: after every input its Ready is saved to its `Storage`
(a `MemoryStorage` unless `storage_factory` says otherwise), then its messages go on the wire, then its
committed entries are applied to a toy state machine. A crash drops the core and the state machine and
keeps only the storage; `crash_prob` also crashes nodes in the middle of a Ready (before persisting it,
or after persisting but before sending), which is where a persist-before-send bug would show.

`SafetyChecker` asserts the Raft paper's Figure 3 properties after every delivered message, every Ready
and every tick (see its docstring); any violation raises AssertionError at the step that caused it.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable, Iterable

import msgpack

from sllmd.raft.core import ConfigChangeRejected, HardState, NotLeader, Raft, RaftConfig, Ready, Role
from sllmd.raft.messages import AppendResponse, Entry, EntryKind, Message, Snapshot
from sllmd.raft.storage import MemoryStorage, Storage

MAX_DELIVERIES_PER_TICK = 100_000  # a message storm is a bug, not a workload


class SimNode:
    """One server: its core (None while crashed), its storage, and a volatile toy state machine."""

    def __init__(self, node_id: str, storage: Storage) -> None:
        self.id = node_id
        self.storage = storage
        self.raft: Raft | None = None
        self.applied_index = 0
        self.state: dict[int, tuple[int, int, bytes]] = {}  # index -> (term, kind, data) of applied entries

    @property
    def is_up(self) -> bool:
        return self.raft is not None

    def commands(self) -> list[bytes]:
        """The COMMAND entries applied so far, in index order."""
        return [data for _, (_, kind, data) in sorted(self.state.items()) if kind == EntryKind.COMMAND.value]

    def state_snapshot(self) -> bytes:
        return msgpack.packb([[i, t, k, d] for i, (t, k, d) in sorted(self.state.items())], use_bin_type=True)

    def load_state(self, data: bytes) -> None:
        self.state = {i: (t, k, d) for i, t, k, d in msgpack.unpackb(data, raw=False)} if data else {}


class SafetyChecker:
    """Raft's safety properties (Figure 3), checked incrementally so every step can afford them.

    - Election Safety: at most one leader per term, ever (across crashes too).
    - Log Matching: (index, term) names one entry cluster-wide, with one content and one predecessor
      term; by induction two logs sharing (index, term) are identical up to it. Every entry a node
      persists, and every entry every live core holds (each tick), is checked against that registry.
    - Leader Completeness: a node that becomes leader holds every entry any node has seen committed.
    - State Machine Safety: no two nodes apply different entries at one index (snapshots included).
    - Applied prefix monotonic: within one incarnation a node applies index applied+1 next, its commit
      never decreases, and committed (index, term) pairs never change.
    - Durability bookkeeping: after each Ready a core's log and hard state equal what its storage holds.
    """

    def __init__(self) -> None:
        self.leader_by_term: dict[int, str] = {}
        self.entry_by_id: dict[tuple[int, int], tuple[int, bytes, tuple[str, ...], int | None]] = {}
        self.committed_term: dict[int, int] = {}
        self.applied: dict[int, tuple[int, int, bytes]] = {}
        self.commit_seen: dict[str, int] = {}
        self.num_checks = 0

    def register(self, entry: Entry, prev_term: int | None) -> None:
        key = (entry.index, entry.term)
        value = (entry.kind.value, entry.data, entry.voters, prev_term)
        known = self.entry_by_id.setdefault(key, value)
        assert known == value, f"Log Matching violated at {key}: {known} != {value}"

    def on_persist(self, raft: Raft, ready: Ready) -> None:
        for entry in ready.entries:
            self.register(entry, raft.term_at(entry.index - 1))

    def on_restart(self, node: SimNode) -> None:
        assert node.raft is not None
        self.commit_seen[node.id] = node.raft.commit_index
        node.applied_index = 0
        node.state = {}

    def on_restore_state(self, node: SimNode, snapshot: Snapshot) -> None:
        assert snapshot.index >= node.applied_index, "a snapshot moved the state machine backwards"
        node.applied_index = snapshot.index
        for index, value in node.state.items():
            known = self.applied.setdefault(index, value)
            assert known == value, f"State Machine Safety violated by a snapshot at {index}"

    def on_apply(self, node: SimNode, entry: Entry) -> None:
        assert entry.index == node.applied_index + 1, f"{node.id} applied {entry.index} after {node.applied_index}"
        node.applied_index = entry.index
        value = (entry.term, entry.kind.value, entry.data)
        known = self.applied.setdefault(entry.index, value)
        assert known == value, f"State Machine Safety violated at {entry.index}: {known} != {value}"
        assert self.committed_term.get(entry.index, entry.term) == entry.term

    def on_node_state(self, node: SimNode) -> None:
        raft = node.raft
        assert raft is not None
        self.num_checks += 1
        if raft.role is Role.LEADER:
            leader = self.leader_by_term.setdefault(raft.term, node.id)
            assert leader == node.id, f"Election Safety violated: {leader} and {node.id} lead term {raft.term}"
        seen = self.commit_seen.get(node.id, 0)
        assert raft.commit_index >= seen, f"{node.id} commit went back from {seen} to {raft.commit_index}"
        for index in range(max(seen + 1, raft.snapshot.index), raft.commit_index + 1):
            term = raft.term_at(index)
            assert term is not None
            known = self.committed_term.setdefault(index, term)
            assert known == term, f"committed entry {index} changed term {known} -> {term} on {node.id}"
        self.commit_seen[node.id] = raft.commit_index

    def on_new_leader(self, node: SimNode) -> None:
        raft = node.raft
        assert raft is not None
        for index, term in self.committed_term.items():
            if index >= raft.snapshot.index:
                assert raft.term_at(index) == term, (
                    f"Leader Completeness violated: leader {node.id} (term {raft.term}) lacks committed {index}")

    def check_node(self, node: SimNode) -> None:
        """Full per-node check: the core's log against the registry and against its storage."""
        raft = node.raft
        assert raft is not None
        entries = raft.entries(raft.first_index, raft.last_index)
        prev_term = raft.snapshot.term
        for entry in entries:
            self.register(entry, prev_term)
            prev_term = entry.term
        saved = node.storage.load()
        assert (saved.snapshot.index if saved.snapshot else 0) == raft.snapshot.index
        assert saved.entries == entries, f"{node.id}: persisted log differs from the core's log"
        assert saved.hard_state == HardState(raft.term, raft.voted_for, raft.commit_index), f"{node.id}: hard state"


class Sim:
    """N Raft cores on a simulated network. Node ids are "n1".."nN" unless given."""

    def __init__(self, num_nodes: int = 3, *, seed: int = 0, config: RaftConfig | None = None,
                 ids: Iterable[str] | None = None, storages: dict[str, Storage] | None = None,
                 compact_every: int = 0,
                 storage_factory: Callable[[str], Storage] = lambda node_id: MemoryStorage()) -> None:
        self.rng = random.Random(seed)
        self.config = config or RaftConfig()
        self.now = 0
        # Network faults: set these attributes directly.
        self.drop_prob = 0.0
        self.duplicate_prob = 0.0
        self.max_delay = 0  # ticks; messages with different delays overtake each other
        self.reorder = False  # also shuffle messages due in the same tick
        self.crash_prob = 0.0  # per Ready: crash before persisting it, or after persisting it but before sending
        # Returns what the network delivers instead (a copy, possibly altered) or None to lose it.
        self.message_filter: Callable[[Message], Message | None] | None = None
        self.compact_every = compact_every  # snapshot a node's state machine every this many applied entries
        self.checker = SafetyChecker()
        self.num_delivered: Counter[str] = Counter()  # by MessageType value
        self.rejections: Counter[tuple[str, str]] = Counter()  # (leader, follower): AppendEntries refused
        self._queue: list[tuple[int, float, int, Message]] = []
        self._seq = 0
        self._group: dict[str, int] = {}
        self._storage_factory = storage_factory
        self.nodes: dict[str, SimNode] = {}
        node_ids = list(ids) if ids is not None else [f"n{i}" for i in range(1, num_nodes + 1)]
        for node_id in node_ids:
            if storages and node_id in storages:
                self.nodes[node_id] = SimNode(node_id, storages[node_id])
                self._register_saved(storages[node_id])
                self.restart(node_id)
            else:
                node = self.nodes[node_id] = SimNode(node_id, storage_factory(node_id))
                node.raft = Raft.bootstrap(node_id, node_ids, self._core_rng(), self.config)
                self.checker.on_restart(node)
            self._group[node_id] = 0
        for node_id in node_ids:
            self._process(self.nodes[node_id])

    # ------------------------------------------------------------------------------ faults & nodes

    def add_node(self, node_id: str) -> None:
        """A brand-new, empty server (not yet a member: a leader must propose_add_node it)."""
        node = self.nodes[node_id] = SimNode(node_id, self._storage_factory(node_id))
        node.raft = Raft(node_id, self._core_rng(), self.config)
        self.checker.on_restart(node)
        self._group[node_id] = 0

    def crash(self, node_id: str) -> None:
        """Loses everything the node did not persist through a Ready (its core and state machine)."""
        node = self.nodes[node_id]
        node.raft = None
        node.state, node.applied_index = {}, 0

    def restart(self, node_id: str) -> None:
        """Restores the core from the node's storage; the state machine restarts empty (applied=0), so
        the first Ready restores it from the snapshot and re-delivers the committed entries after it."""
        node = self.nodes[node_id]
        assert node.raft is None, f"{node_id} is running"
        saved = node.storage.load()
        node.raft = Raft.restore(node_id, saved.hard_state, saved.entries, saved.snapshot, self._core_rng(),
                                 self.config, applied=0)
        self.checker.on_restart(node)
        self._process(node)

    def drop(self, prob: float) -> None:
        """Lose each message with probability `prob`."""
        self.drop_prob = prob

    def duplicate(self, prob: float) -> None:
        """Deliver each message twice (each copy with its own delay) with probability `prob`."""
        self.duplicate_prob = prob

    def delay(self, max_ticks: int, *, reorder: bool = False) -> None:
        """Delay each message by 0..max_ticks ticks; with `reorder`, shuffle messages due together too."""
        self.max_delay, self.reorder = max_ticks, reorder

    def reliable(self) -> None:
        """No more drops, duplicates, delays or mid-Ready crashes (partitions stay as they are)."""
        self.drop_prob = self.duplicate_prob = self.crash_prob = 0.0
        self.max_delay, self.reorder = 0, False

    def partition(self, *groups: Iterable[str]) -> None:
        """Only nodes in the same group can talk; a node in no group is cut off from everyone."""
        for i, node_id in enumerate(sorted(self.nodes)):
            self._group[node_id] = -1 - i
        for g, group in enumerate(groups):
            for node_id in group:
                self._group[node_id] = g

    def isolate(self, node_id: str) -> None:
        self._group[node_id] = -1 - sorted(self.nodes).index(node_id)

    def heal(self) -> None:
        for node_id in self.nodes:
            self._group[node_id] = 0

    def connected(self, a: str, b: str) -> bool:
        return self._group.get(a, -1) == self._group.get(b, -2)

    # ----------------------------------------------------------------------------------- driving

    def tick(self) -> None:
        self.now += 1
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            if node.raft is not None:
                node.raft.tick()
                self._process(node)
        self._deliver_due()
        for node_id in sorted(self.nodes):
            node = self.nodes[node_id]
            if node.raft is not None:
                self.checker.check_node(node)

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def run_until(self, predicate: Callable[[], bool], max_ticks: int) -> bool:
        for _ in range(max_ticks):
            if predicate():
                return True
            self.tick()
        return predicate()

    # ----------------------------------------------------------------------------------- queries

    def up(self) -> list[str]:
        return [n for n in sorted(self.nodes) if self.nodes[n].is_up]

    def raft(self, node_id: str) -> Raft:
        raft = self.nodes[node_id].raft
        assert raft is not None, f"{node_id} is down"
        return raft

    def leaders(self) -> list[str]:
        return [n for n in self.up() if self.raft(n).role is Role.LEADER]

    def stable_leader(self) -> str | None:
        """A leader that a majority of its voters (itself included) currently follow and can reach."""
        for leader in self.leaders():
            raft = self.raft(leader)
            followers = [v for v in raft.voters if v in self.nodes and self.nodes[v].raft is not None
                         and self.connected(leader, v) and self.raft(v).term == raft.term
                         and self.raft(v).leader_id == leader]
            if len(followers) > len(raft.voters) // 2:
                return leader
        return None

    def wait_leader(self, max_ticks: int = 400) -> str:
        assert self.run_until(lambda: self.stable_leader() is not None, max_ticks), "no leader elected"
        leader = self.stable_leader()
        assert leader is not None
        return leader

    def propose(self, command: bytes, node_id: str | None = None) -> int | None:
        """Proposes on `node_id` or on the stable leader; the log index, or None if refused."""
        target = node_id or self.stable_leader()
        if target is None or self.nodes[target].raft is None:
            return None
        result = self.raft(target).propose(command)
        self._process(self.nodes[target])
        return result if isinstance(result, int) else None

    def add_voter(self, node_id: str) -> int | NotLeader | ConfigChangeRejected:
        return self._change_config(lambda raft: raft.propose_add_node(node_id))

    def remove_voter(self, node_id: str) -> int | NotLeader | ConfigChangeRejected:
        return self._change_config(lambda raft: raft.propose_remove_node(node_id))

    def _change_config(self, change: Callable[[Raft], int | NotLeader | ConfigChangeRejected]
                       ) -> int | NotLeader | ConfigChangeRejected:
        leader = self.stable_leader() or (self.leaders() or [None])[0]
        if leader is None:
            return NotLeader(None)
        result = change(self.raft(leader))
        self._process(self.nodes[leader])
        return result

    def num_applied(self, command: bytes) -> int:
        """How many live nodes have applied `command`."""
        return sum(1 for n in self.up() if command in self.nodes[n].commands())

    def commit(self, command: bytes, *, expected: int | None = None, max_ticks: int = 1000,
               retry_ticks: int = 60) -> None:
        """Like 6.5840's `one()`: propose through whichever node leads (retrying after leader changes)
        until `expected` live nodes (default: all) have applied it."""
        want = len(self.up()) if expected is None else expected
        deadline = self.now + max_ticks
        while self.now < deadline:
            if self.propose(command) is not None:
                if self.run_until(lambda: self.num_applied(command) >= want, retry_ticks):
                    return
            else:
                self.tick()
        raise AssertionError(f"{command!r} was not applied on {want} nodes within {max_ticks} ticks")

    # ---------------------------------------------------------------------------------- internals

    def _core_rng(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def _register_saved(self, storage: Storage) -> None:
        saved = storage.load()
        prev_term = saved.snapshot.term if saved.snapshot else 0
        for entry in saved.entries:
            self.checker.register(entry, prev_term)
            prev_term = entry.term

    def _send(self, msg: Message) -> None:
        if not self.connected(msg.sender, msg.to) or self.rng.random() < self.drop_prob:
            return
        if self.message_filter is not None:
            filtered = self.message_filter(msg)
            if filtered is None:
                return
            msg = filtered
        copies = 2 if self.rng.random() < self.duplicate_prob else 1
        for _ in range(copies):
            delay = self.rng.randint(0, self.max_delay) if self.max_delay else 0
            self._seq += 1
            order = self.rng.random() if self.reorder else 0.0
            heapq.heappush(self._queue, (self.now + delay, order, self._seq, msg))

    def _deliver_due(self) -> None:
        num_delivered = 0
        while self._queue and self._queue[0][0] <= self.now:
            msg = heapq.heappop(self._queue)[3]
            node = self.nodes.get(msg.to)
            if node is None or node.raft is None or not self.connected(msg.sender, msg.to):
                continue
            num_delivered += 1
            assert num_delivered < MAX_DELIVERIES_PER_TICK, "message storm"
            self.num_delivered[msg.type.value] += 1
            if isinstance(msg, AppendResponse) and not msg.success and msg.conflict_index > 0:
                self.rejections[(msg.to, msg.sender)] += 1
            node.raft.step(msg)
            self._process(node)

    def _process(self, node: SimNode) -> None:
        """Drains one Ready the way the shell does: persist, send, restore/apply, advance."""
        raft = node.raft
        if raft is None or not raft.has_ready():
            return
        was_leader = raft.role is Role.LEADER and self.checker.leader_by_term.get(raft.term) == node.id
        ready = raft.ready()
        if self.crash_prob and self.rng.random() < self.crash_prob:
            if self.rng.random() < 0.5:
                node.storage.save(ready)  # persisted, then crashed before sending anything
                self.checker.on_persist(raft, ready)
            self.crash(node.id)
            return
        node.storage.save(ready)
        self.checker.on_persist(raft, ready)
        for msg in ready.messages:
            self._send(msg)
        if ready.restore_snapshot:
            assert ready.snapshot is not None
            node.load_state(ready.snapshot.data)
            self.checker.on_restore_state(node, ready.snapshot)
        for entry in ready.committed:
            node.state[entry.index] = (entry.term, entry.kind.value, entry.data)
            self.checker.on_apply(node, entry)
        raft.advance(ready)
        self.checker.on_node_state(node)
        if raft.role is Role.LEADER and not was_leader:
            self.checker.on_new_leader(node)
        if self.compact_every and raft.applied_index - raft.snapshot.index >= self.compact_every:
            raft.compact(raft.applied_index, node.state_snapshot())
            self._process(node)
