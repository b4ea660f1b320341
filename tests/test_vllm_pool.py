"""Parked vLLM engines (`sllmd.engine.vllm_pool`): an engine outlives its instance and serves the next start of its
shape, swapping another model's weights in place, with output identical to transformers' `generate()` on that
model; a node prestarts one for a new deployment, so its first request finds an engine ready. `make test-vllm`."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from sllmd.checkpoint.convert import convert
from sllmd.tools.demo_model import build_demo_model
from sllmd.types import SamplingParams
from tests.archcheck import reference
from tests.nodes import running_node

pytestmark = pytest.mark.vllm

PROMPT_IDS = [1, 72, 101, 108, 108, 111, 44, 32, 109, 121]


async def greedy(engine, num_tokens: int = 12) -> list[int]:
    return [t async for t in engine.generate(PROMPT_IDS, SamplingParams(max_tokens=num_tokens, temperature=0.0))]


async def test_a_parked_engine_takes_another_model_of_its_shape_and_serves_it_exactly(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from sllmd.engine.vllm import VllmEngine
    from sllmd.engine.vllm_pool import EnginePool

    models = {}
    for seed in (0, 1):  # one shape, other weights
        hf = build_demo_model(tmp_path / f"hf-{seed}", seed=seed)
        convert(hf, tmp_path / f"v1-{seed}")
        models[seed] = (tmp_path / f"v1-{seed}", await asyncio.to_thread(reference, hf, "float32", PROMPT_IDS, 12))
    assert models[0][1] != models[1][1]
    pool = EnginePool(capacity=1)
    try:
        reports = []
        for seed in (0, 0, 1, 0):  # fresh, the same weights again, a swap, a swap back
            checkpoint, expected = models[seed]
            engine = VllmEngine(checkpoint, "cpu", pool=pool, vllm_dir=tmp_path / "vllm")
            reports.append(await engine.start())
            assert await greedy(engine) == expected, f"seed {seed}, start {len(reports)}"
            await engine.stop()
            assert len(pool) == 1
        fresh, same, swap, back = reports
        assert not fresh.reused_engine
        assert {"spawn", "imports", "model_init", "weight_load", "compile", "warmup"} == set(fresh.phases)
        assert same.reused_engine and same.load_s == 0.0 and same.num_bytes == 0  # it held those weights
        assert swap.reused_engine and back.reused_engine and swap.phases["swap"] > 0 and "prefix_reset" in swap.phases
        assert swap.num_bytes == fresh.num_bytes
        # The compile cache and the shape directory live in the node's vLLM directory, one for the shape.
        assert len(list((tmp_path / "vllm" / "shapes").iterdir())) == 1
        assert (tmp_path / "vllm" / "cache").is_dir()
    finally:
        await pool.close()


async def test_a_deployment_is_prestarted_and_its_first_request_takes_the_parked_engine(
        demo_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    async with running_node(tmp_path / "node", devices__cpu_slots=1, store__probe_mb=0) as node:
        await node.deploy("pooled", demo_model_dir, backend="vllm", keep_alive_s=1)

        async def parked() -> list[str]:
            async with node.http.get(f"{node.url}/admin/cluster") as response:
                me = next(n for n in (await response.json())["nodes"] if n["id"] == node.node.node_id)
                # Host memory held: the weights and the KV cache (VLLM_CPU_KVCACHE_SPACE, 1 GiB in make test-vllm).
                assert (me["parked_host_bytes"] > 2**30) == bool(me["parked_models"]), me
                return me["parked_models"]

        deadline = time.monotonic() + 240
        while "pooled" not in await parked():
            assert time.monotonic() < deadline, "no engine was prestarted"
            await asyncio.sleep(0.5)
        for attempt in range(2):  # the prestarted engine, then the same one parked again after keep-alive
            began = time.monotonic()
            status, answer = await node.complete("pooled", max_tokens=4)
            assert status == 200 and answer["usage"]["completion_tokens"] == 4, answer
            load = (await node.model_view("pooled"))["instances"][0]["load"]
            assert load["reused_engine"] and set(load["phases"]) >= {"swap"}, load
            assert time.monotonic() - began < 10, f"request {attempt}: {time.monotonic() - began:.1f} s"
            deadline = time.monotonic() + 30
            while (await node.model_view("pooled"))["instances"] or "pooled" not in await parked():
                assert time.monotonic() < deadline, "the instance did not stop and park its engine"
                await asyncio.sleep(0.2)
        metrics = node.node.metrics.render().decode()
        assert re.search(r'sllmd_start_phase_seconds_count\{engine_kind="vllm",phase="swap"\} 2\.0', metrics), metrics
