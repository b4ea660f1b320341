"""What sllmd must answer for a model of tests/archmodels.py, and the checks that hold it to it: transformers' own
`generate()` on the same directory (greedy, or driven by sllmd's position-keyed token rule), compared through the
HTTP API of a running node; and, where 16-bit kernels cannot be compared token for token, the margin check.

Shared by tests/test_architectures.py (transformers backend) and tests/test_vllm_architectures.py (vLLM).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sllmd.engine.base import serving_dtype
from tests import archmodels
from tests.nodes import RunningNode

PROMPTS = archmodels.PROMPTS[:2]
MAX_TOKENS = 16  # prompt + 16 runs past gemma2's 16-token sliding window
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "seed": 123}


@dataclass(frozen=True)
class Variant:
    arch: str
    dtype: str = "float32"  # the dtype the weights are stored in
    layout: str = "standard"  # standard | sharded | base (the Hub's gpt2/opt) | hub_names (Pythia's embed_out)
    serve_dtype: str | None = None  # the deploy's "dtype"; None: "auto", the stored one

    def __str__(self) -> str:
        served = f"-as-{self.serve_dtype}" if self.serve_dtype else ""
        layout = "" if self.layout == "standard" else f"-{self.layout}"
        return f"{self.arch}-{self.dtype}{layout}{served}"

    @property
    def computes_in(self) -> str:
        """The dtype sllmd serves it in (and generate() runs in)."""
        return serving_dtype(self.serve_dtype) if self.serve_dtype else self.dtype

    def build(self, out_dir: Path) -> Path:
        return archmodels.build(self.arch, out_dir, dtype=self.dtype, sharded=self.layout == "sharded",
                                base_layout=self.layout == "base", hub_names=self.layout == "hub_names")


def prompt_ids(model_dir: Path, prompt: str) -> list[int]:
    """The prompt's ids as sllmd computes them for a completions prompt: the tokenizer's ids without specials,
    BOS first iff the tokenizer adds one by itself (checked against `sllmd.serving.textgen.Tokenizer.encode`)."""
    from transformers import AutoTokenizer

    from sllmd.serving.textgen import Tokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]:
        ids = [bos, *ids]
    assert ids == Tokenizer.from_dir(model_dir).encode(prompt), "sllmd tokenises the prompt differently"
    return ids


class SllmdTokenRule:
    """A transformers logits processor that leaves only the token `sllmd.engine.sampling.choose_token` picks
    finite, so greedy `generate()` follows sllmd's position-keyed sampling. The position of the token being
    chosen is its absolute index in the sequence: the current length of `input_ids`."""

    def __init__(self, temperature: float, top_p: float, seed: int) -> None:
        from sllmd.types import SamplingParams

        self.params = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p, seed=seed)
        self.seed = seed

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from sllmd.engine.sampling import choose_token

        position = input_ids.shape[1]
        chosen = torch.full_like(scores, float("-inf"))
        for row in range(scores.shape[0]):
            chosen[row, choose_token(scores[row], self.params, position, self.seed)] = 0.0
        return chosen


def reference(model_dir: Path, dtype: str, ids: list[int], max_new_tokens: int,
              sampling: SllmdTokenRule | None = None) -> list[int]:
    """transformers' greedy `generate()` (or, with `sampling`, sllmd's token rule) from `from_pretrained(model_dir,
    dtype=dtype)`: the new ids, up to and including the first EOS (generation_config's, as sllmd stops)."""
    from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessorList
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(model_dir)
    # Attention logit soft-capping (Gemma 2) needs the eager attention: sdpa cannot soft-cap. transformers 5.25
    # picks eager for Gemma 2 by itself; 5.19 picks sdpa and silently skips the soft-capping.
    eager = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), **eager).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, logits_processor=LogitsProcessorList([sampling] if sampling else []),
                             eos_token_id=sorted(eos_ids), pad_token_id=model.generation_config.pad_token_id)
    new = out[0, len(ids):].tolist()
    end = next((i + 1 for i, t in enumerate(new) if t in eos_ids), len(new))
    return new[:end]


def expected_completion(model_dir: Path, tokens: list[int]) -> dict[str, Any]:
    """What sllmd's completions answer must hold for generated `tokens`: text (special tokens and EOS dropped,
    no clean-up), completion_tokens (EOS counted) and finish_reason."""
    from transformers import AutoTokenizer

    from sllmd.serving.textgen import Tokenizer

    eos_ids = Tokenizer.from_dir(model_dir).eos_token_ids
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text_ids = [t for t in tokens if t not in eos_ids]
    text = tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stopped = bool(tokens) and tokens[-1] in eos_ids
    return {"text": text, "completion_tokens": len(tokens), "finish_reason": "stop" if stopped else "length"}


async def post_deploy(node: RunningNode, name: str, checkpoint: Path, **fields: Any) -> tuple[int, dict]:
    body = {"name": name, "checkpoint": str(checkpoint), "backend": "transformers",
            "autoscaling": {"keep_alive_s": 30}, **fields}
    async with node.http.post(f"{node.url}/admin/models", json=body) as response:
        return response.status, await response.json()


async def get_status(node: RunningNode, path: str) -> tuple[int, dict]:
    async with node.http.get(f"{node.url}{path}") as response:
        return response.status, await response.json()


@asynccontextmanager
async def deployed(node: RunningNode, name: str, checkpoint: Path, **fields: Any) -> AsyncIterator[None]:
    status, body = await post_deploy(node, name, checkpoint, **fields)
    assert status == 201, f"deploy {name}: {status} {body}"
    try:
        yield
    finally:
        async with node.http.delete(f"{node.url}/admin/models/{name}") as response:
            assert response.status == 200, await response.text()


async def complete(node: RunningNode, model: str, prompt: str, **fields: Any) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    async with node.http.post(f"{node.url}/v1/completions", json=body) as response:
        answer = await response.json()
        assert response.status == 200, f"{model}: {response.status} {answer}"
        return answer


async def check_against_generate(node: RunningNode, name: str, path: Path, dtype: str,
                                 sampling: dict[str, Any] | None = None) -> list[list[int]]:
    """Each prompt's completion equals generate()'s; returns generate()'s ids per prompt."""
    generated = []
    for prompt in PROMPTS:
        ids = prompt_ids(path, prompt)
        rule = SllmdTokenRule(**sampling) if sampling else None
        tokens = await asyncio.to_thread(reference, path, dtype, ids, MAX_TOKENS, rule)
        want = expected_completion(path, tokens)
        answer = await complete(node, name, prompt, **(sampling or {}))
        got = {"text": answer["choices"][0]["text"], "completion_tokens": answer["usage"]["completion_tokens"],
               "finish_reason": answer["choices"][0]["finish_reason"]}
        assert got == want, f"{name} on {prompt!r}: generate() gave ids {tokens}"
        assert answer["usage"]["prompt_tokens"] == len(ids)
        generated.append(tokens)
    return generated


def margin_violations(model_dir: Path, dtype: str, ids: list[int], generated: list[int]) -> list[str]:
    """Where 16-bit kernels cannot be compared token for token (vLLM's and transformers' bf16 matmuls round
    differently, and a tie within one bf16 step goes either way), hold each generated token to this instead:
    teacher-forced on prompt + `generated`, its float32 logit must be within twice `dtype`'s own error at that
    position (the largest |logit in `dtype` - logit in float32| transformers computes there) of the float32
    maximum. A backend that computes the architecture wrongly picks tokens far below it. Returns one line per
    position that misses."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    eager = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) is not None else {}
    sequence = torch.tensor([ids + generated])
    logits = {}
    for name in ("float32", dtype):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, name), **eager).eval()
        with torch.no_grad():
            logits[name] = model(sequence).logits[0].float()
    misses = []
    for k, token in enumerate(generated):
        exact, rounded = logits["float32"][len(ids) - 1 + k], logits[dtype][len(ids) - 1 + k]
        error = (rounded - exact).abs().max().item()
        gap = (exact.max() - exact[token]).item()
        if gap > 2 * error:
            misses.append(f"token {k} ({token}): {gap:.4f} below the float32 argmax, {dtype}'s error {error:.4f}")
    return misses
