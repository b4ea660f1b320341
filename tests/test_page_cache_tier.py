"""The page cache as vLLM's DRAM tier, without vLLM: the residency query on real files, and warming a
`backend: vllm` deployment of a real node (deployed through the admin API; never started, so vLLM need not
be installed) into the page cache, seen by the worker's tier estimate and the node's NODE_STATUS."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.errors import CheckpointNotFound
from sllmd.checkpoint.reader import drop_from_page_cache, read_manifest, resident_fraction
from sllmd.checkpoint.store import checkpoint_id
from sllmd.types import Tier
from sllmd.worker.warming import read_into_page_cache
from tests.nodes import RunningNode, running_node
from tests.test_replicated import wait_until


@pytest.fixture
def vllm_deployable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deploying with backend vllm checks vLLM's model registry; these tests deploy one without vLLM installed
    (they start no engine), so the check passes."""
    from sllmd.engine.vllm import VllmEngine

    monkeypatch.setattr(VllmEngine, "check_model", classmethod(lambda cls, config: None))


@pytest.fixture
def checkpoint_dir(demo_model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "demo-sllmd"
    convert(demo_model_dir, out)
    return out


def test_resident_fraction_follows_the_page_cache(checkpoint_dir: Path) -> None:
    drop_from_page_cache(checkpoint_dir)
    assert resident_fraction(checkpoint_dir) == 0.0
    first = read_manifest(checkpoint_dir).partitions[0]
    assert first.nbytes >= 64 << 10
    fd = os.open(checkpoint_dir / first.file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: this reads one page
        os.pread(fd, 4096, 0)
    finally:
        os.close(fd)
    assert 0.0 < resident_fraction(checkpoint_dir) < 0.5
    assert read_into_page_cache(checkpoint_dir) == read_manifest(checkpoint_dir).total_bytes
    assert resident_fraction(checkpoint_dir) == 1.0
    assert resident_fraction(checkpoint_dir, num_samples=64) == 1.0
    drop_from_page_cache(checkpoint_dir)
    assert resident_fraction(checkpoint_dir) == 0.0
    assert resident_fraction(checkpoint_dir, num_samples=64) == 0.0


def test_sampled_residency_estimates_the_exact_fraction(checkpoint_dir: Path) -> None:
    drop_from_page_cache(checkpoint_dir)
    manifest = read_manifest(checkpoint_dir)
    for part in manifest.partitions:  # the first half of every file, without readahead past it
        fd = os.open(checkpoint_dir / part.file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, part.nbytes // 2, 0)
        finally:
            os.close(fd)
    exact = resident_fraction(checkpoint_dir)
    assert 0.4 < exact < 0.6
    assert abs(resident_fraction(checkpoint_dir, num_samples=100) - exact) < 0.05
    with pytest.raises(ValueError):
        resident_fraction(checkpoint_dir, num_samples=0)


def test_resident_fraction_of_a_missing_checkpoint_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        resident_fraction(tmp_path)


async def _dram_cached(running: RunningNode) -> tuple[list[str], int]:
    """(dram_cached, free_dram_bytes) of the node's NODE_STATUS, as GET /admin/cluster shows it."""
    async with running.http.get(f"{running.url}/admin/cluster") as response:
        (node,) = (await response.json())["nodes"]
    return node["dram_cached"], node["free_dram_bytes"]


@pytest.mark.usefixtures("vllm_deployable")
async def test_warming_a_vllm_deployment_makes_its_store_files_resident(demo_model_dir: Path, tmp_path: Path) -> None:
    async with running_node(tmp_path / "node") as running:
        await running.deploy("demo-vllm", demo_model_dir, backend="vllm", keep_alive_s=600)
        worker = running.node.worker
        deployment = worker.runtimes["demo-vllm"].deployment
        cid = checkpoint_id(deployment.checkpoint)
        stored = worker.store.path_of(cid)
        budget = worker.dram_cache.budget_bytes
        drop_from_page_cache(stored)  # the deploy's conversion wrote the files: the page cache holds them
        assert worker.estimates.checkpoint_tier(deployment) is Tier.SSD
        assert await _dram_cached(running) == ([], budget)

        worker.warmer.note_request("demo-vllm")
        worker.warmer.consider()
        await wait_until(lambda: worker.warmer.free_bytes() < budget)  # read, and counted against the budget
        assert resident_fraction(stored) == 1.0
        assert worker.estimates.checkpoint_tier(deployment) is Tier.DRAM
        assert worker.dram_cache.lru_keys() == []  # the daemon's own cache is of no use to vLLM's worker
        assert worker.warmer.plan() == []  # resident now
        assert await _dram_cached(running) == ([cid], budget - deployment.checkpoint_bytes)

        drop_from_page_cache(stored)  # what the kernel may do at any time: the node sees the model on SSD again
        assert worker.estimates.checkpoint_tier(deployment) is Tier.SSD
        assert await _dram_cached(running) == ([], budget)
        assert worker.warmer.plan() == ["demo-vllm"]


@pytest.mark.usefixtures("vllm_deployable")
async def test_page_cache_warming_stays_within_the_dram_budget(demo_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(demo_model_dir, copy)  # the same model from another source: a second store entry
    num_bytes = sum(f.stat().st_size for f in demo_model_dir.glob("*.safetensors"))
    # Room for one checkpoint, not two.
    async with running_node(tmp_path / "node", store__dram_budget_gb=1.5 * num_bytes / 2**30) as running:
        worker = running.node.worker
        for name, source in (("first", demo_model_dir), ("second", copy)):
            await running.deploy(name, source, backend="vllm", keep_alive_s=600)
            drop_from_page_cache(worker.store.path_of(checkpoint_id(worker.runtimes[name].deployment.checkpoint)))
        for _ in range(3):
            worker.warmer.note_request("first")
        worker.warmer.note_request("second")
        assert worker.warmer.plan() == ["first"]  # the most requested; both do not fit
        worker.warmer.consider()
        await wait_until(lambda: worker.warmer.free_bytes() < worker.dram_cache.budget_bytes)
        assert worker.estimates.checkpoint_tier(worker.runtimes["first"].deployment) is Tier.DRAM
        assert worker.warmer.free_bytes() < worker.runtimes["second"].deployment.checkpoint_bytes
        assert worker.warmer.plan() == []
        assert worker.estimates.checkpoint_tier(worker.runtimes["second"].deployment) is Tier.SSD
