"""Host memory for the loader: page-aligned buffers, a bounded pool of pre-faulted staging buffers, and the
copiers that move staged bytes to their destination and give the buffers back.

Fresh memory is slow the first time it is touched (every 4 KiB page faults and is zeroed: 0.4–3 GB/s on the
development VMs, slower than the disk), so the staging pool is allocated and faulted in ONCE per process
(`default_pool()`), then recycled: a model of any size streams through it. With CUDA the buffers are pinned
(page-locked, `torch.empty(..., pin_memory=True)`), so host-to-device copies run asynchronously at full
PCIe speed; without CUDA they are anonymous mappings populated at creation (`MAP_POPULATE`).

Every buffer starts on a page boundary, so O_DIRECT can read into it.

`HostMemoryPool` recycles the loader's destination memory the same way: a whole-model host buffer whose last
view has died goes back (touched, still resident) to a bounded free list instead of being unmapped, and the
next CPU load of a size it fits takes it, so steady-state cold loads skip the first-touch cost.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import queue
import threading
import weakref
from collections import deque

import torch

PAGE_BYTES = mmap.PAGESIZE
# 16 MiB buffers, 16 of them (256 MiB): O_DIRECT reads of 4-64 MiB all reach the disk's limit with >= 2
# readers, and the staged pipeline through this pool into pre-faulted memory ran at 99.8% of it on the dev VM
# (scripts/bench_loader.py); 16 buffers keep 4 readers busy with 3 more buffers each in flight to the device.
DEFAULT_BUFFER_BYTES = 16 << 20
DEFAULT_NUM_BUFFERS = 16

_WAIT_SLICE_S = 0.05  # how often a blocked acquire re-checks its cancel event


def host_buffer(nbytes: int, *, populate: bool = False) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of `nbytes` over its own page-aligned anonymous mapping (unmapped when the
    last tensor viewing it dies). `populate` faults every page in now (MAP_POPULATE); otherwise pages fault
    on first touch, in whichever thread touches them (the loader's readers, in parallel with their reads)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if populate:
        flags |= getattr(mmap, "MAP_POPULATE", 0)
    region = mmap.mmap(-1, max(_round_up(nbytes, PAGE_BYTES), PAGE_BYTES), flags=flags)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


def seal_read_only(buffer: torch.Tensor) -> bool:
    """Make the pages of a `host_buffer` read-only (mprotect), so a stray write to shared weights faults
    instead of silently corrupting every user of them. Only for buffers from `host_buffer` (a malloc'ed
    tensor shares its pages with the allocator's own data). Returns False where mprotect is unavailable."""
    start = buffer.data_ptr()
    if start % PAGE_BYTES or not buffer.numel():
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    length = _round_up(buffer.numel(), PAGE_BYTES)
    mapping = _RECYCLABLE.get(start)
    if mapping is not None:
        mapping.sealed = True  # before the call: a half-applied mprotect must be undone before reuse too
    return libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(length), mmap.PROT_READ) == 0


def _unseal(mapping: _Mapping) -> None:
    """Make a recycled mapping read-write again (it was sealed while a DRAM-cache entry)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mprotect(ctypes.c_void_p(mapping.address), ctypes.c_size_t(mapping.nbytes),
                     mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect(PROT_READ|PROT_WRITE) failed on a recycled buffer")
    mapping.sealed = False


class _Mapping:
    """One anonymous mapping `HostMemoryPool` hands out whole (never split), again and again."""

    __slots__ = ("__weakref__", "address", "nbytes", "region", "sealed")

    def __init__(self, nbytes: int, *, populate: bool = False) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if populate:
            flags |= getattr(mmap, "MAP_POPULATE", 0)
        self.region = mmap.mmap(-1, nbytes, flags=flags)
        self.nbytes = nbytes
        self.address = ctypes.addressof(ctypes.c_ubyte.from_buffer(self.region))  # the export ends at once
        self.sealed = False

    def unmap(self) -> None:
        _RECYCLABLE.pop(self.address, None)
        with contextlib.suppress(BufferError):  # still exported (cannot be once its tensor died): left to the GC
            self.region.close()


# start address -> the pool mapping there, so `seal_read_only` can mark it for unsealing before reuse
_RECYCLABLE: weakref.WeakValueDictionary[int, _Mapping] = weakref.WeakValueDictionary()


class HostMemoryPool:
    """Recycled whole-model host buffers: touched memory kept for the next load instead of unmapped.

    `take(nbytes)` returns a page-aligned 1-D uint8 CPU tensor of `nbytes`, read-write, NOT zeroed (the
    loader overwrites every byte): the best-fitting idle mapping (the smallest at least `nbytes` and at most
    `max_waste` larger; made read-write again if it was sealed read-only) or, if none fits, a fresh one.
    A handed-out mapping comes back by itself when the last tensor viewing it dies: `torch.frombuffer` keeps
    a per-hand-out ctypes array over the mapping alive for as long as any view of the storage exists, and a
    `weakref.finalize` on that array queues the mapping for reuse. So memory is never handed out again while
    anything still views it, whoever holds the view (an engine's model, a stray tensor, a leaked numpy array).

    Bounded: idle mappings total at most `limit_bytes` (the oldest go first, unmapped); a returned mapping
    that does not fit is unmapped. `DramCache` owns one and keeps its limit at `budget - cached bytes`, so the
    cache's entries plus the idle memory stay within the DRAM budget. Thread-safe; the finalizers only append
    to a queue, processed under the lock by the next call.
    """

    def __init__(self, limit_bytes: int, *, max_waste: float = 0.25) -> None:
        if limit_bytes < 0 or max_waste < 0:
            raise ValueError("limit_bytes and max_waste must be >= 0")
        self.max_waste = max_waste
        self._limit = limit_bytes
        self._free: list[_Mapping] = []  # idle mappings, oldest first
        self._free_bytes = 0
        self._returned: deque[_Mapping] = deque()  # appended by finalizers, from any thread
        self._lock = threading.Lock()
        self.num_reused = self.num_fresh = self.num_unmapped = 0

    @property
    def free_bytes(self) -> int:
        """Bytes of idle (touched, resident) mappings waiting for reuse."""
        with self._lock:
            self._collect()
            return self._free_bytes

    @property
    def num_free(self) -> int:
        with self._lock:
            self._collect()
            return len(self._free)

    def set_limit(self, limit_bytes: int) -> None:
        """Bound the idle memory to `limit_bytes` from now on, unmapping the oldest idle mappings beyond it."""
        with self._lock:
            self._limit = max(0, limit_bytes)
            self._collect()

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        need = max(_round_up(nbytes, PAGE_BYTES), PAGE_BYTES)
        with self._lock:
            self._collect()
            best: _Mapping | None = None
            for mapping in self._free:
                if need <= mapping.nbytes <= need + need * self.max_waste and (
                        best is None or mapping.nbytes < best.nbytes):
                    best = mapping
            if best is not None:
                self._free.remove(best)
                self._free_bytes -= best.nbytes
                self.num_reused += 1
            else:
                self.num_fresh += 1
        if best is None:
            best = _Mapping(need)
        elif best.sealed:
            _unseal(best)
        return self._hand_out(best, nbytes)

    def prefault(self, nbytes: int) -> bool:
        """Map and fault in one idle mapping of `nbytes` now (at daemon start), so the first load of a model
        of up to that size skips first touch; False (nothing mapped) if it does not fit the limit."""
        need = max(_round_up(nbytes, PAGE_BYTES), PAGE_BYTES)
        with self._lock:
            self._collect()
            if self._free_bytes + need > self._limit:
                return False
        mapping = _Mapping(need, populate=True)
        self._hand_out(mapping, need)[::PAGE_BYTES].zero_()  # touch, in case MAP_POPULATE did not
        with self._lock:
            self._collect()  # the temporary tensor just died: the mapping is queued, and lands in the free list
            return any(m is mapping for m in self._free)

    def clear(self) -> None:
        """Unmap every idle mapping."""
        with self._lock:
            self._collect()
            for mapping in self._free:
                self._unmap(mapping)
            self._free.clear()
            self._free_bytes = 0

    def _hand_out(self, mapping: _Mapping, nbytes: int) -> torch.Tensor:
        _RECYCLABLE[mapping.address] = mapping
        owner = (ctypes.c_ubyte * mapping.nbytes).from_buffer(mapping.region)
        weakref.finalize(owner, self._returned.append, mapping).atexit = False
        return torch.frombuffer(owner, dtype=torch.uint8)[:nbytes]

    def _collect(self) -> None:
        """(Lock held.) Returned mappings join the free list if they fit the limit; then trim to the limit."""
        while self._returned:
            mapping = self._returned.popleft()
            if self._free_bytes + mapping.nbytes <= self._limit:
                self._free.append(mapping)
                self._free_bytes += mapping.nbytes
            else:
                self._unmap(mapping)
        while self._free_bytes > self._limit:
            mapping = self._free.pop(0)
            self._free_bytes -= mapping.nbytes
            self._unmap(mapping)

    def _unmap(self, mapping: _Mapping) -> None:
        self.num_unmapped += 1
        mapping.unmap()


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _aligned(tensor: torch.Tensor, nbytes: int) -> torch.Tensor:
    """`nbytes` of `tensor` (allocated PAGE_BYTES larger) starting at its first page boundary."""
    skip = -tensor.data_ptr() % PAGE_BYTES
    return tensor[skip : skip + nbytes]


class BufferPool:
    """`num_buffers` staging buffers of `buffer_bytes` each (a multiple of the page size), allocated and
    faulted in at construction. Thread-safe: `acquire` blocks while every buffer is out.

    `pin=None` pins when CUDA is available. A pinned buffer must go back only once the device copy that
    reads it has completed (the loader releases on the copy's CUDA event).
    """

    def __init__(self, num_buffers: int = DEFAULT_NUM_BUFFERS, buffer_bytes: int = DEFAULT_BUFFER_BYTES, *,
                 pin: bool | None = None) -> None:
        if num_buffers < 1:
            raise ValueError("a pool needs at least one buffer")
        if buffer_bytes < PAGE_BYTES or buffer_bytes % PAGE_BYTES:
            raise ValueError(f"buffer_bytes must be a positive multiple of {PAGE_BYTES}")
        self.buffer_bytes = buffer_bytes
        self.num_buffers = num_buffers
        self.is_pinned = torch.cuda.is_available() if pin is None else pin
        buffers = []
        for _ in range(num_buffers):
            if self.is_pinned:
                # Pinned blocks come page-aligned in practice; over-allocate only if this one did not (the
                # pinned allocator rounds sizes up to a power of two, so padding by default would double 16 MiB).
                raw = torch.empty(buffer_bytes, dtype=torch.uint8, pin_memory=True)
                if raw.data_ptr() % PAGE_BYTES:
                    raw = _aligned(torch.empty(buffer_bytes + PAGE_BYTES, dtype=torch.uint8, pin_memory=True),
                                   buffer_bytes)
                buffers.append(raw)
            else:
                buffers.append(host_buffer(buffer_bytes, populate=True))
        for buf in buffers:  # touch once: MAP_POPULATE or pinning should have, but never fault in a load
            buf[::PAGE_BYTES].zero_()
        self._free: deque[torch.Tensor] = deque(buffers)
        self._owned = {buf.data_ptr() for buf in buffers}
        self._cond = threading.Condition()

    @property
    def num_free(self) -> int:
        with self._cond:
            return len(self._free)

    def acquire(self, cancel: threading.Event | None = None) -> torch.Tensor | None:
        """A free buffer (1-D uint8, `buffer_bytes` long), waiting for one if none is free; None once
        `cancel` is set (checked at least every 50 ms while waiting)."""
        with self._cond:
            while not self._free:
                if cancel is not None and cancel.is_set():
                    return None
                self._cond.wait(_WAIT_SLICE_S if cancel is not None else None)
            if cancel is not None and cancel.is_set():
                return None
            return self._free.popleft()

    def release(self, buffer: torch.Tensor) -> None:
        """Give back a buffer from `acquire`; `ValueError` for a foreign or already released one."""
        with self._cond:
            ptr = buffer.data_ptr()
            if ptr not in self._owned or any(b.data_ptr() == ptr for b in self._free):
                raise ValueError("buffer does not belong to this pool or was already released")
            self._free.append(buffer)
            self._cond.notify()


Landed = tuple[torch.Tensor, int, int]  # (pool buffer, offset in the destination, bytes), as readers queue it


class SyncCopier:
    """Copies landed pool buffers into `out` on a CPU (or any non-CUDA) target: synchronously, so each buffer
    is back in the pool when `submit` returns. Used by one thread."""

    def __init__(self, out: torch.Tensor, pool: BufferPool) -> None:
        self._out, self._pool = out, pool

    def next_item(self, landed: queue.SimpleQueue[Landed | None]) -> Landed | None:
        return landed.get()

    def submit(self, buf: torch.Tensor, dst: int, nbytes: int) -> None:
        try:
            self._out[dst : dst + nbytes].copy_(buf[:nbytes])
        finally:
            self._pool.release(buf)

    def finish(self) -> None:
        pass


class CudaCopier:
    """Copies landed pool buffers into the device tensor `out` asynchronously, on a dedicated stream; a buffer
    goes back to the pool once its copy's event has completed. Copies on one stream complete in order, so
    in-flight ones are a FIFO. Used by one thread; `finish()` returns when every copy is on the device."""

    def __init__(self, out: torch.Tensor, pool: BufferPool) -> None:
        self._out, self._pool = out, pool
        self._stream = torch.cuda.Stream(out.device)
        self._inflight: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()

    def next_item(self, landed: queue.SimpleQueue[Landed | None]) -> Landed | None:
        """The next landed buffer. While none is waiting, retire the oldest copy (freeing its buffer for the
        readers) rather than sleep: that is the only thing that can unblock them."""
        while True:
            self._retire_completed()
            if not self._inflight:
                return landed.get()
            try:
                return landed.get_nowait()
            except queue.Empty:
                event, buf = self._inflight.popleft()
                event.synchronize()
                self._pool.release(buf)

    def submit(self, buf: torch.Tensor, dst: int, nbytes: int) -> None:
        try:
            with torch.cuda.stream(self._stream):
                self._out[dst : dst + nbytes].copy_(buf[:nbytes], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
        except BaseException:
            self._stream.synchronize()  # the copy may have been issued: let it finish before reuse
            self._pool.release(buf)
            raise
        self._inflight.append((event, buf))

    def _retire_completed(self) -> None:
        while self._inflight and self._inflight[0][0].query():
            self._pool.release(self._inflight.popleft()[1])

    def finish(self) -> None:
        self._stream.synchronize()
        while self._inflight:
            self._pool.release(self._inflight.popleft()[1])


_default_pool: BufferPool | None = None
_default_lock = threading.Lock()


def default_pool(num_buffers: int = DEFAULT_NUM_BUFFERS, buffer_bytes: int = DEFAULT_BUFFER_BYTES) -> BufferPool:
    """The process-wide staging pool, created (and pinned, when CUDA is available) by the first call,
    with that call's sizes; the daemon makes that call at start on CUDA nodes, with the configured
    sizes, so no cold start pays for pinning it."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = BufferPool(num_buffers, buffer_bytes)
        return _default_pool
