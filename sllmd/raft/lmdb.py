"""`LmdbStorage`: a node's Raft `Storage` in its LMDB environment (the one `StateStore` opens).

Named databases (msgpack values, never pickle):
- `raft_hard`:     b"hard" -> {"term", "voted_for", "commit"}
- `raft_log`:      index as a big-endian u64 (so cursor order is log order) -> [term, kind, data, voters]
- `raft_snapshot`: b"meta" -> {"index", "term", "voters"};  b"data" -> the state machine's bytes, raw

`save(ready)` applies one Ready in ONE write transaction, durable when it returns: LMDB commits with
fsync when the environment is opened with sync=True (StateStore does); otherwise `save` forces
`env.sync()`. A crash therefore leaves the previous Ready's state or this one's, never a mix.

Thread-safety: LMDB allows one writer at a time; call from the event loop (or one worker thread).
"""

from __future__ import annotations

import struct
from typing import Any

import lmdb
import msgpack

from sllmd.raft.core import HardState, Ready
from sllmd.raft.messages import Entry, Snapshot, WireError
from sllmd.raft.storage import PersistedState

HARD_DB = b"raft_hard"
LOG_DB = b"raft_log"
SNAPSHOT_DB = b"raft_snapshot"
_HARD_KEY = b"hard"
_META_KEY = b"meta"
_DATA_KEY = b"data"
_INDEX = struct.Struct(">Q")


class LmdbStorage:
    """A `Storage`: Raft hard state, log and snapshot in three named databases of `env`."""

    def __init__(self, env: lmdb.Environment) -> None:
        self._env = env
        self._hard_db = env.open_db(HARD_DB)
        self._log_db = env.open_db(LOG_DB)
        self._snapshot_db = env.open_db(SNAPSHOT_DB)
        self._is_commit_durable = bool(env.flags().get("sync"))

    def save(self, ready: Ready) -> None:
        """Persists `ready`'s snapshot, log changes and hard state (in that order, see Ready's contract)
        in one transaction. Call before sending `ready.messages`."""
        if not ready.has_state_to_persist:
            return
        with self._env.begin(write=True) as txn:
            if ready.snapshot is not None:
                self._write_snapshot(txn, ready.snapshot)
            if ready.truncate_from is not None:
                self._truncate(txn, ready.truncate_from)
            if ready.entries:
                self._append(txn, ready.entries)
            if ready.hard_state is not None:
                self._write_hard_state(txn, ready.hard_state)
        if not self._is_commit_durable:
            self._env.sync(True)

    def load(self) -> PersistedState:
        """Reads everything back; raises WireError if a stored value does not decode."""
        with self._env.begin(write=False) as txn:
            raw_hard = txn.get(_HARD_KEY, db=self._hard_db)
            hard_state = HardState() if raw_hard is None else _decode_hard_state(_unpack(raw_hard))
            raw_meta = txn.get(_META_KEY, db=self._snapshot_db)
            snapshot = None
            if raw_meta is not None:
                meta = _unpack(raw_meta)
                if not isinstance(meta, dict):
                    raise WireError("stored snapshot metadata: expected a map")
                snapshot = Snapshot.from_wire({**meta, "data": txn.get(_DATA_KEY, b"", db=self._snapshot_db)})
            with txn.cursor(db=self._log_db) as cursor:
                entries = tuple(_decode_entry(key, value) for key, value in cursor)
        return PersistedState(hard_state, entries, snapshot)

    # Each step is a method so a test can interrupt a save between them (a crash inside the txn).

    def _write_snapshot(self, txn: lmdb.Transaction, snapshot: Snapshot) -> None:
        meta = {"index": snapshot.index, "term": snapshot.term, "voters": list(snapshot.voters)}
        txn.put(_META_KEY, _pack(meta), db=self._snapshot_db)
        txn.put(_DATA_KEY, snapshot.data, db=self._snapshot_db)
        with txn.cursor(db=self._log_db) as cursor:  # the snapshot replaces the entries it covers
            is_positioned = cursor.first()
            while is_positioned and _INDEX.unpack(cursor.key())[0] <= snapshot.index:
                is_positioned = _delete_and_step(cursor)

    def _truncate(self, txn: lmdb.Transaction, first_dropped: int) -> None:
        with txn.cursor(db=self._log_db) as cursor:
            is_positioned = cursor.set_range(_INDEX.pack(first_dropped))
            while is_positioned:
                is_positioned = _delete_and_step(cursor)

    def _append(self, txn: lmdb.Transaction, entries: tuple[Entry, ...]) -> None:
        for entry in entries:
            txn.put(_INDEX.pack(entry.index), _pack(entry.to_wire()[1:]), db=self._log_db)

    def _write_hard_state(self, txn: lmdb.Transaction, hard_state: HardState) -> None:
        value = {"term": hard_state.term, "voted_for": hard_state.voted_for, "commit": hard_state.commit}
        txn.put(_HARD_KEY, _pack(value), db=self._hard_db)


def _delete_and_step(cursor: lmdb.Cursor) -> bool:
    """Deletes the current record; True while the cursor still sits on one (py-lmdb's delete() moves to
    the next record but returns True even when there is none, leaving an empty key)."""
    cursor.delete()
    return bool(cursor.key())


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(raw: bytes) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"stored value does not decode: {exc}") from None


def _decode_entry(key: bytes, raw: bytes) -> Entry:
    value = _unpack(raw)
    if len(key) != _INDEX.size or not isinstance(value, list):
        raise WireError("stored log entry: bad key or value")
    return Entry.from_wire([_INDEX.unpack(key)[0], *value])


def _decode_hard_state(value: Any) -> HardState:
    if not isinstance(value, dict):
        raise WireError("stored hard state: expected a map")
    term, voted_for, commit = value.get("term"), value.get("voted_for"), value.get("commit")
    if type(term) is not int or type(commit) is not int or term < 0 or commit < 0:
        raise WireError("stored hard state: term and commit must be non-negative ints")
    if voted_for is not None and (type(voted_for) is not str or not voted_for):
        raise WireError("stored hard state: voted_for must be a node id or nil")
    return HardState(term, voted_for, commit)
