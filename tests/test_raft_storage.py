"""Raft storage: the `Storage` contract, run against `MemoryStorage` and `LmdbStorage` (the node's, in its LMDB
environment), then LmdbStorage's own guarantees (key order, crash atomicity, fsync, corrupt values)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import lmdb
import msgpack
import pytest

from sllmd.raft.core import HardState, Raft, Ready, Role
from sllmd.raft.lmdb import LOG_DB, LmdbStorage
from sllmd.raft.messages import Entry, EntryKind, Snapshot, WireError
from sllmd.raft.storage import MemoryStorage, PersistedState, Storage
from sllmd.state.store import StateStore
from tests.raftsim import Sim

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    store = StateStore(tmp_path / "state")
    yield store
    store.close()


@pytest.fixture(params=["memory", "lmdb"])
def storages(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Storage]:
    """Opens a handle on one node's durable Raft state: a second call reads what the first saved."""
    if request.param == "memory":
        memory = MemoryStorage()
        yield lambda: memory
        return
    store = StateStore(tmp_path / "state")
    yield lambda: LmdbStorage(store.env)
    store.close()


def entries(first: int, last: int, term: int, tag: str = "") -> tuple[Entry, ...]:
    return tuple(Entry(i, term, data=f"{tag}{i}".encode()) for i in range(first, last + 1))


def test_fresh_storage_is_empty(storages: Callable[[], Storage]) -> None:
    loaded = storages().load()
    assert loaded == PersistedState() and loaded.is_empty


def test_round_trip(storages: Callable[[], Storage]) -> None:
    storage = storages()
    log = (Entry(1, 1, EntryKind.CONFIG, voters=("a", "b")), Entry(2, 1, EntryKind.NOOP),
           Entry(3, 2, EntryKind.COMMAND, b"\x00\x01binary\xff"))
    snapshot = Snapshot(0, 0, ("a", "b"))
    storage.save(Ready(hard_state=HardState(2, "b", 2), truncate_from=1, entries=log, snapshot=snapshot))
    loaded = storages().load()  # a second handle on the same state
    assert loaded == PersistedState(HardState(2, "b", 2), log, snapshot) and not loaded.is_empty
    storage.save(Ready(hard_state=HardState(3, None, 3)))  # hard state alone; nil vote
    assert storage.load().hard_state == HardState(3, None, 3)
    assert storage.load().entries == log


def test_keys_are_big_endian_so_the_cursor_walks_in_log_order(store: StateStore) -> None:
    storage = LmdbStorage(store.env)
    base = 2**32 - 3  # crosses byte boundaries where little-endian keys would sort wrongly
    log = entries(base, base + 600, 7)
    storage.save(Ready(snapshot=Snapshot(base - 1, 7, ("a",)), truncate_from=base, entries=log))
    assert storage.load().entries == log
    with store.env.begin() as txn:
        keys = [key for key, _ in txn.cursor(db=store.env.open_db(LOG_DB, txn=txn))]
    assert keys == sorted(keys) and keys[0] == base.to_bytes(8, "big")


def test_truncation_of_a_conflicting_suffix(storages: Callable[[], Storage]) -> None:
    storage = storages()
    storage.save(Ready(hard_state=HardState(2, "a", 3), truncate_from=1, entries=entries(1, 10, 2, "old")))
    new = entries(6, 7, 3, "new")  # a new leader overwrote index 6 onwards (§5.3)
    storage.save(Ready(hard_state=HardState(3, "b", 3), truncate_from=6, entries=new))
    assert storage.load() == PersistedState(HardState(3, "b", 3), entries(1, 5, 2, "old") + new)


def test_compaction_and_snapshot_install(storages: Callable[[], Storage]) -> None:
    storage = storages()
    storage.save(Ready(truncate_from=1, entries=entries(1, 10, 1)))
    compacted = Snapshot(7, 1, ("a", "b", "c"), b"state@7")
    storage.save(Ready(snapshot=compacted))  # log compaction (§7): the suffix after 7 stays
    assert storage.load() == PersistedState(HardState(), entries(8, 10, 1), compacted)
    installed = Snapshot(20, 4, ("a", "b"), b"state@20" * 1000)  # InstallSnapshot: the whole log goes
    storage.save(Ready(snapshot=installed, truncate_from=21, hard_state=HardState(4, None, 20)))
    assert storage.load() == PersistedState(HardState(4, None, 20), (), installed)


def test_memory_storage_refuses_a_gap_and_changes_nothing() -> None:
    storage = MemoryStorage(HardState(1, "a", 0), entries(1, 3, 1))
    with pytest.raises(ValueError, match="start at 6"):
        storage.save(Ready(hard_state=HardState(2, "b", 0), truncate_from=6, entries=entries(6, 7, 2)))
    assert storage.load() == PersistedState(HardState(1, "a", 0), entries(1, 3, 1))


def test_raft_restarts_from_what_storage_saved(storages: Callable[[], Storage]) -> None:
    """A one-voter cluster persisted through a Storage: commit, compact, reopen, restore, carry on."""
    storage = storages()
    raft = Raft.bootstrap("a", ["a"], random.Random(0))
    applied: list[bytes] = []

    def drain(raft: Raft) -> None:
        while raft.has_ready():
            ready = raft.ready()
            storage.save(ready)
            applied.extend(e.data for e in ready.committed if e.kind is EntryKind.COMMAND)
            raft.advance(ready)

    drain(raft)
    while raft.role is not Role.LEADER:
        raft.tick()
        drain(raft)
    for i in range(20):
        raft.propose(f"c{i}".encode())
    drain(raft)
    raft.compact(15, b"state machine @15")
    drain(raft)
    state = storages().load()
    assert state.snapshot is not None and state.snapshot.index == 15 and state.entries[0].index == 16
    restored = Raft.restore("a", state.hard_state, state.entries, state.snapshot, random.Random(1), applied=15)
    assert (restored.term, restored.commit_index, restored.last_index) == (raft.term, raft.commit_index, 21)
    assert restored.entries(16, 21) == raft.entries(16, 21)
    applied.clear()
    drain(restored)
    # Index 1 is the leader's no-op, so c{i} sits at i + 2: entries 16..21 (c14..c19) come back to be
    # applied on top of a state machine at 15.
    assert applied == [f"c{i}".encode() for i in range(14, 20)]


CRASHING_CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from sllmd.raft.core import HardState, Ready
    from sllmd.raft.lmdb import LmdbStorage
    from sllmd.raft.messages import Entry, Snapshot
    from sllmd.state.store import StateStore

    storage = LmdbStorage(StateStore(Path(sys.argv[1])).env)
    storage.save(Ready(hard_state=HardState(2, "a", 3), truncate_from=1,
                       entries=tuple(Entry(i, 2, data=b"old") for i in range(1, 6))))
    write_hard_state = LmdbStorage._write_hard_state

    def write_then_die(self, txn, hard_state):
        write_hard_state(self, txn, hard_state)  # every put of this Ready is done, but not committed
        os._exit(17)

    LmdbStorage._write_hard_state = write_then_die
    storage.save(Ready(hard_state=HardState(3, "b", 4), snapshot=Snapshot(2, 2, ("a", "b"), b"snap"),
                       truncate_from=3, entries=(Entry(3, 3, data=b"new"),)))
    os._exit(0)  # not reached
""")


def test_crash_in_the_middle_of_a_save_leaves_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.run([sys.executable, "-c", CRASHING_CHILD, str(path)], env=env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == 17, child.stderr
    store = StateStore(path)
    try:
        storage = LmdbStorage(store.env)
        before = PersistedState(HardState(2, "a", 3), tuple(Entry(i, 2, data=b"old") for i in range(1, 6)))
        assert storage.load() == before
        storage.save(Ready(hard_state=HardState(3, "b", 3), truncate_from=4, entries=(Entry(4, 3, data=b"x"),)))
        assert storage.load().entries[-1] == Entry(4, 3, data=b"x")  # the environment is still healthy
    finally:
        store.close()


class _EnvWithoutSync:
    """An lmdb.Environment opened with sync=False, recording sync() calls."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self.num_syncs = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._env, name)

    def sync(self, force: bool = False) -> None:
        self.num_syncs += 1
        self._env.sync(force)


def test_save_forces_a_sync_when_the_environment_does_not(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "nosync"), max_dbs=4, sync=False)
    try:
        wrapped = _EnvWithoutSync(env)
        storage = LmdbStorage(wrapped)  # type: ignore[arg-type]
        storage.save(Ready(hard_state=HardState(1, "a", 0)))
        storage.save(Ready())  # nothing to persist: no transaction, no sync
        assert wrapped.num_syncs == 1
    finally:
        env.close()


def test_corrupt_values_raise_wire_error(store: StateStore) -> None:
    storage = LmdbStorage(store.env)
    storage.save(Ready(truncate_from=1, entries=entries(1, 2, 1)))
    with store.env.begin(write=True) as txn:
        txn.put((2).to_bytes(8, "big"), msgpack.packb([1, 99, b"", []]), db=store.env.open_db(LOG_DB, txn=txn))
    with pytest.raises(WireError):
        storage.load()


class _CheckedStorage(MemoryStorage):
    """The simulator's reference MemoryStorage, mirrored into LMDB; after every save both must hold the same."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.store = StateStore(path)
        self.lmdb = LmdbStorage(self.store.env)

    def save(self, ready: Ready) -> None:
        super().save(ready)
        self.lmdb.save(ready)
        assert self.lmdb.load() == self.load()


def test_lmdb_matches_memory_storage_under_churn(tmp_path: Path) -> None:
    """Differential test: a simulated cluster with crashes, restarts, partitions and compaction, whose
    every Ready is also saved to LMDB; LMDB must always read back what the reference MemoryStorage holds."""
    checked: dict[str, _CheckedStorage] = {}

    def make_storage(node_id: str) -> Storage:
        checked[node_id] = _CheckedStorage(tmp_path / node_id)
        return checked[node_id]

    sim = Sim(3, seed=7, compact_every=5, storage_factory=make_storage)
    sim.drop(0.1)
    sim.delay(2)
    rng = random.Random(7)
    try:
        for step in range(300):
            if step % 50 == 25:
                victim = rng.choice(sim.up())
                sim.crash(victim)
                sim.run(10)
                sim.restart(victim)
            if step % 70 == 10:
                sim.isolate(rng.choice(sim.up()))
            if step % 70 == 40:
                sim.heal()
            for node_id in sim.up():
                sim.propose(f"{step}-{node_id}".encode(), node_id)
            sim.tick()
        sim.heal()
        sim.reliable()
        sim.commit(b"final")
        assert any((snapshot := storage.load().snapshot) is not None and snapshot.index > 0
                   for storage in checked.values())
    finally:
        for storage in checked.values():
            storage.store.close()
