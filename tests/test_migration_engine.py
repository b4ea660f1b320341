"""What migration needs of an engine, on the real demo model (fp32, CPU): a request resumed from prompt +
tokens so far, from a cache prefilled in several pieces, continues exactly as the unmoved run, greedy and
seeded; and the migration messages reject malformed bodies."""

from __future__ import annotations

from pathlib import Path

import pytest

from sllmd.engine.dummy import DummyEngine
from sllmd.engine.transformers import TransformersEngine
from sllmd.errors import EngineFailed, InvalidRequest
from sllmd.types import SamplingParams
from sllmd.worker.migration.messages import CatchUp, MovedRequest, WireError, decode, keyed_ids, to_wire

PROMPT = [1, 17, 42, 99, 7, 250]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
async def test_resuming_from_a_prefilled_cache_continues_identically(demo_model_dir: Path, temperature: float):
    engine = TransformersEngine(demo_model_dir)
    await engine.start()
    try:
        params = SamplingParams(max_tokens=40, temperature=temperature, seed=5)
        full = [t async for t in engine.generate(PROMPT, params)]
        for cut in (0, 1, 13, 39):
            handle = await engine.prefill(PROMPT[:3])
            await handle.extend(PROMPT[3:] + full[:cut // 2])  # catch-up rounds, then a gap at the cut-over
            assert handle.num_tokens == len(PROMPT) + cut // 2
            rest = SamplingParams(max_tokens=40 - cut, temperature=temperature, seed=5)
            resumed = [t async for t in engine.generate(PROMPT + full[:cut], rest, prefilled=handle)]
            assert resumed == full[cut:], cut
            with pytest.raises(EngineFailed):
                await handle.extend([1])  # consumed
        handle = await engine.prefill(PROMPT + full[:10])  # covers the whole sequence: no gap at all
        resumed = [t async for t in engine.generate(PROMPT + full[:10], SamplingParams(30, temperature, seed=5),
                                                    prefilled=handle)]
        assert resumed == full[10:]
        handle = await engine.prefill(PROMPT)
        with pytest.raises(InvalidRequest):
            await anext(engine.generate([2, *PROMPT], params, prefilled=handle))  # not a prefix
        handle.close()
        with pytest.raises(InvalidRequest):
            await engine.prefill([10**9])
    finally:
        await engine.stop()


async def test_dummy_engine_keeps_the_contract(demo_model_dir: Path):
    engine = DummyEngine(demo_model_dir)
    params = SamplingParams(max_tokens=12, seed=3)
    full = [t async for t in engine.generate(PROMPT, params)]
    handle = await engine.prefill(PROMPT + full[:4])
    resumed = [t async for t in engine.generate(PROMPT + full[:5], SamplingParams(7, seed=3), prefilled=handle)]
    assert resumed == full[5:]


def test_messages_decode_strictly():
    body = to_wire(CatchUp("m/1", 2, [[0, [1, 2]], [3, []]]))
    assert keyed_ids(decode(CatchUp, body).appended, "appended") == {0: [1, 2], 3: []}
    moved = to_wire(MovedRequest(0, [5], 9, 4, 1, 1.0, 7, [2]))  # an int temperature is taken as float
    assert decode(MovedRequest, moved).temperature == 1.0
    for bad in ({**body, "extra": 1}, {"migration_id": "m/1", "round": 1}, {**body, "round": True},
                {**body, "round": "1"}, [body]):
        with pytest.raises(WireError):
            decode(CatchUp, bad)
    for appended in ([[0, [1]], [0, [2]]], [[0, [-1]]], [["k", [1]]], [[0]]):
        with pytest.raises(WireError):
            keyed_ids(appended, "appended")
