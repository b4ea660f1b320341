"""A checkpoint whose bytes are all in the page cache, loaded for the CPU without a copy: its data files mapped
into one contiguous region in the loader's buffer layout.

Copying a checkpoint the page cache already holds costs a read of every byte and a first touch of every page
of fresh memory (~4 GB/s on the development VM); safetensors and torch's mmap load the same bytes by mapping
them. `map_checkpoint` reserves one address range of the checkpoint's size and maps each partition file over
its part of it (`MAP_FIXED`), so `tensor_views` works on the result as on a loaded buffer. The mapping is
private and writable: an engine that writes a weight gets its own copy of that page (copy-on-write), the file
and the page cache are never written. Pages are faulted in where they are first read, from the page cache.

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



def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
