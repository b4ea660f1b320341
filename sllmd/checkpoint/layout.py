"""Where a writer puts tensors in data files, and how it hashes them (rules 4 and 5 of the spec, written).

`plan_layout` places tensors in order at 4 KiB-aligned offsets of partitions of bounded size, and
`PartitionHasher` computes a partition's whole-file and per-chunk xxh3-128 digests as its bytes stream past,
so a writer (`sllmd.checkpoint.convert`) and a verifier (`sllmd.checkpoint.reader`) hash the same way.
Pure: no file or network I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import xxhash

from sllmd.checkpoint.manifest import (
    ALIGNMENT,
    CHUNK_BYTES,
    DTYPE_SIZES,
    FILE_ALIGNMENT,
    PARTITION_MAX_BYTES,
    TensorEntry,
    round_up,
)


def plan_layout(specs: Iterable[tuple[str, str, Sequence[int]]], *,
                partition_max_bytes: int = PARTITION_MAX_BYTES) -> tuple[list[TensorEntry], list[int]]:
    """Place (name, dtype, shape) tensors in order: each at the next ALIGNMENT boundary of the current
    partition, or at offset 0 of a new one when it would push the partition past `partition_max_bytes`
    (a tensor bigger than that gets a partition of its own). Returns the entries and padded partition sizes."""
    if not FILE_ALIGNMENT <= partition_max_bytes <= PARTITION_MAX_BYTES:
        raise ValueError(f"partition_max_bytes must be in [{FILE_ALIGNMENT}, {PARTITION_MAX_BYTES}]")
    entries: list[TensorEntry] = []
    ends: list[int] = []
    for name, dtype, shape in specs:
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * DTYPE_SIZES[dtype]
        offset = round_up(ends[-1], ALIGNMENT) if ends else 0
        if not ends or (offset + nbytes > partition_max_bytes and ends[-1] > 0):
            ends.append(0)
            offset = 0
        ends[-1] = max(ends[-1], offset + nbytes)
        entries.append(TensorEntry(name, dtype, tuple(shape), len(ends) - 1, offset, nbytes))
    return entries, [round_up(end, FILE_ALIGNMENT) for end in ends]


class PartitionHasher:
    """Hashes one partition's bytes, fed in file order: the whole file and each `chunk_bytes` chunk."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES) -> None:
        self._chunk_bytes = chunk_bytes
        self._whole = xxhash.xxh3_128()
        self._chunk = xxhash.xxh3_128()
        self._in_chunk = 0
        self._chunk_digests: list[str] = []

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._whole.update(view)
        while view:
            take = min(len(view), self._chunk_bytes - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == self._chunk_bytes:
                self._close_chunk()

    def _close_chunk(self) -> None:
        self._chunk_digests.append(self._chunk.hexdigest())
        self._chunk.reset()
        self._in_chunk = 0

    def finish(self) -> tuple[str, tuple[str, ...]]:
        """(whole-file digest, chunk digests); the hasher is spent afterwards."""
        if self._in_chunk:
            self._close_chunk()
        return self._whole.hexdigest(), tuple(self._chunk_digests)
