"""A checkpoint's tensors as views of its mapped data files: loaded for the CPU without a copy when the page
cache holds all of it (`map_checkpoint`), or read a shard at a time by a tensor-parallel rank (`map_tensors`).

Copying a checkpoint the page cache already holds costs a read of every byte and a first touch of every page
of fresh memory (~4 GB/s on the development VM); safetensors and torch's mmap load the same bytes by mapping
them. `map_checkpoint` reserves one address range of the checkpoint's size and maps each partition file over
its part of it (`MAP_FIXED`), so `tensor_views` works on the result as on a loaded buffer. The mapping is
private and writable: an engine that writes a weight gets its own copy of that page (copy-on-write), the file
and the page cache are never written. Pages are faulted in where they are first read, from the page cache.

`map_tensors` maps each data file on its own instead (at an address the kernel picks, so any page size does)
for a tensor-parallel rank, which narrows the full tensors to its shard: only the pages a view is read through
are faulted in (`sllmd.checkpoint.shards` says which bytes those are), from the page cache or the disk.

The files must not shrink while mapped (a page past the end of a file faults with SIGBUS): store entries are
published whole and never truncated, only removed, and a removed file stays readable through its mapping.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from pathlib import Path

import torch

from sllmd.checkpoint.manifest import Manifest
from sllmd.checkpoint.reader import open_partition
from sllmd.checkpoint.tensors import torch_dtype

PAGE_BYTES = mmap.PAGESIZE
# Python 3.11's mmap module names neither (their Linux values).
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
_PROT_NONE = getattr(mmap, "PROT_NONE", 0)
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()


def can_map(manifest: Manifest) -> bool:
    """Whether `map_checkpoint` can lay out this checkpoint: every partition starts on a page boundary."""
    return _LIBC is not None and all(base % PAGE_BYTES == 0 for base in manifest.partition_offsets())


def map_checkpoint(path: Path, manifest: Manifest) -> torch.Tensor:
    """The data files of checkpoint `path` mapped in place of one buffer (a 1-D uint8 CPU tensor of
    `manifest.total_bytes`, partition i at `partition_offsets()[i]`); unmapped when the last tensor viewing it
    dies. Requires `can_map(manifest)`. `CorruptCheckpoint` if a file is missing or of the wrong size;
    `OSError` if the kernel refuses a mapping."""
    assert _LIBC is not None
    length = max(_round_up(manifest.total_bytes, PAGE_BYTES), PAGE_BYTES)
    # Reserve the whole range first, so the partitions land side by side whatever else the process maps.
    start = _LIBC.mmap(None, length, _PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if start in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), f"cannot reserve {length} bytes of address space")
    try:
        for part, base in zip(manifest.partitions, manifest.partition_offsets(), strict=True):
            if not part.nbytes:
                continue
            fd = open_partition(path, part)
            try:
                got = _LIBC.mmap(start + base, _round_up(part.nbytes, PAGE_BYTES),
                                 mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED, fd, 0)
            finally:
                os.close(fd)
            if got != start + base:
                raise OSError(ctypes.get_errno(), f"cannot map {path / part.file}")
    except BaseException:
        _LIBC.munmap(start, length)
        raise
    owner = (ctypes.c_ubyte * length).from_address(start)
    # torch.frombuffer keeps `owner` alive while any view of the storage lives; then the range goes.
    weakref.finalize(owner, _LIBC.munmap, start, length).atexit = False
    return torch.frombuffer(owner, dtype=torch.uint8)[: manifest.total_bytes]


def map_tensors(path: Path, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint `path` (aliases too, as the very same view) viewing its data file, each file
    mapped on its own, private and copy-on-write like `map_checkpoint`; a file is unmapped when the last view
    of it dies. Nothing is read until a view is. `CorruptCheckpoint` if a file is missing or of the wrong size;
    `OSError` if the kernel refuses a mapping."""
    files: list[torch.Tensor] = []
    for part in manifest.partitions:
        if not part.nbytes:  # mmap refuses an empty file
            files.append(torch.empty(0, dtype=torch.uint8))
            continue
        fd = open_partition(path, part)
        try:
            # torch.frombuffer keeps the mmap object alive while any view of it lives; the object unmaps on its end.
            files.append(torch.frombuffer(mmap.mmap(fd, part.nbytes, access=mmap.ACCESS_COPY), dtype=torch.uint8))
        finally:
            os.close(fd)
    views = {t.name: files[t.partition][t.offset : t.end].view(torch_dtype(t.dtype)).view(t.shape)
             for t in manifest.tensors}
    for alias, target in manifest.aliases.items():
        views[alias] = views[target]
    return views


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
