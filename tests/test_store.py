"""The local SSD checkpoint store: LRU eviction within the budget, pins, crash leftovers, LRU order
across restarts, one fetch for concurrent callers, refresh of changed sources."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

import sllmd.checkpoint.store as store_module
from sllmd.checkpoint.errors import CorruptCheckpoint
from sllmd.checkpoint.layout import PartitionHasher, plan_layout
from sllmd.checkpoint.manifest import Manifest, PartitionEntry
from sllmd.checkpoint.store import (
    CheckpointInUse,
    CheckpointStore,
    StoreFull,
    checkpoint_id,
)
from sllmd.types import Tier
from tests.small_disk import run_on_small_disk

KIB = 1024
SIZE = 64 * KIB  # data bytes of each test checkpoint


def write_v1(path: Path, nbytes: int = SIZE, seed: int = 0) -> Path:
    """A small, valid v1 checkpoint directory with one tensor and a config.json."""
    path.mkdir(parents=True)
    entries, sizes = plan_layout([("w", "U8", (nbytes,))])
    data = bytes((seed + i * 7) % 251 for i in range(nbytes)).ljust(sizes[0], b"\0")
    hasher = PartitionHasher(16 * KIB)
    hasher.update(data)
    digest, chunks = hasher.finish()
    (path / "data-00000.bin").write_bytes(data)
    manifest = Manifest(entries, [PartitionEntry("data-00000.bin", sizes[0], digest, chunks)], chunk_bytes=16 * KIB)
    (path / "config.json").write_text(json.dumps({"seed": seed}))
    (path / "manifest.json").write_bytes(manifest.to_json())
    return path


@pytest.fixture
def sources(tmp_path: Path) -> list[str]:
    return [str(write_v1(tmp_path / "repo" / name, seed=i)) for i, name in enumerate("abcde")]


def entry_bytes(source: str) -> int:
    return sum(f.stat().st_size for f in Path(source).iterdir())


def budget_for(n: int, sources: list[str]) -> int:
    return n * entry_bytes(sources[0]) + 100


async def test_ensure_fetches_once_then_reads_ssd(sources, tmp_path):
    store = CheckpointStore(tmp_path / "store", budget_for(5, sources))
    path, tier = await store.ensure(sources[0])
    assert tier == Tier.REPOSITORY and path == store.path_of(checkpoint_id(sources[0]))
    assert (path / "manifest.json").read_bytes() == (Path(sources[0]) / "manifest.json").read_bytes()
    assert await store.ensure(sources[0]) == (path, Tier.SSD)
    assert await store.ensure(sources[0] + "/") == (path, Tier.SSD)  # the same source, spelt differently
    assert store.used_bytes == entry_bytes(sources[0])


async def test_lru_eviction_stays_under_budget(sources, tmp_path):
    store = CheckpointStore(tmp_path / "store", budget_for(2, sources))
    for source in sources[:3]:
        await store.ensure(source)
    assert [e.source for e in store.entries()] == sources[1:3]  # a, the least recently used, went
    assert not store.path_of(checkpoint_id(sources[0])).exists()
    await store.ensure(sources[1])  # b is now the most recent
    await store.ensure(sources[3])
    assert [e.source for e in store.entries()] == [sources[1], sources[3]]
    assert store.used_bytes <= store.budget_bytes


async def test_eviction_goes_by_cost_before_recency(sources, tmp_path):
    # a is asked for and slow to fetch again; b and c cost nothing to lose (no model asks for them lately).
    costly = {checkpoint_id(sources[0]): 5.0}
    store = CheckpointStore(tmp_path / "store", budget_for(2, sources),
                            eviction_cost=lambda cid, num_bytes: costly.get(cid, 0.0))
    for source in sources[:3]:
        await store.ensure(source)
    assert [e.source for e in store.entries()] == [sources[0], sources[2]]  # b went, though a was older
    costly[checkpoint_id(sources[2])] = 10.0
    await store.ensure(sources[3])  # now a is the cheaper of the two to lose
    assert [e.source for e in store.entries()] == [sources[2], sources[3]]


async def test_pinned_entries_are_not_evicted(sources, tmp_path):
    store = CheckpointStore(tmp_path / "store", budget_for(2, sources))
    lease = await store.acquire(sources[0])
    assert lease.tier == Tier.REPOSITORY and store.is_pinned(lease.id)
    await store.ensure(sources[1])
    await store.ensure(sources[2])  # a is least recently used but pinned: b goes
    assert {e.source for e in store.entries()} == {sources[0], sources[2]}
    with store.pinned(checkpoint_id(sources[2])), pytest.raises(StoreFull, match="pinned by running instances"):
        await store.ensure(sources[3])
    with pytest.raises(CheckpointInUse):
        await store.remove(lease.id)
    store.release(lease)
    await store.ensure(sources[3])
    assert {e.source for e in store.entries()} == {sources[2], sources[3]}


async def test_a_checkpoint_bigger_than_the_budget_is_refused(sources, tmp_path):
    store = CheckpointStore(tmp_path / "store", SIZE // 2)
    with pytest.raises(StoreFull, match="more than this node's store can hold") as refused:
        await store.ensure(sources[0])
    assert store.entries() == [] and store.used_bytes == 0
    assert refused.value.status == 503 and str(tmp_path) not in refused.value.message  # no server path


async def test_crash_leftovers_are_cleaned_at_start(sources, tmp_path):
    root = tmp_path / "store"
    store = CheckpointStore(root, budget_for(5, sources))
    path, _ = await store.ensure(sources[0])
    (root / f".{path.name}.partial").mkdir()
    (root / f".{path.name}.partial" / "data-00000.bin").write_bytes(b"half")
    (root / ".other.tmp-1234").mkdir()
    (root / ".index.json.tmp").write_text("{")
    (root / "not-a-checkpoint").mkdir()  # no manifest: never complete
    reopened = CheckpointStore(root, budget_for(5, sources))
    assert sorted(p.name for p in root.iterdir()) == sorted([path.name, "index.json"])
    assert reopened.contains(path.name) and reopened.used_bytes == entry_bytes(sources[0])


async def test_lru_order_survives_a_restart(sources, tmp_path):
    root = tmp_path / "store"
    store = CheckpointStore(root, budget_for(3, sources))
    for source in (sources[0], sources[1], sources[2], sources[0]):
        await store.ensure(source)
    reopened = CheckpointStore(root, budget_for(3, sources))
    assert [e.source for e in reopened.entries()] == [sources[1], sources[2], sources[0]]
    await reopened.ensure(sources[3])
    assert [e.source for e in reopened.entries()] == [sources[2], sources[0], sources[3]]  # b was the LRU
    smaller = CheckpointStore(root, budget_for(1, sources))  # a lower budget evicts at start, LRU first
    assert [e.source for e in smaller.entries()] == [sources[3]]


async def test_an_index_lost_in_a_crash_is_rebuilt_from_the_directories(sources, tmp_path):
    root = tmp_path / "store"
    store = CheckpointStore(root, budget_for(3, sources))
    for source in sources[:2]:
        await store.ensure(source)
    (root / "index.json").unlink()
    reopened = CheckpointStore(root, budget_for(3, sources))
    assert {e.id for e in reopened.entries()} == {checkpoint_id(s) for s in sources[:2]}
    assert await reopened.ensure(sources[0]) == (reopened.path_of(checkpoint_id(sources[0])), Tier.SSD)


async def test_concurrent_ensures_of_one_checkpoint_fetch_once(sources, tmp_path, monkeypatch):
    calls = []
    real_fetch = store_module.fetch

    async def counting_fetch(source, dst, **kwargs):
        calls.append(source)
        await asyncio.sleep(0.05)  # everyone arrives while the fetch is under way
        return await real_fetch(source, dst, **kwargs)

    monkeypatch.setattr(store_module, "fetch", counting_fetch)
    store = CheckpointStore(tmp_path / "store", budget_for(5, sources))
    results = await asyncio.gather(*(store.ensure(sources[0]) for _ in range(8)), store.ensure(sources[1]))
    assert sorted(calls) == sorted(sources[:2])
    assert {tier for _, tier in results} == {Tier.REPOSITORY}
    assert len({path for path, _ in results[:8]}) == 1


async def test_a_failed_fetch_leaves_nothing_and_can_be_retried(sources, tmp_path):
    store = CheckpointStore(tmp_path / "store", budget_for(5, sources))
    os.rename(Path(sources[0]) / "data-00000.bin", tmp_path / "aside.bin")
    with pytest.raises(CorruptCheckpoint, match=r"data-00000\.bin is missing"):
        await store.ensure(sources[0])
    assert store.entries() == [] and store.used_bytes == 0
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["index.json"]
    os.rename(tmp_path / "aside.bin", Path(sources[0]) / "data-00000.bin")
    assert (await store.ensure(sources[0]))[1] == Tier.REPOSITORY


async def test_refresh_fetches_a_changed_source_again_unless_in_use(sources, tmp_path):
    store = CheckpointStore(tmp_path / "store", budget_for(5, sources))
    path, _ = await store.ensure(sources[0])
    assert await store.ensure(sources[0], refresh=True) == (path, Tier.SSD)  # unchanged: kept
    replacement = write_v1(tmp_path / "new", seed=42)
    for name in ("data-00000.bin", "manifest.json", "config.json"):
        os.replace(replacement / name, Path(sources[0]) / name)
    lease = await store.acquire(sources[0])
    with pytest.raises(CheckpointInUse, match="changed since it was stored"):
        await store.ensure(sources[0], refresh=True)
    store.release(lease)
    assert await store.ensure(sources[0], refresh=True) == (path, Tier.REPOSITORY)
    assert json.loads((path / "config.json").read_text()) == {"seed": 42}


SMALL_DISK_SCRIPT = """
import asyncio, shutil, sys
from pathlib import Path
from sllmd.checkpoint.store import CheckpointStore, StoreFull
from tests.test_store import write_v1

async def main(root: Path, repo: Path) -> None:
    sources = [str(write_v1(repo / f"m{i}", nbytes=3 << 20, seed=i)) for i in range(8)]  # 24 MiB in all
    store = CheckpointStore(root / "store", 100 << 30)  # a budget far beyond the 16 MiB disk
    for source in sources:
        await store.ensure(source)  # fits only by evicting what the disk cannot hold with it
    print("kept", len(store.entries()), "limit", store.limit_bytes(), "free", shutil.disk_usage(root).free)
    assert store.used_bytes <= store.limit_bytes() <= 16 << 20
    leases = [await store.acquire(e.source) for e in store.entries()]  # every entry in use: nothing to evict
    try:
        await store.ensure(sources[0])
    except StoreFull as exc:
        assert str(root) not in exc.message and exc.status == 503, exc.message
        print("refused:", exc.message)
    else:
        raise AssertionError("a checkpoint that cannot fit was stored")
    for lease in leases:
        store.release(lease)

asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
"""


def test_the_store_fits_the_disk_it_is_on(tmp_path):
    """On a 16 MiB disk (a tmpfs in a private mount namespace) with a 100 GiB budget, the store evicts for the
    disk's real space, and refuses with a 503 naming no path when it cannot make room."""
    disk, repo = tmp_path / "disk", tmp_path / "repo"
    disk.mkdir()
    result = run_on_small_disk(SMALL_DISK_SCRIPT, disk, str(repo))
    assert result.returncode == 0, result.stdout + result.stderr
    kept = int(result.stdout.split()[1])
    assert 2 <= kept < 8 and "refused:" in result.stdout
