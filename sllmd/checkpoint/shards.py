"""Per-rank byte ranges: which bytes of an sllmd v1 checkpoint a tensor-parallel rank needs.

Tensor parallelism splits a weight along one dimension into `world_size` equal parts and rank r keeps part r
(vLLM's column-parallel layers and vocabulary embeddings split dim 0, its row-parallel layers dim 1). A stored
tensor is contiguous and row-major (the spec), so the part a rank keeps is one run of bytes per index of the
dimensions before the split one: a single range for a dim-0 split, one range per row for a dim-1 split of a
matrix. These are the bytes a rank's weight loaders read when they narrow a mapped view of the data files
(`sllmd.checkpoint.mapped.map_tensors`, which `sllmd.engine.vllm_loader` hands them when the world size is
over 1); the kernel reads them a page at a time, so a rank reads the pages these ranges touch.

Ranges are (offset, length) in bytes of the tensor's data file (partition `entry.partition`), ascending, and
ranges that touch are merged. Pure: no I/O, no torch.
"""

from __future__ import annotations

from math import prod

from sllmd.checkpoint.manifest import DTYPE_SIZES, TensorEntry

ByteRange = tuple[int, int]  # (offset in the data file, length), both in bytes


def narrow_ranges(entry: TensorEntry, dim: int, start: int, length: int) -> list[ByteRange]:
    """The bytes that `tensor.narrow(dim, start, length)` views of the stored tensor `entry`; [] when the
    narrowed tensor is empty. `ValueError` for a dimension or span outside the shape."""
    if not 0 <= dim < len(entry.shape):
        raise ValueError(f"{entry.name}: no dimension {dim} in shape {list(entry.shape)}")
    if start < 0 or length < 0 or start + length > entry.shape[dim]:
        raise ValueError(f"{entry.name}: [{start}, {start + length}) is outside dimension {dim} "
                         f"of size {entry.shape[dim]}")
    slice_bytes = prod(entry.shape[dim + 1:]) * DTYPE_SIZES[entry.dtype]  # one index along `dim`
    run_bytes = length * slice_bytes
    num_runs = prod(entry.shape[:dim])
    if run_bytes == 0 or num_runs == 0:
        return []
    stride = entry.shape[dim] * slice_bytes
    if run_bytes == stride:  # the whole dimension: the runs touch
        return [(entry.offset, num_runs * stride)]
    first = entry.offset + start * slice_bytes
    return [(first + i * stride, run_bytes) for i in range(num_runs)]


def shard_ranges(entry: TensorEntry, dim: int, rank: int, world_size: int) -> list[ByteRange]:
    """The bytes rank `rank` of `world_size` keeps of `entry` split evenly along `dim`: part `rank` of
    `shape[dim] // world_size` indices, as vLLM splits. `ValueError` unless `0 <= rank < world_size` and
    `world_size` divides `shape[dim]` (vLLM refuses such a model too)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if not 0 <= dim < len(entry.shape):
        raise ValueError(f"{entry.name}: no dimension {dim} in shape {list(entry.shape)}")
    size, remainder = divmod(entry.shape[dim], world_size)
    if remainder:
        raise ValueError(f"{entry.name}: dimension {dim} of size {entry.shape[dim]} does not split "
                         f"into {world_size} equal parts")
    return narrow_ranges(entry, dim, rank * size, size)
