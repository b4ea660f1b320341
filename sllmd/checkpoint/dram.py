"""The DRAM tier: an LRU cache of whole loaded checkpoints held in host memory, within a byte budget.

An entry is one host buffer holding all of a checkpoint's partitions back to back (the layout of
`Manifest.tensor_views`), keyed by the checkpoint's identity: its resolved path and the digest of its
manifest (which holds every data file's hash, so a checkpoint replaced in place gets a new key).

Users hold a `CacheLease` while they use a buffer (an engine serving from it, a load copying out of it): a
leased entry is never evicted. Eviction drops the cache's reference, so the memory is freed once nobody
views it any more. All methods are thread-safe; `single_flight(key)` serialises concurrent loads of one
checkpoint so the second finds the first's entry instead of reading the disk again.

Recycling (`host_pool`, a `HostMemoryPool`): an evicted entry's pages are not unmapped but, once nothing
views them any more, kept touched for the next CPU load (`host_buffer`), which then skips first-touch page
faults. Accounting: ONE budget covers both, `used_bytes` (cached entries) + `host_pool.free_bytes` (idle
recycled memory) <= `budget_bytes` at all times: the pool's limit is kept at `budget_bytes - used_bytes`, so
caching an entry unmaps idle memory first (it is worth less than a cached model), and eviction makes room
for it. Memory a running model uses outside the cache (a load too big for the budget) is not counted, as
before; when it is freed it is kept only if it fits the idle limit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sllmd.checkpoint.pool import HostMemoryPool
from sllmd.config import StoreConfig

CacheKey = tuple[str, str]  # (resolved checkpoint path, manifest digest)


def cache_key(path: Path, manifest_digest: str) -> CacheKey:
    return str(Path(path).resolve()), manifest_digest


@dataclass(eq=False)
class _Entry:
    key: CacheKey
    buffer: torch.Tensor
    nbytes: int
    num_leases: int = 0


@dataclass(eq=False)
class CacheLease:
    """A pin on one cache entry: its buffer is not evicted until `release()` (idempotent; also on exit
    of a `with` block). Treat `buffer` as read-only: it may be shared with other leases."""

    key: CacheKey
    buffer: torch.Tensor
    _cache: DramCache = field(repr=False)
    _entry: _Entry = field(repr=False)
    is_released: bool = False

    def release(self) -> None:
        self._cache._unpin(self)

    def __enter__(self) -> CacheLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DramCache:
    """LRU of host buffers within `budget_bytes`; leased entries are never evicted."""

    def __init__(self, budget_bytes: int, *, prefault_bytes: int = 0) -> None:
        """`prefault_bytes` (default 0: it costs that much RSS from the start): map and fault in one idle
        buffer of that size now, within the budget, so the first CPU load of a model up to that size (and
        not much smaller: see `HostMemoryPool.max_waste`) skips first touch too."""
        if budget_bytes < 0 or prefault_bytes < 0:
            raise ValueError("budget_bytes and prefault_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()  # least recently used first
        self._used = 0
        self._lock = threading.Lock()
        self._loading: dict[CacheKey, list] = {}  # key -> [lock, number of waiters]
        self.num_hits = self.num_misses = self.num_evictions = 0
        self.host_pool = HostMemoryPool(budget_bytes)  # idle recycled memory: within budget - used
        if prefault_bytes:
            self.host_pool.prefault(min(prefault_bytes, budget_bytes))

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """Host memory for a CPU load of `nbytes` that is to be cached: if it can be cached, evict least
        recently used unleased entries until it fits (as `put` would, but before the load, so an evicted
        entry's pages can become this load's buffer), then take recycled memory from `host_pool` (fresh if
        none fits). Not zeroed."""
        with self._lock:
            self._make_room(nbytes)  # evicted entries die here: their buffers return to the pool if unviewed
            self.host_pool.set_limit(self.budget_bytes - self._used)
        return self.host_pool.take(nbytes)

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used unleased entries until `nbytes` more fit; False, evicting nothing,
        when they cannot fit even with every unleased entry gone. Call with the lock held."""
        evictable = sum(e.nbytes for e in self._entries.values() if not e.num_leases)
        if nbytes > self.budget_bytes - self._used + evictable:
            return False
        for victim in [e for e in self._entries.values() if not e.num_leases]:
            if self._used + nbytes <= self.budget_bytes:
                break
            self._drop(victim)
        return True

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lru_keys(self) -> list[CacheKey]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def get(self, key: CacheKey) -> CacheLease | None:
        """A lease on the entry for `key` (now the most recently used), or None on a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.num_misses += 1
                return None
            self.num_hits += 1
            self._entries.move_to_end(key)
            return self._pin(entry)

    def put(self, key: CacheKey, buffer: torch.Tensor) -> CacheLease | None:
        """Cache `buffer` (CPU, 1-D uint8) under `key` and lease it, evicting least recently used unleased
        entries to make room. None, caching nothing, when it cannot fit even after evicting every unleased
        entry. If `key` is already cached, the existing entry is leased and `buffer` is not kept."""
        if buffer.device.type != "cpu" or buffer.dtype != torch.uint8 or buffer.dim() != 1:
            raise ValueError("a cached buffer must be a 1-D uint8 CPU tensor")
        nbytes = buffer.numel()
        with self._lock:
            existing = self._entries.get(key)
            if existing is not None:
                self._entries.move_to_end(key)
                return self._pin(existing)
            if not self._make_room(nbytes):
                return None
            entry = _Entry(key, buffer, nbytes)
            self._entries[key] = entry
            self._used += nbytes
            self.host_pool.set_limit(self.budget_bytes - self._used)  # idle memory makes way for the entry
            return self._pin(entry)

    def evict(self, key: CacheKey) -> bool:
        """Drop `key` if cached and unleased; True if it was dropped."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.num_leases:
                return False
            self._drop(entry)
            del entry
            self.host_pool.set_limit(self.budget_bytes - self._used)
            return True

    def clear(self) -> None:
        """Drop every unleased entry (their memory stays idle in `host_pool`, within the budget)."""
        with self._lock:
            for key in [k for k, e in self._entries.items() if not e.num_leases]:
                self._drop(self._entries[key])
            self.host_pool.set_limit(self.budget_bytes - self._used)

    @contextmanager
    def single_flight(self, key: CacheKey) -> Iterator[None]:
        """Hold while looking `key` up and loading it on a miss: concurrent holders for the same key wait,
        then find the entry the first one put. Different keys do not wait for each other."""
        with self._lock:
            slot = self._loading.setdefault(key, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._lock:
                slot[1] -= 1
                if not slot[1]:
                    del self._loading[key]

    # ---- internals (called with self._lock held, except _unpin) ---------------------------------

    def _pin(self, entry: _Entry) -> CacheLease:
        entry.num_leases += 1
        return CacheLease(entry.key, entry.buffer, self, entry)

    def _unpin(self, lease: CacheLease) -> None:
        with self._lock:
            if lease.is_released:
                return
            lease.is_released = True
            lease._entry.num_leases -= 1

    def _drop(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        self._used -= entry.nbytes
        self.num_evictions += 1


def open_dram_cache(config: StoreConfig) -> DramCache | None:
    """The node's DRAM cache of loaded checkpoints, or None when `dram_budget_gb` is 0 (every load then
    reads the SSD store)."""
    if config.dram_budget_gb <= 0:
        return None
    return DramCache(int(config.dram_budget_gb * 2**30))
