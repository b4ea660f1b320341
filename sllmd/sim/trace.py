"""Request traces for `sllmd simulate`: an Azure-Functions-like generator and a CSV reader. Pure: the
caller passes text and a seed, and the same inputs give the same trace.

Arrivals (`azure_like_trace`): serverless invocations are bursty and skewed (Shahrad et al., "Serverless
in the Wild", ATC'20: per-function rates span orders of magnitude, inter-arrival CVs well above 1). As in
the ServerlessLLM paper, each model's inter-arrival times are Gamma distributed with a coefficient of
variation `cv` (default 8: shape 1/cv², so most gaps are ~0 — bursts — and a few are very long), and
model i's mean rate is proportional to 1/(i+1)^skew (Zipf), summing to `total_rate` requests/s.

Token lengths (`TokenLengths`): GSM8K-like — short grade-school maths prompts of 100–200 tokens with
100–300-token worked answers, uniform; ShareGPT-like — chat turns, lognormal and heavy tailed (median
prompt ~250 and output ~200 tokens, a few in the thousands), clipped to a 4096-token context.
"""

from __future__ import annotations

import csv
import enum
import io
import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

MAX_CONTEXT_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Request:
    time_s: float  # arrival, seconds from the start of the trace
    model: str
    prompt_tokens: int
    output_tokens: int


class TokenLengths(enum.StrEnum):
    GSM8K = "gsm8k"
    SHAREGPT = "sharegpt"


class TraceError(ValueError):
    """A trace that cannot be read; the message names the line."""


def sample_lengths(kind: TokenLengths, rng: random.Random) -> tuple[int, int]:
    """(prompt_tokens, output_tokens) of one request."""
    if kind is TokenLengths.GSM8K:
        return rng.randint(100, 200), rng.randint(100, 300)
    prompt = min(int(rng.lognormvariate(math.log(250), 1.0)) + 1, MAX_CONTEXT_TOKENS // 2)
    output = min(int(rng.lognormvariate(math.log(200), 0.9)) + 1, MAX_CONTEXT_TOKENS - prompt)
    return prompt, output


def azure_like_trace(
    models: Sequence[str],
    *,
    duration_s: float,
    total_rate: float,
    seed: int,
    cv: float = 8.0,
    skew: float = 1.0,
    lengths: TokenLengths = TokenLengths.GSM8K,
) -> list[Request]:
    """Requests over [0, duration_s), in arrival order (ties by model order). See the module doc."""
    if not models or duration_s <= 0 or total_rate <= 0 or cv <= 0:
        raise ValueError("need models, and duration_s, total_rate and cv > 0")
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** skew for i in range(len(models))]
    shape = 1 / cv**2
    arrivals: list[tuple[float, int]] = []
    for index, weight in enumerate(weights):
        mean_gap_s = sum(weights) / (weight * total_rate)
        # Start at a random phase of the renewal process, so the trace does not begin with every
        # model arriving at t=0.
        t = rng.uniform(0, mean_gap_s)
        while t < duration_s:
            arrivals.append((t, index))
            t += rng.gammavariate(shape, mean_gap_s / shape)
    arrivals.sort()
    requests = []
    for t, index in arrivals:
        prompt, output = sample_lengths(lengths, rng)
        requests.append(Request(t, models[index], prompt, output))
    return requests


def parse_csv(text: str, *, known_models: Collection[str], lengths: TokenLengths, seed: int) -> list[Request]:
    """Rows `time_s,model[,prompt_tokens,output_tokens]` (an optional header row starting `time_s`);
    missing token counts are drawn from `lengths`. Returned sorted by time. Raises TraceError naming the
    first bad line: wrong column count, a time that is not a finite number >= 0, an unknown model, or
    token counts that are not positive integers fitting MAX_CONTEXT_TOKENS."""
    rng = random.Random(seed)
    requests = []
    for line_no, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or (line_no == 1 and row[0].strip() == "time_s"):
            continue
        requests.append(_parse_row([field.strip() for field in row], line_no, known_models, lengths, rng))
    if not requests:
        raise TraceError("the trace has no requests")
    requests.sort(key=lambda r: r.time_s)
    return requests


def _parse_row(
    row: list[str], line_no: int, known_models: Collection[str], lengths: TokenLengths, rng: random.Random
) -> Request:
    if len(row) not in (2, 4):
        raise TraceError(f"line {line_no}: expected time_s,model[,prompt_tokens,output_tokens], got {len(row)} fields")
    try:
        time_s = float(row[0])
    except ValueError:
        raise TraceError(f"line {line_no}: time_s {row[0]!r} is not a number") from None
    if not (math.isfinite(time_s) and time_s >= 0):
        raise TraceError(f"line {line_no}: time_s must be a finite number >= 0, got {row[0]!r}")
    if row[1] not in known_models:
        raise TraceError(f"line {line_no}: unknown model {row[1]!r}")
    if len(row) == 2:
        prompt, output = sample_lengths(lengths, rng)
        return Request(time_s, row[1], prompt, output)
    try:
        prompt, output = int(row[2]), int(row[3])
    except ValueError:
        raise TraceError(f"line {line_no}: token counts must be integers, got {row[2]!r}, {row[3]!r}") from None
    if prompt < 1 or output < 1 or prompt + output > MAX_CONTEXT_TOKENS:
        raise TraceError(f"line {line_no}: token counts must be >= 1 and sum to <= {MAX_CONTEXT_TOKENS}")
    return Request(time_s, row[1], prompt, output)
