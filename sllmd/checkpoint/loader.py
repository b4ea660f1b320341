"""The fast loader: an sllmd v1 checkpoint into ONE device allocation, at storage speed.

Pipelines (`load_checkpoint` picks one):

* **CPU target, the whole checkpoint in the page cache** ("auto" mode): mapped, not copied
  (`mapped.map_checkpoint`): the tensors view the files' pages, private and copy-on-write.
* **CPU target, direct**: `num_readers` threads `preadv` fixed `chunk_bytes` pieces of the data files, in
  file order, straight into their place in one page-aligned host buffer (no pool, no second copy).
* **CUDA target (and `staged=True` on CPU, the same pipeline with CPU copies, for tests)**: readers fill
  buffers from a bounded pool of pinned, pre-faulted host buffers; the calling thread, as the copier, issues
  `non_blocking` copies on a dedicated CUDA stream into the device allocation, and a buffer returns to the
  pool when its copy's event has completed. Reads overlap copies; a model of any size streams through.
* **Recycled destination memory** (CPU target): the buffer comes from a `HostMemoryPool` (the DRAM cache's
  own, or `host_pool=`) when an earlier load's buffer, evicted or unloaded, is no longer viewed: its pages
  are already faulted in, so the load skips the first-touch zero-fill that otherwise caps it (fresh memory
  faults at ~4 GB/s on the 2-core VM, 0.59 of the disk; touched memory reaches 0.96).
* **DRAM cache hit**: on CPU, no copy at all (the tensors view the cached, read-only buffer); on CUDA the
  readers copy out of the cached host buffer instead of the files (copy-only).

How a piece is read (`io_mode`): "auto" (default) copies a piece from the page cache when all of it is
there and reads any other with O_DIRECT (no page-cache copy, no readahead guessing, no eviction of other
data); filesystems that refuse O_DIRECT (tmpfs) fall back to buffered reads. "direct" and "buffered" force
one way and never map (`reader.PartitionFiles`). Defaults: `scripts/bench_loader.py --sweep` (DEFAULT_*).

Integrity: `convert` and `fetch` verify; the loader does not re-hash unless `verify=True`, which hashes each
chunk as its bytes land (xxh3-128), raising `ChecksumMismatch`; missing or short files: `CorruptCheckpoint`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash

from sllmd.checkpoint.dram import CacheKey, CacheLease, DramCache, cache_key
from sllmd.checkpoint.errors import ChecksumMismatch
from sllmd.checkpoint.manifest import ALIGNMENT, Manifest
from sllmd.checkpoint.mapped import can_map, map_checkpoint
from sllmd.checkpoint.pool import (
    BufferPool,
    CudaCopier,
    HostMemoryPool,
    Landed,
    SyncCopier,
    default_pool,
    host_buffer,
    seal_read_only,
)
from sllmd.checkpoint.reader import IoMode, PartitionFiles, manifest_digest, read_manifest_bytes
from sllmd.checkpoint.tensors import tensor_views
from sllmd.checkpoint.threads import run_threads, start_threads
from sllmd.types import LoadReport

log = logging.getLogger(__name__)

# Measured on the 2-core development VM (bench_loader.py --sweep, 1 GB cold, O_DIRECT limit ~2.4 GB/s): 1 reader
# 0.9 GB/s, 2: 1.5, 4: 1.4-1.7, 8: no better; O_DIRECT beats buffered reads cold (1.66 vs 1.36 GB/s). 4, 16 and
# 64 MiB pieces are alike; into pre-faulted memory 4 x 16 MiB reach 98% (direct) and 99.8% (staged) of the
# limit. 16 MiB keeps the staging pool fine-grained. Re-measure on GPU nodes (--device cuda).
DEFAULT_NUM_READERS = 4
DEFAULT_CHUNK_BYTES = 16 << 20

_node_defaults = {"num_readers": DEFAULT_NUM_READERS, "chunk_bytes": DEFAULT_CHUNK_BYTES}


def configure(*, num_readers: int, chunk_bytes: int) -> None:
    """Set this node's reader count and read size (config `[store]`), once at daemon start, before any load;
    they describe the node's disks, so every load on the node uses them unless it passes its own."""
    if num_readers < 1 or chunk_bytes < ALIGNMENT or chunk_bytes % ALIGNMENT:
        raise ValueError("num_readers must be >= 1 and chunk_bytes a positive multiple of 4096")
    _node_defaults.update(num_readers=num_readers, chunk_bytes=chunk_bytes)

_Fill = Callable[["_Piece", memoryview, torch.Tensor], None]  # fills one staging buffer with a piece


@dataclass(frozen=True, slots=True)
class _Piece:
    """`nbytes` at `offset` of partition `partition`, landing at `dst` of the whole-model buffer."""

    partition: int
    offset: int
    nbytes: int
    dst: int


@dataclass(frozen=True, slots=True)
class _Segment:
    """Pieces one reader handles in order; with `digest` set they make up one hashed manifest chunk."""

    pieces: tuple[_Piece, ...]
    digest: str | None = None

    def mismatch(self, file: str) -> ChecksumMismatch:
        start = self.pieces[0].offset
        return ChecksumMismatch(file, start, self.pieces[-1].offset + self.pieces[-1].nbytes)


@dataclass(eq=False)
class LoadedCheckpoint:
    """A loaded checkpoint. `tensors` (aliases too: an alias maps to its target's very tensor object) are
    views into `buffer`, the one allocation holding every partition. Call `release()` when done with the
    tensors so a DRAM-cache entry they view can be evicted again (also done when this object is collected)."""

    path: Path
    manifest: Manifest
    tensors: dict[str, torch.Tensor]
    buffer: torch.Tensor
    report: LoadReport
    _lease: CacheLease | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self._lease is not None:
            weakref.finalize(self, self._lease.release)

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()


def load_checkpoint(path: Path | str, device: torch.device | str = "cpu", *, dram_cache: DramCache | None = None,
                    num_readers: int | None = None, chunk_bytes: int | None = None,
                    pool: BufferPool | None = None, verify: bool = False, io_mode: IoMode = "auto",
                    staged: bool = False, out: torch.Tensor | None = None,
                    host_pool: HostMemoryPool | None = None) -> LoadedCheckpoint:
    """Load the checkpoint directory `path` onto `device`; see the module docstring for how.

    `dram_cache`: look the checkpoint up there first, and put it there after a disk load if it fits (on CPU
    the loaded buffer itself, sealed read-only; on CUDA a host copy made as the pieces pass). `pool`: the
    staging pool for CUDA or `staged` loads (default: the process-wide `default_pool()`). `chunk_bytes`:
    bytes per read, a multiple of 4096 (at most the pool's buffer size when staging). `out`: load into this
    1-D uint8 tensor on `device` (at least the checkpoint's total bytes, 4 KiB-aligned)
    instead of a new allocation, e.g. memory recycled from an unloaded model; not with `dram_cache`.
    `host_pool`: without `dram_cache`, take the host buffer (CPU target) from this pool of recycled memory;
    it goes back there once no tensor views it. With `dram_cache`, its own `host_pool` is used.
    `num_readers` / `chunk_bytes`: None takes the node's (see `configure`).
    Thread-safe: any number of loads may run at once (they share the pool).
    """
    start = time.perf_counter()
    loader, raw = _new_load(Path(path), torch.device(device), dram_cache=dram_cache, num_readers=num_readers,
                            chunk_bytes=chunk_bytes, pool=pool, verify=verify, io_mode=io_mode, staged=staged,
                            out=out, host_pool=host_pool)
    if dram_cache is None:
        buffer = loader.from_files(tee=None) if loader.is_staged else loader.direct()
        return _finish(loader, buffer, "ssd", start, None)
    key = cache_key(loader.path, manifest_digest(raw))
    with dram_cache.single_flight(key):
        lease = dram_cache.get(key)
        if lease is not None:
            return _from_dram(loader, lease, start)
        return _from_ssd_into_dram(loader, dram_cache, key, start)


def _new_load(path: Path, device: torch.device, *, dram_cache: DramCache | None, num_readers: int | None,
              chunk_bytes: int | None, pool: BufferPool | None, verify: bool, io_mode: IoMode, staged: bool,
              out: torch.Tensor | None, host_pool: HostMemoryPool | None) -> tuple[_Load, bytes]:
    """The checked arguments of `load_checkpoint` as a planned load, and the raw manifest (its digest keys
    the DRAM cache). ValueError names a bad argument; checkpoint errors come from reading the manifest."""
    num_readers = _node_defaults["num_readers"] if num_readers is None else num_readers
    chunk_bytes = _node_defaults["chunk_bytes"] if chunk_bytes is None else chunk_bytes
    if num_readers < 1:
        raise ValueError("num_readers must be >= 1")
    if chunk_bytes < ALIGNMENT or chunk_bytes % ALIGNMENT:
        raise ValueError(f"chunk_bytes must be a positive multiple of {ALIGNMENT}")
    if io_mode not in ("auto", "direct", "buffered"):
        raise ValueError(f"unknown io_mode {io_mode!r}")
    raw = read_manifest_bytes(path)
    manifest = Manifest.parse(raw)
    if out is not None:
        if dram_cache is not None:
            raise ValueError("out= and dram_cache= do not combine (a cached buffer is the cache's own)")
        if (out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < manifest.total_bytes
                or not _same_device(out.device, device) or out.data_ptr() % ALIGNMENT):
            raise ValueError(f"out must be a 1-D uint8 tensor on {device} of at least {manifest.total_bytes} bytes, "
                             f"starting at a multiple of {ALIGNMENT}")
        out = out[: manifest.total_bytes]
    if host_pool is not None and dram_cache is not None and host_pool is not dram_cache.host_pool:
        raise ValueError("host_pool= and dram_cache= do not combine (the cache recycles into its own pool)")
    is_staged = staged or device.type != "cpu"
    if is_staged:
        pool = pool or default_pool()
        chunk_bytes = min(chunk_bytes, pool.buffer_bytes)
    alloc = (dram_cache.host_buffer if dram_cache is not None else host_pool.take if host_pool is not None
             else host_buffer)
    return _Load(path, manifest, device, num_readers, chunk_bytes, verify, io_mode, pool if is_staged else None,
                 out, alloc), raw


def _from_dram(loader: _Load, lease: CacheLease, start: float) -> LoadedCheckpoint:
    """A DRAM hit. A CPU target views the cached buffer itself (no copy; the result holds `lease`); a staged
    target copies out of it, holding the lease only while copying."""
    if loader.is_staged:
        with lease:
            return _finish(loader, loader.from_memory(lease.buffer), "dram", start, None)
    if loader.verify:
        try:
            loader.verify_memory(lease.buffer)
        except BaseException:
            lease.release()
            raise
    return _finish(loader, lease.buffer, "dram", start, lease)


def _from_ssd_into_dram(loader: _Load, dram_cache: DramCache, key: CacheKey, start: float) -> LoadedCheckpoint:
    """A DRAM miss: load from the files, and put the bytes in the cache if they fit its budget. On CPU that is
    the loaded buffer itself, sealed read-only since every later hit shares it; staged, a host copy made as the
    pieces pass (`tee`)."""
    fits = loader.manifest.total_bytes <= dram_cache.budget_bytes
    if not loader.is_staged:
        buffer = loader.direct()
        lease = None
        if fits:
            seal_read_only(buffer)  # no writer may touch what later hits share
            lease = dram_cache.put(key, buffer)
        return _finish(loader, buffer, "ssd", start, lease)
    tee = dram_cache.host_buffer(loader.manifest.total_bytes) if fits else None
    buffer = loader.from_files(tee=tee)
    if tee is not None:
        seal_read_only(tee)
        tee_lease = dram_cache.put(key, tee)
        if tee_lease is not None:
            tee_lease.release()
    return _finish(loader, buffer, "ssd", start, None)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _finish(loader: _Load, buffer: torch.Tensor, tier: str, start: float, lease: CacheLease | None) -> LoadedCheckpoint:
    tensors = tensor_views(loader.manifest, buffer)
    report = LoadReport(source_tier=tier, num_bytes=loader.manifest.total_bytes, load_s=time.perf_counter() - start,
                        init_s=0.0)
    log.debug("loaded %s to %s from %s: %d bytes in %.3f s (%.2f GB/s)", loader.path, loader.device, tier,
              report.num_bytes, report.load_s, report.num_bytes / max(report.load_s, 1e-9) / 1e9)
    return LoadedCheckpoint(loader.path, loader.manifest, tensors, buffer, report, lease)


class _Load:
    """One load's plan and pipelines. Pieces are handed out in file order (model order), so a load that
    streams through the pool delivers layer 0 first and the disk sees near-sequential reads."""

    def __init__(self, path: Path, manifest: Manifest, device: torch.device, num_readers: int, chunk_bytes: int,
                 verify: bool, io_mode: IoMode, pool: BufferPool | None, out: torch.Tensor | None = None,
                 alloc: Callable[[int], torch.Tensor] = host_buffer) -> None:
        self.path, self.manifest, self.device, self.out, self.alloc = path, manifest, device, out, alloc
        self.num_readers, self.chunk_bytes, self.verify = num_readers, chunk_bytes, verify
        self.io_mode, self.pool = io_mode, pool
        self.is_staged = pool is not None  # through the staging pool (CUDA, or staged=True), else direct
        self.segments = self._plan()

    def _plan(self) -> list[_Segment]:
        """Without verify: one piece per segment. With it: one segment per manifest chunk, so the reader
        that owns a chunk feeds its pieces to one hasher in order."""
        segments: list[_Segment] = []
        for index, (part, base) in enumerate(zip(self.manifest.partitions, self.manifest.partition_offsets(),
                                                 strict=True)):
            if self.verify:
                for (lo, hi), digest in zip(self.manifest.chunk_ranges(index), part.chunk_digests, strict=True):
                    segments.append(_Segment(self._pieces(index, base, lo, hi), digest))
            else:
                segments.extend(_Segment((p,)) for p in self._pieces(index, base, 0, part.nbytes))
        return segments

    def _pieces(self, partition: int, base: int, lo: int, hi: int) -> tuple[_Piece, ...]:
        return tuple(_Piece(partition, off, min(self.chunk_bytes, hi - off), base + off)
                     for off in range(lo, hi, self.chunk_bytes))

    def direct(self) -> torch.Tensor:
        """CPU target: a checkpoint the page cache holds whole ("auto" mode) is mapped, not copied (`mapped`);
        otherwise every piece goes straight into its place in one page-aligned host buffer (fresh or recycled)."""
        files = PartitionFiles(self.path, self.manifest, self.io_mode)
        try:
            if self.out is None and files.is_all_cached() and can_map(self.manifest):
                buffer = map_checkpoint(self.path, self.manifest)
                if self.verify:
                    self.verify_memory(buffer)
                return buffer
            buffer = self.alloc(self.manifest.total_bytes) if self.out is None else self.out
            whole = memoryview(buffer.numpy())

            def work(segment: _Segment, cancel: threading.Event) -> None:
                hasher = xxhash.xxh3_128() if segment.digest else None
                for piece in segment.pieces:
                    view = whole[piece.dst : piece.dst + piece.nbytes]
                    files.read(piece.partition, piece.offset, view)
                    if hasher is not None:
                        hasher.update(view)
                self._check(segment, hasher)

            run_threads(self.segments, self.num_readers, work)
        finally:
            files.close()
        return buffer

    def from_files(self, tee: torch.Tensor | None) -> torch.Tensor:
        """Staged: files -> pool buffers -> device. `tee`, if given, also receives every byte (host copy)."""
        files = PartitionFiles(self.path, self.manifest, self.io_mode)
        try:
            return self._staged(lambda piece, view, _: files.read(piece.partition, piece.offset, view), tee)
        finally:
            files.close()

    def from_memory(self, host: torch.Tensor) -> torch.Tensor:
        """A DRAM hit on a staged target: a pinned host buffer copies in one go; a pageable one goes through
        the pinned pool (a CPU copy per piece by the readers, in parallel, then an async device copy; with
        `verify` each chunk is hashed in the staging buffers, i.e. the very bytes sent to the device)."""
        if host.is_pinned() and self.device.type == "cuda":
            if self.verify:
                self.verify_memory(host)
            out = torch.empty(host.numel(), dtype=torch.uint8, device=self.device) if self.out is None else self.out
            stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream):
                out.copy_(host, non_blocking=True)
            stream.synchronize()
            return out

        def fill(piece: _Piece, _view: memoryview, staging: torch.Tensor) -> None:
            staging.copy_(host[piece.dst : piece.dst + piece.nbytes])

        return self._staged(fill, None)

    def verify_memory(self, host: torch.Tensor) -> None:
        """Hash every manifest chunk of a host buffer already holding the checkpoint."""
        whole = memoryview(host.numpy())
        for index, (part, base) in enumerate(zip(self.manifest.partitions, self.manifest.partition_offsets(),
                                                 strict=True)):
            for (lo, hi), digest in zip(self.manifest.chunk_ranges(index), part.chunk_digests, strict=True):
                if xxhash.xxh3_128_hexdigest(whole[base + lo : base + hi]) != digest:
                    raise ChecksumMismatch(part.file, lo, hi)

    def _staged(self, fill: _Fill, tee: torch.Tensor | None) -> torch.Tensor:
        """Readers fill pool buffers with `fill(piece, view, staging)`; this thread copies them to the device."""
        pool = self.pool
        assert pool is not None
        out = self.out if self.out is not None else torch.empty(self.manifest.total_bytes, dtype=torch.uint8,
                                                                device=self.device)
        landed: queue.SimpleQueue[Landed | None] = queue.SimpleQueue()

        def work(segment: _Segment, cancel: threading.Event) -> None:
            hasher = xxhash.xxh3_128() if segment.digest else None
            for piece in segment.pieces:
                buf = pool.acquire(cancel)
                if buf is None:
                    return  # cancelled: another thread failed
                try:
                    staging = buf[: piece.nbytes]
                    view = memoryview(staging.numpy())
                    fill(piece, view, staging)
                    if hasher is not None:
                        hasher.update(view)
                    if tee is not None:
                        tee[piece.dst : piece.dst + piece.nbytes].copy_(staging)
                except BaseException:
                    pool.release(buf)
                    raise
                landed.put((buf, piece.dst, piece.nbytes))
            self._check(segment, hasher)

        copier = CudaCopier(out, pool) if self.device.type == "cuda" else SyncCopier(out, pool)
        threads = start_threads(self.segments, self.num_readers, work, on_exit=lambda: landed.put(None))
        try:
            remaining = len(threads.workers)
            while remaining:
                item = copier.next_item(landed)
                if item is None:
                    remaining -= 1
                elif threads.cancel.is_set():
                    pool.release(item[0])  # a reader failed: drain without copying
                else:
                    copier.submit(*item)
        except BaseException as exc:
            threads.fail(exc)  # wakes readers waiting for a buffer; they stop taking work
        finally:
            try:
                copier.finish()
            except BaseException as exc:
                threads.fail(exc)
            threads.join()
            while True:  # after a failure, buffers may still sit in the queue
                try:
                    item = landed.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pool.release(item[0])
        threads.raise_first()
        return out

    def _check(self, segment: _Segment, hasher: xxhash.xxh3_128 | None) -> None:
        if hasher is not None and hasher.hexdigest() != segment.digest:
            raise segment.mismatch(self.manifest.partitions[segment.pieces[0].partition].file)
