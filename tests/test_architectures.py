"""The transformers backend against transformers' own `generate()`, architecture by architecture.

Every variant (architecture x stored dtype x checkpoint layout, tests/archmodels.py) is deployed through the admin
API of one in-process node (so it goes through the store's conversion, sllmd's loader and `hf_model.build_model`)
and must answer a temperature-0 completion with exactly the tokens `AutoModelForCausalLM.from_pretrained(dir,
dtype=...)` + greedy `generate()` produces: same text, same completion_tokens, same finish_reason. A seeded sampled
request must equal `generate()` driven by sllmd's own token rule (`archcheck.SllmdTokenRule`). Deploy-time
refusals (an architecture no causal LM backend may serve, max_model_len, dtype) are checked here too.
(`archcheck.reference` runs Gemma 2 with eager attention, which alone applies its attention soft-capping.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio

from tests import archmodels
from tests.archcheck import (
    MAX_TOKENS,
    PROMPTS,
    SAMPLING,
    Variant,
    check_against_generate,
    complete,
    deployed,
    expected_completion,
    get_status,
    post_deploy,
    prompt_ids,
    reference,
)
from tests.nodes import RunningNode, running_node

GREEDY = [
    *(Variant(arch) for arch in archmodels.ARCHS),
    *(Variant(arch, dtype) for arch in archmodels.ARCHS for dtype in ("float16", "bfloat16")),
    Variant("llama", layout="sharded"),
    Variant("gpt2", layout="sharded"),
    Variant("gpt2", layout="base"),
    Variant("opt", layout="base"),
    Variant("gpt_neox", layout="hub_names"),
    Variant("llama", serve_dtype="bf16"),  # a float32 checkpoint served in another dtype
    Variant("qwen2", "bfloat16", serve_dtype="float32"),
]
SAMPLED = [Variant(arch) for arch in ("llama", "qwen2", "gemma2", "opt", "gpt2", "falcon")]


class Models:
    """Model directories, built on first use (one per variant)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def path(self, variant: Variant) -> Path:
        key = str(Variant(variant.arch, variant.dtype, variant.layout))
        if key not in self._built:
            self._built[key] = variant.build(self.root / key)
        return self._built[key]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    return Models(tmp_path_factory.mktemp("archmodels"))


@pytest_asyncio.fixture(scope="module")
async def served(tmp_path_factory) -> RunningNode:
    async with running_node(tmp_path_factory.mktemp("architectures"), devices__cpu_slots=2,
                            store__probe_mb=0) as running:
        yield running


@pytest.mark.parametrize("variant", GREEDY, ids=str)
async def test_greedy_completion_matches_generate(served: RunningNode, models: Models, variant: Variant) -> None:
    path = models.path(variant)
    name = f"greedy-{variant}"
    fields = {"dtype": variant.serve_dtype} if variant.serve_dtype else {}
    async with deployed(served, name, path, **fields):
        status, listed = await get_status(served, f"/v1/models/{name}")
        assert status == 200, listed
        assert (listed["dtype"], listed["max_model_len"]) == (variant.computes_in, archmodels.POSITIONS)
        await check_against_generate(served, name, path, variant.computes_in)


@pytest.mark.parametrize("variant", SAMPLED, ids=str)
async def test_seeded_sampling_matches_generate_with_sllmd_token_rule(served: RunningNode, models: Models,
                                                                      variant: Variant) -> None:
    path = models.path(variant)
    name = f"sampled-{variant}"
    async with deployed(served, name, path):
        sampled = await check_against_generate(served, name, path, variant.computes_in, SAMPLING)
    greedy = [await asyncio.to_thread(reference, path, variant.computes_in,
                                      prompt_ids(path, prompt), MAX_TOKENS) for prompt in PROMPTS]
    assert sampled != greedy, "sampling picked the argmax every time: the model's logits are too peaked to test it"


@pytest.mark.parametrize("kind", archmodels.UNSUPPORTED)
async def test_unsupported_architecture_is_refused_at_deploy(served: RunningNode, tmp_path: Path, kind: str) -> None:
    path = archmodels.build_unsupported(kind, tmp_path / kind)
    architecture = {"bert": "BertForMaskedLM", "unknown": "SllmdMysteryForCausalLM"}[kind]
    status, body = await post_deploy(served, f"unsupported-{kind}", path)
    assert status == 400, body
    assert body["error"]["code"] == "unsupported_architecture", body
    assert architecture in body["error"]["message"], body
    status, body = await get_status(served, f"/admin/models/unsupported-{kind}")
    assert status == 404, body


async def test_max_model_len_caps_the_context(served: RunningNode, models: Models) -> None:
    path = models.path(Variant("llama"))
    ids = prompt_ids(path, PROMPTS[0])
    async with deployed(served, "llama-64", path, max_model_len=64):
        status, listed = await get_status(served, "/v1/models")
        assert status == 200
        assert {m["id"]: m["max_model_len"] for m in listed["data"]}["llama-64"] == 64
        fits = 64 - len(ids)
        answer = await complete(served, "llama-64", PROMPTS[0], max_tokens=fits)
        assert answer["usage"]["completion_tokens"] == fits
        tokens = await asyncio.to_thread(reference, path, "float32", ids, fits)
        assert answer["choices"][0]["text"] == expected_completion(path, tokens)["text"]
        body = {"model": "llama-64", "prompt": PROMPTS[0], "max_tokens": fits + 1, "temperature": 0}
        async with served.http.post(f"{served.url}/v1/completions", json=body) as response:
            error = await response.json()
            assert response.status == 400, error
            assert error["error"]["code"] == "context_length_exceeded", error


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_model_len": archmodels.POSITIONS + 1}, "max_model_len"),
    ({"dtype": "float8"}, "dtype"),
    ({"dtype": "int4"}, "dtype"),
], ids=["max_model_len-beyond-the-model", "dtype-float8", "dtype-int4"])
async def test_bad_deploy_settings_are_refused(served: RunningNode, models: Models, fields: dict, param: str) -> None:
    status, body = await post_deploy(served, "refused", models.path(Variant("llama")), **fields)
    assert status == 400, body
    assert body["error"]["param"] == param, body
    status, body = await get_status(served, "/admin/models/refused")
    assert status == 404, body
