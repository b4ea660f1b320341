"""The fast loader, its staging pool and the DRAM cache, on real files: bit-exact against the reference reader."""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from sllmd.checkpoint import loader as loader_module
from sllmd.checkpoint import reader as reader_module
from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.dram import DramCache
from sllmd.checkpoint.errors import CheckpointError, ChecksumMismatch, CorruptCheckpoint
from sllmd.checkpoint.loader import LoadedCheckpoint, load_checkpoint
from sllmd.checkpoint.manifest import Manifest
from sllmd.checkpoint.pool import PAGE_BYTES, BufferPool, CudaCopier, HostMemoryPool, host_buffer, seal_read_only
from sllmd.checkpoint.reader import read_manifest, read_tensors

SHM = Path("/dev/shm")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_same(loaded: LoadedCheckpoint, reference: dict[str, torch.Tensor]) -> None:
    assert set(loaded.tensors) == set(reference)
    for name, tensor in reference.items():
        assert same_bits(loaded.tensors[name].cpu(), tensor), name


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Several dtypes, odd sizes (not multiples of 4 KiB), a scalar, an empty tensor and one shared tensor."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(96, 130, generator=gen)
    return {
        "embed.weight": shared,
        "layers.0.attn.weight": torch.randn(257, 63, generator=gen).to(torch.float16),
        "layers.0.norm.weight": torch.randn(63, generator=gen).to(torch.bfloat16),
        "layers.0.mlp.weight": torch.randn(300, 171, generator=gen),
        "layers.1.ids": torch.randint(-(2**40), 2**40, (1000,), generator=gen),
        "layers.1.mask": torch.rand(777, generator=gen) > 0.5,
        "layers.1.bytes": torch.randint(0, 256, (5000,), dtype=torch.uint8, generator=gen),
        "layers.1.f8": torch.randn(640, generator=gen).to(torch.float8_e4m3fn),
        "layers.1.scale": torch.tensor(3.25, dtype=torch.float64),
        "layers.1.empty": torch.zeros(0, 7),
        "layers.2.big": torch.randn(64 * 1024 + 3, generator=gen),
        "lm_head.weight": shared,  # same storage and view: stored once, loaded as an alias
    }


def make_checkpoint(root: Path, *, seed: int = 0, partition_max_bytes: int = 16 * 1024,
                    chunk_bytes: int = 4096) -> Path:
    src = root / f"src-{seed}"
    src.mkdir(parents=True)
    torch.save(mixed_state(seed), src / "pytorch_model.bin")
    convert(src, root / f"ckpt-{seed}", partition_max_bytes=partition_max_bytes, chunk_bytes=chunk_bytes)
    return root / f"ckpt-{seed}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~600 KiB in 16 KiB partitions (bigger tensors alone), hashed in 4 KiB chunks. Tests only read it
    (they corrupt copies)."""
    return make_checkpoint(tmp_path_factory.mktemp("loader"))


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> dict[str, torch.Tensor]:
    return read_tensors(ckpt)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_is_what_the_tests_need(ckpt: Path) -> None:
    manifest = read_manifest(ckpt)
    assert len(manifest.partitions) >= 6
    assert manifest.aliases == {"lm_head.weight": "embed.weight"}
    assert len({t.dtype for t in manifest.tensors}) >= 8


@pytest.mark.parametrize("options", [
    {},
    {"io_mode": "direct"},
    {"io_mode": "buffered"},
    {"num_readers": 1, "chunk_bytes": 4096},
    {"num_readers": 7, "chunk_bytes": 3 * 4096},
    {"chunk_bytes": 16 << 20},
    {"verify": True},
    {"verify": True, "num_readers": 3, "chunk_bytes": 8192},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_cpu_load_is_bit_exact(ckpt: Path, reference: dict[str, torch.Tensor], options: dict) -> None:
    loaded = load_checkpoint(ckpt, "cpu", **options)
    assert_same(loaded, reference)
    manifest = read_manifest(ckpt)
    assert loaded.buffer.numel() == manifest.total_bytes and loaded.buffer.data_ptr() % PAGE_BYTES == 0
    assert loaded.report.source_tier == "ssd" and loaded.report.num_bytes == manifest.total_bytes
    assert loaded.report.load_s > 0 and loaded.report.init_s == 0
    assert loaded.tensors["lm_head.weight"] is loaded.tensors["embed.weight"]
    lo, hi = loaded.buffer.data_ptr(), loaded.buffer.data_ptr() + loaded.buffer.numel()
    for name, tensor in loaded.tensors.items():  # views into the one buffer: no copy anywhere
        assert not tensor.requires_grad and (lo <= tensor.data_ptr() < hi or not tensor.numel()), name


@pytest.mark.parametrize("options", [
    {"pool": (2, 4096)},  # 8 KiB of staging for a ~700 KiB model: streams through, each buffer reused ~90 times
    {"pool": (3, 8192), "chunk_bytes": 4096, "num_readers": 5},
    {"pool": (4, 16384), "verify": True, "num_readers": 2},
    {"pool": (64, 1 << 20)},  # the whole model fits
], ids=["tiny-pool", "more-readers-than-buffers", "verify", "big-pool"])
def test_staged_pipeline_streams_a_model_bigger_than_the_pool(ckpt: Path, reference: dict[str, torch.Tensor],
                                                               options: dict) -> None:
    num_buffers, buffer_bytes = options.pop("pool")
    pool = BufferPool(num_buffers, buffer_bytes, pin=False)
    loaded = load_checkpoint(ckpt, "cpu", staged=True, pool=pool, **options)
    assert_same(loaded, reference)
    assert pool.num_free == num_buffers  # every buffer came back


def test_load_into_a_given_buffer(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    total = read_manifest(ckpt).total_bytes
    out = host_buffer(total + 8192, populate=True)
    loaded = load_checkpoint(ckpt, "cpu", out=out)
    assert loaded.buffer.data_ptr() == out.data_ptr() and loaded.buffer.numel() == total
    assert_same(loaded, reference)
    staged = host_buffer(total)
    loaded = load_checkpoint(ckpt, "cpu", out=staged, staged=True, pool=BufferPool(2, 8192, pin=False))
    assert loaded.buffer.data_ptr() == staged.data_ptr()
    assert_same(loaded, reference)
    with pytest.raises(ValueError):
        load_checkpoint(ckpt, "cpu", out=torch.empty(total - 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 4096"):
        load_checkpoint(ckpt, "cpu", out=host_buffer(total + 64)[64:])
    with pytest.raises(ValueError):
        load_checkpoint(ckpt, "cpu", out=out, dram_cache=DramCache(1 << 30))


def test_loads_from_tmpfs_whether_or_not_it_takes_o_direct(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    """tmpfs refused O_DIRECT (EINVAL) before Linux 6.6 and takes it since: either way the load works."""
    if not SHM.is_dir():
        pytest.skip("no /dev/shm")
    shm_ckpt = copy_checkpoint(ckpt, SHM / f"sllmd-test-{os.getpid()}-{time.monotonic_ns()}")
    try:
        for options in ({"io_mode": "direct"}, {}, {"staged": True, "pool": BufferPool(2, 8192, pin=False)}):
            assert_same(load_checkpoint(shm_ckpt, "cpu", **options), reference)
    finally:
        shutil.rmtree(shm_ckpt)


def test_o_direct_open_refused_falls_back_to_buffered(ckpt: Path, reference: dict[str, torch.Tensor],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """What tmpfs before Linux 6.6 (and some FUSE and network filesystems) do: open(O_DIRECT) fails with EINVAL."""
    real_open = os.open
    refused = []

    def open_(path: str | Path, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            refused.append(path)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(reader_module.os, "open", open_)
    for options in ({"io_mode": "direct"}, {}, {"staged": True, "pool": BufferPool(2, 8192, pin=False)}):
        assert_same(load_checkpoint(ckpt, "cpu", **options), reference)
    assert refused


def test_o_direct_read_refused_mid_load_falls_back(ckpt: Path, reference: dict[str, torch.Tensor],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that accepts the O_DIRECT open but not our reads (alignment) degrades to buffered reads."""
    real_preadv = os.preadv
    refused = []

    def preadv(fd: int, buffers: list, offset: int, *flags: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(reader_module.os, "preadv", preadv)
    assert_same(load_checkpoint(ckpt, "cpu", io_mode="direct"), reference)
    assert refused  # the direct path was tried


def test_page_cache_residency_is_seen(ckpt: Path) -> None:
    manifest = read_manifest(ckpt)
    fd = os.open(ckpt / manifest.partitions[0].file, os.O_RDONLY)
    try:
        os.read(fd, manifest.partitions[0].nbytes)  # now in the page cache
        resident = reader_module._resident_pages(fd, manifest.partitions[0].nbytes)
    finally:
        os.close(fd)
    assert resident is not None and all(resident)


def test_verify_detects_a_flipped_byte_only_when_asked(ckpt: Path, tmp_path: Path) -> None:
    bad = copy_checkpoint(ckpt, tmp_path / "bad")
    manifest = read_manifest(bad)
    part = manifest.partitions[3]
    data = bytearray((bad / part.file).read_bytes())
    data[5000] ^= 0x10
    (bad / part.file).write_bytes(data)
    load_checkpoint(bad, "cpu")  # the loader trusts convert/fetch by default
    for options in ({}, {"num_readers": 1}, {"staged": True, "pool": BufferPool(2, 4096, pin=False)}):
        with pytest.raises(ChecksumMismatch) as info:
            load_checkpoint(bad, "cpu", verify=True, **options)
        assert (info.value.partition, info.value.start, info.value.end) == (part.file, 4096, 8192)


def test_missing_or_truncated_partition_is_a_clear_error(ckpt: Path, tmp_path: Path) -> None:
    bad = copy_checkpoint(ckpt, tmp_path / "bad")
    with open(bad / "data-00003.bin", "r+b") as f:
        f.truncate(8192)
    for options in ({}, {"staged": True, "pool": BufferPool(2, 4096, pin=False)}):
        with pytest.raises(CorruptCheckpoint, match=r"data-00003\.bin is 8192 bytes, the manifest says \d+"):
            load_checkpoint(bad, "cpu", **options)
    (bad / "data-00003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"data-00003\.bin is missing"):
        load_checkpoint(bad, "cpu")


def test_a_failing_reader_stops_the_staged_pipeline_and_returns_every_buffer(
        ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real_read = reader_module.PartitionFiles.read

    def flaky(self: reader_module.PartitionFiles, partition: int, offset: int, view: memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 20:
            raise OSError(errno.EIO, "Input/output error")
        real_read(self, partition, offset, view)

    monkeypatch.setattr(reader_module.PartitionFiles, "read", flaky)
    pool = BufferPool(3, 4096, pin=False)
    with pytest.raises(OSError, match="Input/output error"):
        load_checkpoint(ckpt, "cpu", staged=True, pool=pool, num_readers=4, chunk_bytes=4096)
    assert pool.num_free == 3


# ---- DRAM cache -----------------------------------------------------------------------------------------


def region_permissions(address: int) -> str:
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            return perms
    raise AssertionError("address not mapped")


def test_dram_hit_hands_over_the_same_read_only_buffer(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    cache = DramCache(10 << 20)
    first = load_checkpoint(ckpt, "cpu", dram_cache=cache)
    hit = load_checkpoint(ckpt, "cpu", dram_cache=cache)
    assert (first.report.source_tier, hit.report.source_tier) == ("ssd", "dram")
    assert hit.buffer is first.buffer  # no copy: the very buffer the first load filled
    assert all(hit.tensors[n].data_ptr() == first.tensors[n].data_ptr() for n in reference)
    assert_same(hit, reference)
    assert cache.used_bytes == read_manifest(ckpt).total_bytes and len(cache) == 1
    if os.path.exists("/proc/self/maps"):
        assert region_permissions(hit.buffer.data_ptr()).startswith("r-")  # sealed: a stray write faults
    staged = load_checkpoint(ckpt, "cpu", dram_cache=cache, staged=True, pool=BufferPool(2, 8192, pin=False))
    assert staged.report.source_tier == "dram" and staged.buffer.data_ptr() != first.buffer.data_ptr()
    assert_same(staged, reference)  # the copy-only path (what CUDA does), through the pool
    assert_same(load_checkpoint(ckpt, "cpu", dram_cache=cache, verify=True), reference)
    assert cache.num_hits == 3 and cache.num_misses == 1


def test_lru_eviction_under_budget_never_evicts_a_buffer_in_use(ckpt: Path, tmp_path: Path) -> None:
    size = read_manifest(ckpt).total_bytes
    a, b, c = (copy_checkpoint(ckpt, tmp_path / name) for name in "abc")  # same bytes, three identities
    cache = DramCache(2 * size + size // 2)  # room for two
    for path in (a, b):
        load_checkpoint(path, "cpu", dram_cache=cache).release()
    load_checkpoint(a, "cpu", dram_cache=cache).release()  # a is now more recent than b
    load_checkpoint(c, "cpu", dram_cache=cache).release()
    assert [Path(k[0]).name for k in cache.lru_keys()] == ["a", "c"]  # b, least recently used, went
    assert cache.used_bytes == 2 * size and cache.num_evictions == 1

    in_use_a = load_checkpoint(a, "cpu", dram_cache=cache)
    in_use_c = load_checkpoint(c, "cpu", dram_cache=cache)
    assert in_use_a.report.source_tier == in_use_c.report.source_tier == "dram"
    loaded_b = load_checkpoint(b, "cpu", dram_cache=cache)  # no room: both entries are in use
    assert loaded_b.report.source_tier == "ssd"
    assert [Path(k[0]).name for k in cache.lru_keys()] == ["a", "c"]
    in_use_c.release()
    in_use_c.release()  # idempotent
    del loaded_b
    load_checkpoint(b, "cpu", dram_cache=cache).release()
    assert [Path(k[0]).name for k in cache.lru_keys()] == ["a", "b"]  # c was free to go; a still is not
    in_use_a.release()


def test_lease_is_released_when_the_loaded_checkpoint_is_collected(ckpt: Path) -> None:
    cache = DramCache(10 << 20)
    loaded = load_checkpoint(ckpt, "cpu", dram_cache=cache)
    key = cache.lru_keys()[0]
    assert not cache.evict(key)  # in use
    del loaded
    assert cache.evict(key) and len(cache) == 0 and cache.used_bytes == 0


def test_concurrent_loads_of_one_checkpoint_read_the_disk_once(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    cache = DramCache(10 << 20)
    results: list[LoadedCheckpoint] = []
    barrier = threading.Barrier(4)

    def load() -> None:
        barrier.wait()
        results.append(load_checkpoint(ckpt, "cpu", dram_cache=cache))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.report.source_tier for r in results) == ["dram", "dram", "dram", "ssd"]
    assert len({r.buffer.data_ptr() for r in results}) == 1
    assert_same(results[0], reference)


def test_concurrent_loads_share_one_pool(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    pool = BufferPool(3, 8192, pin=False)
    results: list[LoadedCheckpoint] = []
    threads = [threading.Thread(target=lambda: results.append(load_checkpoint(ckpt, "cpu", staged=True, pool=pool)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and pool.num_free == 3
    for loaded in results:
        assert_same(loaded, reference)


def test_dram_cache_accounting() -> None:
    cache = DramCache(100)
    with pytest.raises(ValueError):
        cache.put(("x", "d"), torch.zeros(4, dtype=torch.float32))
    assert cache.put(("big", "d"), torch.zeros(101, dtype=torch.uint8)) is None  # over the budget: not cached
    one = cache.put(("one", "d"), torch.zeros(60, dtype=torch.uint8))
    assert one is not None and cache.put(("two", "d"), torch.zeros(60, dtype=torch.uint8)) is None  # one is leased
    again = cache.put(("one", "d"), torch.ones(60, dtype=torch.uint8))  # already cached: the first buffer wins
    assert again is not None and again.buffer is one.buffer
    one.release()
    again.release()
    with cache.put(("two", "d"), torch.zeros(60, dtype=torch.uint8)) as two:
        assert cache.lru_keys() == [("two", "d")] and cache.used_bytes == 60 and two.buffer.numel() == 60
    assert cache.get(("one", "d")) is None and cache.num_evictions == 1
    cache.clear()
    assert len(cache) == 0 and cache.used_bytes == 0


# ---- the pool -----------------------------------------------------------------------------------------


def test_pool_blocks_until_a_buffer_is_released_and_honours_cancel() -> None:
    pool = BufferPool(2, 2 * PAGE_BYTES, pin=False)
    a, b = pool.acquire(), pool.acquire()
    assert a is not None and b is not None and a.data_ptr() % PAGE_BYTES == 0 and a.numel() == 2 * PAGE_BYTES
    got: list[torch.Tensor | None] = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire()))
    waiter.start()
    time.sleep(0.05)
    assert not got  # still waiting
    pool.release(a)
    waiter.join(timeout=2)
    assert got and got[0] is not None and got[0].data_ptr() == a.data_ptr()
    cancel = threading.Event()
    cancelled: list[torch.Tensor | None] = []
    waiter = threading.Thread(target=lambda: cancelled.append(pool.acquire(cancel)))
    waiter.start()
    cancel.set()
    waiter.join(timeout=2)
    assert cancelled == [None]
    pool.release(b)
    with pytest.raises(ValueError):
        pool.release(b)  # twice
    with pytest.raises(ValueError):
        pool.release(torch.zeros(2 * PAGE_BYTES, dtype=torch.uint8))  # not from this pool
    with pytest.raises(ValueError):
        BufferPool(1, 1000)


def test_host_buffer_is_page_aligned_and_lives_as_long_as_its_views() -> None:
    buf = host_buffer(3 * PAGE_BYTES + 5)
    assert buf.numel() == 3 * PAGE_BYTES + 5 and buf.data_ptr() % PAGE_BYTES == 0
    view = buf[PAGE_BYTES:]
    del buf
    view.fill_(7)
    assert int(view.sum()) == 7 * view.numel()


def test_manifest_views_and_loader_agree_on_layout(ckpt: Path) -> None:
    loaded = load_checkpoint(ckpt, "cpu")
    manifest: Manifest = loaded.manifest
    for entry, start in manifest.placements():
        assert loaded.tensors[entry.name].data_ptr() == loaded.buffer.data_ptr() + start or entry.nbytes == 0


class _FakeEvent:
    """A CUDA event whose copy 'completes' 2 ms after it is recorded (no GPU needed)."""

    def __init__(self) -> None:
        self.done_at = float("inf")

    def record(self, stream: object = None) -> None:
        self.done_at = time.monotonic() + 0.002

    def query(self) -> bool:
        return time.monotonic() >= self.done_at

    def synchronize(self) -> None:
        time.sleep(max(0.0, self.done_at - time.monotonic()))


class _FakeStream:
    def __init__(self, device: object = None) -> None:
        pass

    def synchronize(self) -> None:
        time.sleep(0.002)


def test_cuda_copier_returns_a_buffer_only_after_its_copy_event(ckpt: Path, reference: dict[str, torch.Tensor],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA copier's bookkeeping, run on CPU with fake streams and events: a pool buffer goes back only
    once the event recorded after its copy has completed, and a model 80x the pool streams through."""
    import contextlib

    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(loader_module, "SyncCopier", CudaCopier)
    pool = BufferPool(2, 4096, pin=False)
    event_of: dict[int, _FakeEvent] = {}
    real_submit, real_release = CudaCopier.submit, pool.release

    def submit(self: CudaCopier, buf: torch.Tensor, dst: int, nbytes: int) -> None:
        real_submit(self, buf, dst, nbytes)
        event_of[buf.data_ptr()] = self._inflight[-1][0]

    def release(buf: torch.Tensor) -> None:
        event = event_of.pop(buf.data_ptr(), None)
        assert event is None or event.query(), "buffer released before its copy completed"
        real_release(buf)

    monkeypatch.setattr(CudaCopier, "submit", submit)
    monkeypatch.setattr(pool, "release", release)
    loaded = load_checkpoint(ckpt, "cpu", staged=True, pool=pool, num_readers=3)
    assert_same(loaded, reference)
    assert pool.num_free == 2 and not event_of


# ---- recycled host memory (HostMemoryPool) ----------------------------------------------------------
# These loads read (io_mode="direct"): the files a test just wrote are in the page cache, and a checkpoint the
# page cache holds whole is mapped, not read into the pool's memory (see the mapped loads below).


def test_recycled_memory_is_reused_only_once_no_view_remains(ckpt: Path, reference: dict[str, torch.Tensor],
                                                             tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path, seed=1)
    other_reference = read_tensors(other)
    pool = HostMemoryPool(10 << 20)
    first = load_checkpoint(ckpt, "cpu", io_mode="direct", host_pool=pool)
    assert_same(first, reference)
    address = first.buffer.data_ptr()
    held = first.tensors["layers.2.big"]  # one view outlives the load
    del first
    gc.collect()
    assert pool.num_free == 0  # still viewed: not back
    second = load_checkpoint(other, "cpu", io_mode="direct", host_pool=pool)
    assert second.buffer.data_ptr() != address and pool.num_fresh == 2 and pool.num_reused == 0
    assert same_bits(held, reference["layers.2.big"])  # the held view was not overwritten
    assert_same(second, other_reference)
    del held
    gc.collect()
    assert pool.num_free == 1  # the last view died: the mapping is idle, still mapped and touched
    third = load_checkpoint(other, "cpu", io_mode="direct", host_pool=pool)
    assert third.buffer.data_ptr() == address  # no new mapping: the first load's pages
    assert pool.num_fresh == 2 and pool.num_reused == 1
    assert_same(third, other_reference)
    assert_same(second, other_reference)


def test_dram_cache_recycles_an_evicted_entry_and_unseals_it(ckpt: Path, tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path, seed=1)
    size = read_manifest(ckpt).total_bytes
    assert read_manifest(other).total_bytes == size
    cache = DramCache(size + size // 2)  # room for one
    first = load_checkpoint(ckpt, "cpu", io_mode="direct", dram_cache=cache)
    address = first.buffer.data_ptr()
    if os.path.exists("/proc/self/maps"):
        assert region_permissions(address).startswith("r-")  # sealed while cached
    first.release()
    del first
    gc.collect()
    # Loading `other` evicts the entry (unleased, unviewed): its pages become the new buffer, writable again
    # for the readers (a sealed page would fault), then sealed again as the new entry.
    second = load_checkpoint(other, "cpu", io_mode="direct", dram_cache=cache)
    assert second.report.source_tier == "ssd" and second.buffer.data_ptr() == address
    assert cache.host_pool.num_reused == 1 and cache.num_evictions == 1
    assert_same(second, read_tensors(other))
    if os.path.exists("/proc/self/maps"):
        assert region_permissions(address).startswith("r-")
    assert cache.used_bytes + cache.host_pool.free_bytes <= cache.budget_bytes

    # A released lease whose tensor is still held: evicted, but its memory is not reused (nor kept over budget).
    held = second.tensors["layers.2.big"]
    second.release()
    del second
    gc.collect()
    third = load_checkpoint(ckpt, "cpu", io_mode="direct", dram_cache=cache)
    assert third.buffer.data_ptr() != address and cache.host_pool.num_fresh == 2
    assert same_bits(held, read_tensors(other)["layers.2.big"])
    del held, third
    gc.collect()
    assert cache.used_bytes + cache.host_pool.free_bytes <= cache.budget_bytes


def test_sealed_mapping_is_writable_again_when_taken() -> None:
    pool = HostMemoryPool(1 << 20)
    buf = pool.take(5 * PAGE_BYTES)
    buf.fill_(1)
    address = buf.data_ptr()
    assert seal_read_only(buf)
    if os.path.exists("/proc/self/maps"):
        assert region_permissions(address).startswith("r-")
    del buf
    again = pool.take(4 * PAGE_BYTES + 1)
    assert again.data_ptr() == address and again.numel() == 4 * PAGE_BYTES + 1
    if os.path.exists("/proc/self/maps"):
        assert region_permissions(address).startswith("rw")
    again.fill_(2)  # would fault if still sealed
    assert int(again[0]) == 2 and int(again[-1]) == 2


def test_host_pool_is_bounded() -> None:
    mib = 1 << 20
    pool = HostMemoryPool(3 * mib)
    buffers = [pool.take(mib) for _ in range(4)]
    addresses = [b.data_ptr() for b in buffers]
    del buffers
    assert pool.free_bytes == 3 * mib and pool.num_free == 3 and pool.num_unmapped == 1  # the 4th did not fit
    small = pool.take(64 << 10)  # far smaller than any idle mapping: fresh, rather than waste 1 MiB
    assert small.data_ptr() not in addresses and pool.num_reused == 0
    big = pool.take(2 * mib)  # bigger than any: fresh
    assert big.data_ptr() not in addresses and pool.free_bytes == 3 * mib
    pool.set_limit(mib)  # the oldest idle mappings go
    assert pool.free_bytes == mib and pool.num_unmapped == 3
    del small, big
    assert pool.free_bytes == mib  # returned, but over the limit: unmapped
    pool.clear()
    assert pool.free_bytes == 0 and pool.num_free == 0
    if os.path.exists("/proc/self/maps"):
        with pytest.raises(AssertionError, match="not mapped"):
            region_permissions(addresses[0])  # really unmapped, not just forgotten


def test_dram_budget_covers_cached_entries_and_idle_memory(ckpt: Path, reference: dict[str, torch.Tensor],
                                                           tmp_path: Path) -> None:
    size = read_manifest(ckpt).total_bytes
    a, b = (copy_checkpoint(ckpt, tmp_path / name) for name in "ab")
    cache = DramCache(2 * size + size // 2)
    for path in (a, b):
        load_checkpoint(path, "cpu", io_mode="direct", dram_cache=cache).release()
    gc.collect()
    assert cache.used_bytes == 2 * size and cache.host_pool.free_bytes == 0
    cache.clear()
    assert cache.used_bytes == 0 and cache.host_pool.num_free == 2  # evicted pages kept, within the budget
    loaded = load_checkpoint(a, "cpu", io_mode="direct", dram_cache=cache)
    assert cache.host_pool.num_reused == 1 and cache.host_pool.num_fresh == 2
    assert_same(loaded, reference)
    assert cache.used_bytes == size and cache.used_bytes + cache.host_pool.free_bytes <= cache.budget_bytes


def test_prefaulted_pool_serves_the_first_load(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    pool = HostMemoryPool(10 << 20)
    assert pool.prefault(read_manifest(ckpt).total_bytes)
    assert not HostMemoryPool(PAGE_BYTES).prefault(2 * PAGE_BYTES)  # over the limit: nothing mapped
    loaded = load_checkpoint(ckpt, "cpu", io_mode="direct", host_pool=pool)
    assert pool.num_fresh == 0 and pool.num_reused == 1
    assert_same(loaded, reference)
    with pytest.raises(ValueError, match="host_pool"):
        load_checkpoint(ckpt, "cpu", io_mode="direct", host_pool=pool, dram_cache=DramCache(10 << 20))


def test_dram_cache_can_prefault_at_start(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    assert DramCache(10 << 20).host_pool.free_bytes == 0  # off by default
    size = read_manifest(ckpt).total_bytes
    cache = DramCache(10 << 20, prefault_bytes=size)
    assert cache.host_pool.free_bytes == size
    loaded = load_checkpoint(ckpt, "cpu", io_mode="direct", dram_cache=cache)
    assert cache.host_pool.num_fresh == 0 and cache.host_pool.num_reused == 1
    assert_same(loaded, reference)
    assert cache.used_bytes + cache.host_pool.free_bytes <= cache.budget_bytes


# ---- mapped loads: a checkpoint the page cache holds, on CPU ------------------------------------------------


def mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (None: anonymous memory)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) == 6 and fields[5].startswith("/") else None
    raise AssertionError("address not mapped")


def evict(path: Path) -> bool:
    """Drop the checkpoint's data files from the page cache; whether the kernel did (tmpfs cannot)."""
    reader_module.drop_from_page_cache(path)
    return reader_module.resident_fraction(path) < 1.0


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_a_checkpoint_in_the_page_cache_is_mapped_not_copied(ckpt: Path, reference: dict[str, torch.Tensor],
                                                             tmp_path: Path) -> None:
    path = copy_checkpoint(ckpt, tmp_path / "warm")
    for part in read_manifest(path).partitions:
        (path / part.file).read_bytes()  # in the page cache now
    loaded = load_checkpoint(path, "cpu", verify=True)
    assert_same(loaded, reference)
    assert loaded.report.source_tier == "ssd"
    manifest = read_manifest(path)
    for part, base in zip(manifest.partitions, manifest.partition_offsets(), strict=True):
        assert mapped_file(loaded.buffer.data_ptr() + base) == str(path / part.file)  # its pages, in place
    # Private: a write gets its own copy of the page; the file and later loads never see it.
    loaded.tensors["layers.2.big"][0] = 12345.0
    assert loaded.tensors["layers.2.big"][0] == 12345.0
    assert_same(load_checkpoint(path, "cpu"), reference)
    assert same_bits(read_tensors(path)["layers.2.big"], reference["layers.2.big"])
    # Cached in DRAM, the mapping is the entry: sealed, shared by every hit.
    cache = DramCache(10 << 20)
    first = load_checkpoint(path, "cpu", dram_cache=cache)
    hit = load_checkpoint(path, "cpu", dram_cache=cache)
    assert hit.report.source_tier == "dram" and hit.buffer.data_ptr() == first.buffer.data_ptr()
    assert mapped_file(hit.buffer.data_ptr()) == str(path / manifest.partitions[0].file)
    assert region_permissions(hit.buffer.data_ptr()).startswith("r-")
    assert_same(hit, reference)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_a_checkpoint_not_wholly_in_the_page_cache_is_read(ckpt: Path, reference: dict[str, torch.Tensor],
                                                          tmp_path: Path) -> None:
    path = copy_checkpoint(ckpt, tmp_path / "cold")
    if not evict(path):
        pytest.skip("this filesystem keeps its files in memory (tmpfs)")
    loaded = load_checkpoint(path, "cpu")
    assert mapped_file(loaded.buffer.data_ptr()) is None  # read into anonymous memory
    assert_same(loaded, reference)
    for options in ({"io_mode": "direct"}, {"io_mode": "buffered"}):  # the modes that force a way of reading
        for part in read_manifest(path).partitions:
            (path / part.file).read_bytes()
        assert mapped_file(load_checkpoint(path, "cpu", **options).buffer.data_ptr()) is None
