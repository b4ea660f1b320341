"""The backend contract: token ids in, token ids out.

Engines know nothing of text, HTTP or scheduling. Tokenising, chat templates, stop strings and
detokenising happen above them (`sllmd.textgen`), so every backend — and migration, which moves
only tokens — works on the same representation.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


class Backend(enum.StrEnum):
    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    DUMMY = "dummy"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token.

    `temperature == 0` is greedy. With `seed` set, the token at position p is drawn from a uniform
    keyed by (seed, p) alone, so a seeded request gives the same tokens on any instance, batch or
    restart point (this is what lets migration resume sampled output exactly).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a cold start cost; the scheduler's estimators learn from these."""

    source_tier: str  # "none" | "ssd" | "dram" | ...
    num_bytes: int
    load_s: float  # checkpoint bytes to device memory
    init_s: float  # everything else the engine did before it could serve


class Engine(abc.ABC):
    """One instance of one model on one device slot.

    Lifecycle: `start()` once, then any number of concurrent `generate()` calls, then `stop()` once.
    `generate()` is an async generator: closing it early (the client went away) must stop the
    work for that request promptly and free what it held.
    """

    #: Longest prompt + completion in tokens.
    context_length: int

    @abc.abstractmethod
    async def start(self) -> LoadReport: ...

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[int]:
        """Yield up to `params.max_tokens` new token ids; ends early after a stop token (yielded)."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def num_active(self) -> int:
        """Requests currently generating on this engine."""
