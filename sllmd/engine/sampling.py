"""Position-keyed token choice: the token at position p depends only on (logits, params, seed, p).

There is no generator state carried from token to token. A request moved mid-generation to another
instance (which re-prefills prompt + tokens so far) therefore continues with exactly the tokens it
would have produced where it was, provided the logits match. Everything after the logits runs in
float64 on the CPU so that the choice itself never depends on the device, dtype or kernel.
"""

from __future__ import annotations

import torch

from sllmd.types import SamplingParams

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio)


def _mix64(z: int) -> int:
    """The splitmix64 finaliser: a bijection on 64-bit ints with full avalanche."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def keyed_uniform(seed: int, position: int) -> float:
    """A uniform float in [0, 1) determined by (seed, position) alone.

    Counter-based, pure integer arithmetic, so identical on every machine: the top 53 bits of output
    number position + 1 of a splitmix64 stream whose seed is the first splitmix64 output for `seed`.
    Seeds are taken modulo 2^64; position must be >= 0.
    """
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    key = _mix64((seed + _GOLDEN) & _MASK64)
    z = _mix64((key + (position + 1) * _GOLDEN) & _MASK64)
    return (z >> 11) * (1.0 / (1 << 53))  # top 53 bits: every double in [0, 1) on a 2^-53 grid


def choose_token(logits: torch.Tensor, params: SamplingParams, position: int, seed: int) -> int:
    """Pick the token at sequence index `position` from the 1-D next-token `logits`.

    temperature 0 is argmax (ties go to the lowest id). Otherwise softmax(logits / temperature) in
    float64, restricted to the top-p nucleus (the smallest prefix of tokens sorted by probability,
    stable on ties, whose mass reaches top_p), sampled by inverse CDF at keyed_uniform(seed, position).
    """
    if logits.dim() != 1:
        raise ValueError(f"expected 1-D logits, got shape {tuple(logits.shape)}")
    if params.temperature < 0 or not 0 < params.top_p <= 1:
        raise ValueError(f"bad sampling params: temperature={params.temperature} top_p={params.top_p}")
    # One small device-to-host copy per token; widening to float64 is exact for every float dtype,
    # so greedy order and ties are exactly those of the model's own logits.
    x = logits.detach().to(device="cpu", dtype=torch.float64)
    if params.temperature == 0:
        return int(torch.argmax(x))  # documented to return the first maximal index
    probs = torch.softmax(x / params.temperature, dim=-1)
    sorted_p, order = torch.sort(probs, descending=True, stable=True)
    # Never consider zero-probability tokens, even when rounding leaves u * total at the very top.
    keep = max(int(torch.count_nonzero(sorted_p)), 1)
    if params.top_p < 1:
        cum = torch.cumsum(sorted_p[:keep], dim=0)
        first_enough = int(torch.searchsorted(cum, torch.tensor([params.top_p], dtype=torch.float64)))
        keep = min(first_enough + 1, keep)
    cdf = torch.cumsum(sorted_p[:keep], dim=0)
    target = torch.tensor([keyed_uniform(seed, position) * float(cdf[-1])], dtype=torch.float64)
    # First index whose cumulative mass exceeds the target.
    idx = min(int(torch.searchsorted(cdf, target, right=True)), keep - 1)
    return int(order[idx])
