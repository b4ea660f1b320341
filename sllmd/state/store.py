"""The node's LMDB environment: one file pair in `<data_dir>/state`, named databases inside.

Every write is one LMDB transaction, committed with fsync: after a crash the store holds either
the old or the new state, never a mix. Values are msgpack maps (never pickle).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import msgpack

DATABASES = ("meta", "deployments", "instances", "nodes")
DEFAULT_MAP_SIZE = 1 << 30  # address space only; the file grows with use


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False, strict_map_key=True)


class StateStore:
    """Opens (creating if absent) the environment and its databases.

    Thread-safety: LMDB allows one writer at a time; callers here write from the event loop only.
    """

    def __init__(self, path: Path, *, map_size: int = DEFAULT_MAP_SIZE) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=len(DATABASES) + 8, sync=True)
        self.dbs = {name: self.env.open_db(name.encode()) for name in DATABASES}

    @contextmanager
    def read(self) -> Iterator[Transaction]:
        with self.env.begin(write=False) as txn:
            yield Transaction(txn, self.dbs)

    @contextmanager
    def write(self) -> Iterator[Transaction]:
        """All-or-nothing: an exception inside the block aborts every change made in it."""
        with self.env.begin(write=True) as txn:
            yield Transaction(txn, self.dbs)

    def close(self) -> None:
        self.env.close()


class Transaction:
    """Typed access to one LMDB transaction: string keys, msgpack values."""

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any]) -> None:
        self._txn = txn
        self._dbs = dbs

    @property
    def snapshot_id(self) -> int:
        """For a read: the number of the last write committed before it began (equal ids, equal contents)."""
        return self._txn.id()

    def get(self, db: str, key: str) -> Any | None:
        raw = self._txn.get(key.encode(), db=self._dbs[db])
        return None if raw is None else unpack(raw)

    def put(self, db: str, key: str, value: Any) -> None:
        self._txn.put(key.encode(), pack(value), db=self._dbs[db])

    def delete(self, db: str, key: str) -> bool:
        return self._txn.delete(key.encode(), db=self._dbs[db])

    def items(self, db: str) -> Iterator[tuple[str, Any]]:
        with self._txn.cursor(db=self._dbs[db]) as cursor:
            for key, raw in cursor:
                yield key.decode(), unpack(raw)
