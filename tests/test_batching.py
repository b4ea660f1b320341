"""Continuous batching in the transformers backend: requests decoding together give the tokens each gives alone.

Over every architecture of the matrix (tests/archmodels.py), requests of different prompt lengths, greedy and
seeded sampling, joining a running batch mid-way and leaving it at different lengths, produce exactly the ids
they produce one at a time; a forward hook on the real model shows they were decoded in one pass. The batch
limits hold: no more than `max_batch_size` rows, a KV budget that lets one request at a time through, and
requests that wait for room finish all the same."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from sllmd.engine.transformers import TransformersEngine
from sllmd.types import SamplingParams
from tests.archmodels import ARCHS, build

GREEDY = SamplingParams(max_tokens=14, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=11, temperature=0.8, top_p=0.95, seed=77)
# Prompts of different lengths, and different max_tokens, so the rows are padded and leave at different steps.
FIRST = [([0, 40, 41, 300, 17], GREEDY), ([0, 77, 200, 201, 202, 203, 90, 91, 92, 93, 94, 150], SAMPLED),
         ([0, 9], SamplingParams(max_tokens=6, temperature=0.0))]
LATER = [([0, 33, 34, 35, 36, 37, 38, 39], GREEDY), ([0, 120, 121], SAMPLED)]


@asynccontextmanager
async def engine_of(model_dir: Path, **limits: Any) -> AsyncIterator[tuple[TransformersEngine, list[int]]]:
    """A started engine and the batch size of every forward pass its model runs."""
    engine = TransformersEngine(model_dir, **limits)
    await engine.start()
    sizes: list[int] = []
    assert engine._model is not None
    handle = engine._model.register_forward_hook(lambda _m, _args, kwargs, _out: sizes.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        yield engine, sizes
    finally:
        handle.remove()
        await engine.stop()


async def collect(engine: TransformersEngine, prompt: list[int], params: SamplingParams,
                  started: asyncio.Event | None = None) -> list[int]:
    tokens = []
    async for token in engine.generate(prompt, params):
        tokens.append(token)
        if started is not None and len(tokens) == 3:
            started.set()
    return tokens


async def together(engine: TransformersEngine) -> list[list[int]]:
    """FIRST at once; LATER once every one of FIRST has 3 tokens (they join a running batch)."""
    flags = [asyncio.Event() for _ in FIRST]
    first = [asyncio.create_task(collect(engine, p, s, f)) for (p, s), f in zip(FIRST, flags, strict=True)]
    await asyncio.gather(*(f.wait() for f in flags[:2]))  # the third may end first (6 tokens)
    later = [asyncio.create_task(collect(engine, p, s)) for p, s in LATER]
    return await asyncio.gather(*first, *later)


async def alone(engine: TransformersEngine) -> list[list[int]]:
    return [await collect(engine, p, s) for p, s in [*FIRST, *LATER]]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batching")
    return {arch: build(arch, root / arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
async def test_batched_requests_give_the_tokens_they_give_alone(arch: str, arch_dirs: dict[str, Path]) -> None:
    async with engine_of(arch_dirs[arch]) as (engine, sizes):
        reference = await alone(engine)
        assert max(sizes) == 1
        sizes.clear()
        got = await together(engine)
        assert got == reference
        assert max(sizes) >= 4  # decoded in one pass, late joiners included
        assert len(sizes) < sum(map(len, got))  # fewer passes than tokens


async def test_the_batch_never_exceeds_max_batch_size(demo_model_dir: Path) -> None:
    async with engine_of(demo_model_dir) as (engine, _):
        reference = await alone(engine)
    async with engine_of(demo_model_dir, max_batch_size=2) as (engine, sizes):
        assert await together(engine) == reference  # the others waited for room, then ran
        assert max(sizes) == 2


async def test_a_kv_budget_for_one_request_runs_them_one_at_a_time(demo_model_dir: Path) -> None:
    async with engine_of(demo_model_dir) as (engine, _):
        reference = await alone(engine)
    async with engine_of(demo_model_dir, max_batch_kv_bytes=1) as (engine, sizes):
        assert await together(engine) == reference
        assert max(sizes) == 1


async def test_cancelled_rows_leave_the_batch_and_the_others_go_on(demo_model_dir: Path) -> None:
    long = SamplingParams(max_tokens=40, temperature=0.0)
    async with engine_of(demo_model_dir) as (engine, sizes):
        reference = await collect(engine, [0, 50, 51], long)
        sizes.clear()
        stays = asyncio.create_task(collect(engine, [0, 50, 51], long))
        leaver = engine.generate([0, 60, 61, 62], long)
        assert len([await anext(leaver) for _ in range(5)]) == 5
        await leaver.aclose()  # its row leaves at the next step boundary
        assert await stays == reference
        assert engine.num_active == 0
        assert sizes[-1] == 1  # the last passes ran the one row left
