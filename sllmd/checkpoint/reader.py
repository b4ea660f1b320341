"""Read an sllmd v1 checkpoint back: its manifest, its data files, a full verify, a reference reader.

`PartitionFiles` is how the fast loader (`sllmd.checkpoint.loader`) reads data files: O_DIRECT where the
filesystem allows, the page cache where it already holds the bytes. `read_tensors` is the plain,
obviously-correct reader that tests compare the loader against: one buffer, one sequential pass, no threads.
`verify` re-hashes every chunk (`sllmd verify DIR`, which is `sllmd.tools.verify`). `resident_fraction` says how
much of a checkpoint the page cache holds (what makes a load in another process, e.g. vLLM's worker, a DRAM-tier
load). Nothing here imports transformers; only `read_tensors` imports torch.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import xxhash

from sllmd.checkpoint.errors import CheckpointNotFound, ChecksumMismatch, CorruptCheckpoint
from sllmd.checkpoint.layout import PartitionHasher
from sllmd.checkpoint.manifest import HASH_ALGO, MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, PartitionEntry

if TYPE_CHECKING:
    import torch

_VERIFY_BLOCK_BYTES = 16 << 20  # one reusable buffer for verify reads


IoMode = Literal["auto", "direct", "buffered"]
_O_DIRECT = getattr(os, "O_DIRECT", 0)


def read_manifest_bytes(path: Path) -> bytes:
    """The raw `manifest.json` of checkpoint directory `path` (at most MAX_MANIFEST_BYTES + 1 bytes, so an
    oversized one still fails `Manifest.parse`); `CheckpointNotFound` if there is none."""
    try:
        with open(Path(path) / MANIFEST_FILE, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{path}: not an sllmd checkpoint (no {MANIFEST_FILE})") from None


def read_manifest(path: Path) -> Manifest:
    """The validated manifest of checkpoint directory `path`."""
    return Manifest.parse(read_manifest_bytes(path))


def manifest_digest(data: bytes) -> str:
    """Identity of a checkpoint's contents: the xxh3-128 of its manifest bytes (which hold every data
    file's digest), as `HASH_ALGO:hex`."""
    return f"{HASH_ALGO}:{xxhash.xxh3_128_hexdigest(data)}"


def open_partition(root: Path, part: PartitionEntry, flags: int = 0) -> int:
    """An fd of partition file `part` opened read-only with extra `flags`, after checking its size.
    `CorruptCheckpoint` if it is missing or its size is not the manifest's. `OSError` from `open` otherwise
    (EINVAL when a filesystem refuses O_DIRECT)."""
    try:
        fd = os.open(Path(root) / part.file, os.O_RDONLY | flags)
    except FileNotFoundError:
        raise CorruptCheckpoint(f"{root}: {part.file} is missing") from None
    size = os.fstat(fd).st_size
    if size != part.nbytes:
        os.close(fd)
        raise CorruptCheckpoint(f"{root}: {part.file} is {size} bytes, the manifest says {part.nbytes}")
    return fd


def read_exactly(fd: int, view: memoryview, offset: int, name: str) -> None:
    """Fill `view` from byte `offset` of `fd`; `CorruptCheckpoint` at a premature end of file."""
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise CorruptCheckpoint(f"{name}: unexpected end of file at byte {offset + done}")
        done += got


@dataclass(frozen=True)
class VerifyReport:
    path: Path
    num_tensors: int
    num_partitions: int
    num_chunks: int
    num_bytes: int
    seconds: float


def read_partition(root: Path, manifest: Manifest, index: int, buffer: memoryview) -> Iterator[memoryview]:
    """Partition `index` of the checkpoint at `root`, read sequentially (buffered) as consecutive views of
    `buffer`, each valid until the next is yielded. `CorruptCheckpoint` if the file is missing, of the wrong
    size or ends early."""
    part = manifest.partitions[index]
    fd = open_partition(root, part)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        for offset in range(0, part.nbytes, len(buffer)):
            view = buffer[: min(len(buffer), part.nbytes - offset)]
            read_exactly(fd, view, offset, part.file)
            yield view
    finally:
        os.close(fd)


def check_partition(manifest: Manifest, index: int, hasher: PartitionHasher) -> None:
    """`ChecksumMismatch` naming the first range of partition `index` whose hash in `hasher` (fed the whole
    partition) differs from the manifest's."""
    part = manifest.partitions[index]
    digest, chunk_digests = hasher.finish()
    for (lo, hi), want, got in zip(manifest.chunk_ranges(index), part.chunk_digests, chunk_digests, strict=True):
        if want != got:
            raise ChecksumMismatch(part.file, lo, hi)
    if digest != part.digest:
        raise ChecksumMismatch(part.file, 0, part.nbytes)


def verify(path: Path) -> VerifyReport:
    """Re-hash every chunk of every partition; `ChecksumMismatch` names the first bad partition and range."""
    path, start = Path(path), time.monotonic()
    manifest = read_manifest(path)
    buffer = memoryview(bytearray(_VERIFY_BLOCK_BYTES))
    for index in range(len(manifest.partitions)):
        hasher = PartitionHasher(manifest.chunk_bytes)
        for view in read_partition(path, manifest, index, buffer):
            hasher.update(view)
        check_partition(manifest, index, hasher)
    return VerifyReport(path, len(manifest.tensors), len(manifest.partitions),
                        sum(len(p.chunk_digests) for p in manifest.partitions), manifest.total_bytes,
                        time.monotonic() - start)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Reference reader: all partitions into one CPU buffer, tensors (aliases too) as views into it."""
    import torch

    from sllmd.checkpoint.tensors import tensor_views

    path = Path(path)
    manifest = read_manifest(path)
    buffer = torch.empty(manifest.total_bytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy()).cast("B")
    for part, base in zip(manifest.partitions, manifest.partition_offsets(), strict=True):
        fd = open_partition(path, part)
        try:
            read_exactly(fd, view[base : base + part.nbytes], 0, part.file)
        finally:
            os.close(fd)
    return tensor_views(manifest, buffer)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """libc with the prototypes `_resident_pages` needs; None where there is no such library."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _resident_pages(fd: int, nbytes: int) -> bytes | None:
    """One byte per page of the file, non-zero where the page cache holds it (mincore on a mapping that is
    never touched, so asking reads nothing); None where this cannot be asked."""
    libc = _libc()
    if libc is None or nbytes == 0:
        return None if libc is None else b""
    addr = libc.mmap(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = (ctypes.c_ubyte * -(-nbytes // mmap.PAGESIZE))()
        return bytes(vec) if libc.mincore(addr, nbytes, vec) == 0 else None
    finally:
        libc.munmap(addr, nbytes)


def _resident_sample(fd: int, nbytes: int, offsets: list[int]) -> bytes | None:
    """Like `_resident_pages`, for only the pages at byte `offsets` of the file (one mincore each)."""
    libc = _libc()
    if libc is None or not offsets:
        return None if libc is None else b""
    addr = libc.mmap(None, nbytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = (ctypes.c_ubyte * 1)()
        found = bytearray()
        for offset in offsets:
            if libc.mincore(addr + offset - offset % mmap.PAGESIZE, 1, vec) != 0:
                return None
            found.append(vec[0])
        return bytes(found)
    finally:
        libc.munmap(addr, nbytes)


def resident_fraction(path: Path, *, num_samples: int | None = None) -> float:
    """The fraction, in [0, 1], of checkpoint directory `path`'s data-file pages that the kernel's page cache
    holds now (1.0 for a checkpoint of no bytes; 0.0 where mincore cannot be asked). Reads no data. A
    snapshot: the kernel may evict pages at any moment after.

    `num_samples` None asks every page: exact, ~14 ms per GiB of kernel time. Otherwise only that many
    pages, evenly spaced over the data, are asked (~2 us each, whatever the size): an estimate, for callers
    that ask often. `CheckpointNotFound` / `CorruptCheckpoint` / `OSError` as `open_partition`."""
    if num_samples is not None and num_samples < 1:
        raise ValueError("num_samples must be at least 1")
    path = Path(path)
    manifest = read_manifest(path)
    if num_samples is not None:
        num_samples = min(num_samples, -(-manifest.total_bytes // mmap.PAGESIZE))
        positions = [i * manifest.total_bytes // num_samples for i in range(num_samples)] if num_samples else []
    num_pages = num_resident = 0
    for part, base in zip(manifest.partitions, manifest.partition_offsets(), strict=True):
        fd = open_partition(path, part)
        try:
            if num_samples is None:
                resident = _resident_pages(fd, part.nbytes)
            else:
                resident = _resident_sample(fd, part.nbytes,
                                            [p - base for p in positions if base <= p < base + part.nbytes])
        finally:
            os.close(fd)
        if resident is None:
            return 0.0
        num_pages += len(resident)
        num_resident += len(resident) - resident.count(0)
    return num_resident / num_pages if num_pages else 1.0


def drop_from_page_cache(path: Path) -> None:
    """Drop the page-cache pages of checkpoint `path`'s data files (no root needed), so the next load reads the
    disk. Only written-back pages can be dropped, so each file is synced first. A filesystem that keeps its
    files in memory (tmpfs) keeps them."""
    for part in read_manifest(path).partitions:
        fd = open_partition(path, part)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class PartitionFiles:
    """The open data files of one load: a buffered fd per partition, and an O_DIRECT fd where allowed.
    Shared by the readers (`preadv` is positional, so fds need no locking).

    In "auto" mode a piece whose pages are all in the page cache (asked once per file, at open) is copied
    from there (`is_all_cached`: every piece is); any other piece is read with O_DIRECT. (Probing with
    `preadv2(RWF_NOWAIT)` instead was measured 25% slower cold: a refused non-blocking read still starts
    readahead, so the disk reads twice.)
    """

    def __init__(self, root: Path, manifest: Manifest, io_mode: IoMode) -> None:
        self._manifest = manifest
        self._fds: list[int] = []  # every fd opened, closed by close()
        self._buffered: list[int] = []
        self._direct: list[int | None] = []  # None: this file is read buffered
        self._resident: list[bytes | None] = []  # per page, from mincore; None: unknown
        try:
            for part in manifest.partitions:
                fd = open_partition(root, part)
                self._fds.append(fd)
                self._buffered.append(fd)
                direct = self._open_direct(root, part) if io_mode != "buffered" else None
                if direct is not None:
                    self._fds.append(direct)
                else:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._direct.append(direct)
                self._resident.append(_resident_pages(fd, part.nbytes) if io_mode == "auto" else None)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open_direct(root: Path, part: PartitionEntry) -> int | None:
        if not _O_DIRECT:
            return None
        try:
            return open_partition(root, part, _O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # this filesystem refuses O_DIRECT (tmpfs): buffered reads only
                return None
            raise

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def is_all_cached(self) -> bool:
        """Whether the page cache held every page of every file at open ("auto" mode only; else False)."""
        return all(resident is not None and all(resident) for resident in self._resident)

    def _is_cached(self, partition: int, offset: int, nbytes: int) -> bool:
        resident = self._resident[partition]
        if resident is None:
            return False
        return all(resident[offset // mmap.PAGESIZE : -(-(offset + nbytes) // mmap.PAGESIZE)])

    def read(self, partition: int, offset: int, view: memoryview) -> None:
        """Fill `view` with the bytes at `offset` of partition `partition` (for O_DIRECT, `view` and `offset`
        should be 4 KiB-aligned; where they are not, the file is read buffered from then on)."""
        done, nbytes = 0, len(view)
        if not self._is_cached(partition, offset, nbytes):
            while done < nbytes and (direct := self._direct[partition]) is not None:
                try:
                    got = os.preadv(direct, [view[done:]], offset + done)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct[partition] = None  # an alignment this device refuses: read this file buffered
                    break
                done += self._check_progress(got, partition, offset + done)
        while done < nbytes:
            got = os.preadv(self._buffered[partition], [view[done:]], offset + done)
            done += self._check_progress(got, partition, offset + done)

    def _check_progress(self, got: int, partition: int, position: int) -> int:
        if got == 0:  # the file shrank after open_partition checked its size
            raise CorruptCheckpoint(f"{self._manifest.partitions[partition].file}: unexpected end of file at "
                                    f"byte {position}")
        return got
