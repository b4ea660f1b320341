"""Position-keyed sampling inside vLLM, so a sampled request resumed on another engine continues the same
sample (live migration, resume after a node failure).

vLLM draws a seeded request's tokens from a per-request generator whose state depends on every draw
before, so a request restarted from prompt + tokens so far draws differently. sllmd's own rule
(`sampling.choose_token`) picks the token at absolute position p from (logits, temperature, top_p, seed,
p) alone. `PositionKeyedSampling` applies that rule in vLLM's sampler: `VllmEngine` sends a sampled
request to vLLM as greedy, with its real parameters in `extra_args[EXTRA_ARGS_KEY]`; this processor
leaves only the chosen token's logit finite, so vLLM's greedy step takes exactly that token. Greedy
requests carry no such arguments and are left alone.

Registered per engine (`AsyncEngineArgs.logits_processors`, by name, so vLLM's engine-core process
imports it). A vLLM logits processor sees the whole batch: it tracks which rows are sllmd-sampled as
vLLM adds, removes and moves requests in its persistent batch, and reads each row's position from the
request's live token lists. Costs one device-to-host row copy and a float64 softmax per sampled token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

from sllmd.engine.sampling import choose_token
from sllmd.types import SamplingParams

if TYPE_CHECKING:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.config import VllmConfig

EXTRA_ARGS_KEY = "sllmd_sampling"  # extra_args[KEY] = {"temperature", "top_p", "seed"}


def extra_args(params: SamplingParams) -> dict[str, Any]:
    """The `extra_args` that make a vLLM request sampled by `PositionKeyedSampling` with `params`."""
    if params.seed is None:
        raise ValueError("a position-keyed sampled request needs a seed")
    return {EXTRA_ARGS_KEY: {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}}


@dataclass(frozen=True, slots=True)
class _Row:
    params: SamplingParams
    seed: int
    num_prompt_tokens: int
    output_ids: list[int]  # vLLM's live list of the request's generated tokens

    @property
    def position(self) -> int:
        return self.num_prompt_tokens + len(self.output_ids)


def _row_for(params: VllmSamplingParams, prompt_ids: list[int] | None, output_ids: list[int]) -> _Row | None:
    args = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if args is None:
        return None
    if prompt_ids is None:
        raise ValueError("position-keyed sampling needs the prompt's token ids")
    sampling = SamplingParams(max_tokens=1, temperature=float(args["temperature"]), top_p=float(args["top_p"]))
    return _Row(sampling, int(args["seed"]), len(prompt_ids), output_ids)


class PositionKeyedSampling(LogitsProcessor):
    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Row] = {}  # batch row -> its sllmd-sampled request

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the token: vLLM must apply it to greedy batches too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, _row_for)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, row in self._rows.items():
            token = choose_token(logits[index], row.params, row.position, row.seed)
            logits[index].fill_(float("-inf"))
            logits[index, token] = 0.0
        return logits
