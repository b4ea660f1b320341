"""The vLLM backend against transformers' own `generate()`, architecture by architecture. `make test-vllm`.

The same comparison as tests/test_architectures.py, on `backend: vllm`: each variant is deployed through the admin
API of one in-process node and must answer temperature-0 completions with exactly the tokens greedy `generate()`
gives on `from_pretrained(dir, dtype=...)` (this venv's transformers), and seeded sampled completions with exactly
the tokens of `generate()` driven by sllmd's token rule. A vLLM engine start costs ~20-40 s on a 2-core machine,
so one variant is deployed at a time (a module-scoped parametrized fixture: both tests of a variant share its
engine, which is undeployed before the next variant's starts).

Token-exact equality holds in float32. In bfloat16 vLLM's kernels round differently from transformers' (and with
the batch), so a near-tie goes either way and the texts part: a bfloat16 engine is held to
`archcheck.margin_violations` instead, through the engine's own token ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests import archmodels
from tests.archcheck import (
    PROMPTS,
    SAMPLING,
    Variant,
    check_against_generate,
    get_status,
    margin_violations,
    post_deploy,
    prompt_ids,
)
from tests.nodes import RunningNode, running_node

pytestmark = pytest.mark.vllm

# One engine per variant: float32 for every architecture (gpt2's checkpoint sharded, the others' one file).
VARIANTS = [Variant(arch, layout="sharded" if arch == "gpt2" else "standard") for arch in archmodels.ARCHS]


@pytest_asyncio.fixture(scope="module")
async def served(tmp_path_factory) -> AsyncIterator[RunningNode]:
    pytest.importorskip("vllm")
    # A cold start waits for vLLM's engine: give it longer than the default minute on a busy machine.
    async with running_node(tmp_path_factory.mktemp("vllm-architectures"), devices__cpu_slots=1,
                            store__probe_mb=0, serving__queue_timeout_s=240.0) as running:
        yield running


@pytest.fixture(scope="module")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-archmodels")


@pytest_asyncio.fixture(scope="module", params=VARIANTS, ids=str)
async def deployed(request, served: RunningNode, models_root: Path) -> AsyncIterator[tuple[str, Path, Variant]]:
    """One variant deployed on vLLM (its engine starts with the first request), undeployed afterwards."""
    variant: Variant = request.param
    path = variant.build(models_root / str(variant))
    name = f"vllm-{variant}"
    status, body = await post_deploy(served, name, path, backend="vllm", autoscaling={"keep_alive_s": 600})
    assert status == 201, f"deploy {name}: {status} {body}"
    try:
        yield name, path, variant
    finally:
        async with served.http.delete(f"{served.url}/admin/models/{name}") as response:
            assert response.status == 200, await response.text()


async def test_greedy_completion_matches_generate(served: RunningNode, deployed) -> None:
    name, path, variant = deployed
    status, listed = await get_status(served, f"/v1/models/{name}")
    assert status == 200, listed
    assert (listed["dtype"], listed["max_model_len"]) == (variant.computes_in, archmodels.POSITIONS)
    await check_against_generate(served, name, path, variant.computes_in)


async def test_seeded_sampling_matches_generate_with_sllmd_token_rule(served: RunningNode, deployed) -> None:
    name, path, variant = deployed
    await check_against_generate(served, name, path, variant.computes_in, SAMPLING)


@pytest.mark.parametrize("kind", archmodels.UNSUPPORTED)
async def test_unsupported_architecture_is_refused_at_deploy(served: RunningNode, tmp_path: Path, kind: str) -> None:
    path = archmodels.build_unsupported(kind, tmp_path / kind)
    architecture = {"bert": "BertForMaskedLM", "unknown": "SllmdMysteryForCausalLM"}[kind]
    status, body = await post_deploy(served, f"vllm-unsupported-{kind}", path, backend="vllm")
    assert status == 400, body
    assert body["error"]["code"] == "unsupported_architecture", body
    assert architecture in body["error"]["message"], body
    status, body = await get_status(served, f"/admin/models/vllm-unsupported-{kind}")
    assert status == 404, body


async def test_a_bfloat16_engine_picks_tokens_within_bfloat16_rounding_of_the_float32_argmax(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    from sllmd.checkpoint.convert import convert
    from sllmd.engine.vllm import VllmEngine
    from sllmd.types import SamplingParams

    path = archmodels.build("llama", tmp_path / "llama", dtype="bfloat16")
    convert(path, tmp_path / "llama-v1")
    engine = VllmEngine(tmp_path / "llama-v1", "cpu", dtype="bfloat16", max_model_len=64)
    await engine.start()
    try:
        # The deployment's dtype and max_model_len reach vLLM's engine.
        assert engine._llm is not None and str(engine._llm.model_config.dtype) == "torch.bfloat16"
        assert engine.context_length == engine._llm.model_config.max_model_len == 64
        for prompt in PROMPTS:
            ids = prompt_ids(path, prompt)
            generated = [t async for t in engine.generate(ids, SamplingParams(max_tokens=16, temperature=0))]
            misses = await asyncio.to_thread(margin_violations, path, "bfloat16", ids, generated)
            assert not misses, f"{prompt!r} -> {generated}:\n" + "\n".join(misses)
    finally:
        await engine.stop()
