"""Per-rank byte ranges (`sllmd.checkpoint.shards`) and the mapped views a tensor-parallel rank narrows
(`mapped.map_tensors`), rank by rank: the ranges as a table and against torch's own view geometry, each rank's
narrowed view bit-equal to the slice of the full tensor, and reading it faulting in only its ranges' pages."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import pytest
import torch

from sllmd.checkpoint import reader as reader_module
from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.manifest import TensorEntry
from sllmd.checkpoint.mapped import map_tensors
from sllmd.checkpoint.reader import drop_from_page_cache, read_manifest, read_tensors
from sllmd.checkpoint.shards import narrow_ranges, shard_ranges
from sllmd.checkpoint.tensors import dtype_name

PAGE = mmap.PAGESIZE


def entry(shape: tuple[int, ...], dtype: str = "F32", offset: int = 4096) -> TensorEntry:
    num_bytes = {"F32": 4, "BF16": 2, "U8": 1}[dtype]
    for size in shape:
        num_bytes *= size
    return TensorEntry("w", dtype, shape, partition=0, offset=offset, nbytes=num_bytes)


@pytest.mark.parametrize(("tensor", "dim", "rank", "world_size", "expected"), [
    # dim 0: one contiguous range, the rank's rows
    (entry((8, 6)), 0, 1, 2, [(4096 + 4 * 24, 4 * 24)]),
    (entry((8, 6)), 0, 3, 4, [(4096 + 6 * 24, 2 * 24)]),
    # dim 1 of a matrix: one range per row, a row (24 bytes) apart
    (entry((3, 6)), 1, 0, 2, [(4096, 12), (4120, 12), (4144, 12)]),
    (entry((3, 6)), 1, 1, 2, [(4108, 12), (4132, 12), (4156, 12)]),
    (entry((2, 6), "BF16", offset=0), 1, 2, 3, [(8, 4), (20, 4)]),
    # dim 1 of a 3-D tensor: one range per index of dim 0, each spanning whole inner rows
    (entry((2, 6, 10), "BF16", offset=0), 1, 2, 3, [(80, 40), (200, 40)]),
    # the last dimension of a 3-D tensor: one range per (i, j)
    (entry((2, 2, 4), "U8", offset=64), 2, 1, 2, [(66, 2), (70, 2), (74, 2), (78, 2)]),
    # one rank keeps everything, whatever the dimension: the runs merge
    (entry((4, 6)), 1, 0, 1, [(4096, 96)]),
    (entry((5,)), 0, 0, 1, [(4096, 20)]),
    # empty tensors read nothing
    (entry((0, 6)), 1, 1, 2, []),
    (entry((4, 0)), 0, 0, 2, []),
])
def test_shard_ranges_table(tensor: TensorEntry, dim: int, rank: int, world_size: int,
                            expected: list[tuple[int, int]]) -> None:
    assert shard_ranges(tensor, dim, rank, world_size) == expected


@pytest.mark.parametrize(("dim", "rank", "world_size", "match"), [
    (0, 0, 3, "equal parts"),  # 8 rows do not split in 3
    (2, 0, 2, "no dimension"),
    (-1, 0, 2, "no dimension"),
    (0, 2, 2, "not in a world"),
    (0, -1, 2, "not in a world"),
])
def test_shard_ranges_refuses(dim: int, rank: int, world_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shard_ranges(entry((8, 6)), dim, rank, world_size)


def test_narrow_ranges_refuses_a_span_outside_the_dimension() -> None:
    with pytest.raises(ValueError, match="outside"):
        narrow_ranges(entry((8, 6)), 1, 4, 3)


def view_ranges(view: torch.Tensor, base: torch.Tensor) -> list[tuple[int, int]]:
    """The bytes of `base`'s storage that `view` reads, from the view's own geometry, merged."""
    item = view.element_size()
    first = (view.data_ptr() - base.data_ptr()) // item
    offsets = torch.zeros(view.shape, dtype=torch.int64) + first
    for d, (size, stride) in enumerate(zip(view.shape, view.stride(), strict=True)):
        shape = [1] * view.dim()
        shape[d] = size
        offsets = offsets + (torch.arange(size) * stride).view(shape)
    ranges: list[tuple[int, int]] = []
    for element in sorted(offsets.reshape(-1).tolist()):
        if ranges and ranges[-1][0] + ranges[-1][1] == element * item:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + item)
        else:
            ranges.append((element * item, item))
    return ranges


@pytest.mark.parametrize("shape", [(12,), (12, 8), (4, 12, 6), (6, 4, 2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_shard_ranges_are_the_bytes_torchs_narrow_views(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    full = torch.zeros(shape, dtype=dtype)
    stored = TensorEntry("w", dtype_name(dtype), shape, 0, 0, full.numel() * full.element_size())
    for dim, size in enumerate(shape):
        for world_size in (1, 2, 4):
            if size % world_size:
                continue
            part = size // world_size
            for rank in range(world_size):
                view = full.narrow(dim, rank * part, part)
                assert shard_ranges(stored, dim, rank, world_size) == view_ranges(view, full), (dim, rank)


def make_checkpoint(root: Path, state: dict[str, torch.Tensor], partition_max_bytes: int) -> Path:
    src = root / "src"
    src.mkdir(parents=True)
    torch.save(state, src / "pytorch_model.bin")
    convert(src, root / "ckpt", partition_max_bytes=partition_max_bytes, chunk_bytes=4096)
    return root / "ckpt"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes of a transformer layer, several dtypes, in 16 KiB partitions: tensors at offsets past 0 of
    several files, and a tied alias."""
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(64, 32, generator=gen)
    state = {
        "embed.weight": embed,
        "qkv.weight": torch.randn(96, 32, generator=gen).to(torch.bfloat16),
        "o.weight": torch.randn(32, 32, generator=gen).to(torch.bfloat16),
        "norm.weight": torch.randn(32, generator=gen),
        "experts.weight": torch.randn(4, 16, 32, generator=gen).to(torch.float16),
        "lm_head.weight": embed,
    }
    return make_checkpoint(tmp_path_factory.mktemp("shards"), state, partition_max_bytes=16 * 1024)


def test_each_ranks_narrowed_mapped_view_is_its_slice_of_the_tensor(ckpt: Path) -> None:
    manifest = read_manifest(ckpt)
    reference = read_tensors(ckpt)
    views = map_tensors(ckpt, manifest)
    assert set(views) == set(reference) and views["lm_head.weight"] is views["embed.weight"]
    assert len({t.partition for t in manifest.tensors}) > 1 and any(t.offset for t in manifest.tensors)
    for stored in manifest.tensors:
        full = views[stored.name]
        file_start = full.data_ptr() - stored.offset  # the view's data file is mapped from here
        for dim, size in enumerate(stored.shape):
            for world_size in (2, 4):
                part = size // world_size
                for rank in range(world_size):
                    shard = full.narrow(dim, rank * part, part)
                    assert torch.equal(shard, reference[stored.name].narrow(dim, rank * part, part))
                    ranges = shard_ranges(stored, dim, rank, world_size)
                    assert shard.data_ptr() - file_start == ranges[0][0], (stored.name, dim, rank)


def test_a_mapped_view_is_private(ckpt: Path) -> None:
    manifest = read_manifest(ckpt)
    views = map_tensors(ckpt, manifest)
    views["norm.weight"].fill_(7.0)  # an engine writing a weight gets its own copy of the page
    assert not torch.equal(map_tensors(ckpt, manifest)["norm.weight"], views["norm.weight"])


def resident_pages(path: Path) -> set[int]:
    fd = os.open(path, os.O_RDONLY)
    try:
        resident = reader_module._resident_pages(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert resident is not None
    return {page for page, flag in enumerate(resident) if flag}


def pages_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {page for offset, length in ranges for page in range(offset // PAGE, (offset + length - 1) // PAGE + 1)}


def read_shard_unread_ahead(ckpt: Path, name: str, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s shard of tensor `name`, read as a weight loader's `copy_` reads it, through a mapping with
    readahead turned off (MADV_RANDOM), so that the page cache gains exactly the pages read. The mapping is gone
    on return (a live one would keep its pages from being dropped)."""
    manifest = read_manifest(ckpt)
    stored = manifest.entry(name)
    full = map_tensors(ckpt, manifest)[name]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    file_start = full.data_ptr() - stored.offset
    assert libc.madvise(file_start, manifest.partitions[stored.partition].nbytes, mmap.MADV_RANDOM) == 0
    part = stored.shape[dim] // world_size
    return full.narrow(dim, rank * part, part).clone()


@pytest.mark.parametrize(("dim", "world_size"), [(0, 2), (1, 2), (1, 4)])
def test_reading_a_ranks_shard_faults_in_only_its_ranges_pages(tmp_path: Path, dim: int, world_size: int) -> None:
    """On a filesystem whose pages can be dropped (not tmpfs). In service the kernel reads ahead of each fault,
    into the page cache the ranks of a node share."""
    # bf16 rows of 32000 bytes (7.8 pages): shard ranges that start and end inside pages.
    gen = torch.Generator().manual_seed(1)
    ckpt = make_checkpoint(tmp_path, {"before.weight": torch.randn(1500, generator=gen),
                                      "w.weight": torch.randn(16, 16000, generator=gen).to(torch.bfloat16)},
                           partition_max_bytes=1 << 20)
    manifest = read_manifest(ckpt)
    stored = manifest.entry("w.weight")
    reference = read_tensors(ckpt)["w.weight"]
    data_file = ckpt / manifest.partitions[stored.partition].file
    part = stored.shape[dim] // world_size
    for rank in range(world_size):
        drop_from_page_cache(ckpt)
        if resident_pages(data_file):
            pytest.skip("this filesystem keeps its files in memory: nothing to measure")
        shard = read_shard_unread_ahead(ckpt, "w.weight", dim, rank, world_size)
        expected = pages_of(shard_ranges(stored, dim, rank, world_size))
        assert resident_pages(data_file) == expected, rank
        assert torch.equal(shard, reference.narrow(dim, rank * part, part))
        # Well under the whole tensor's pages: a row's part spans whole pages, plus at most one at each end.
        assert len(expected) <= len(pages_of([(stored.offset, stored.nbytes)])) * (1 / world_size + 0.15), rank
