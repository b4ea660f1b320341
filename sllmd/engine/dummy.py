"""A backend with no model compute: measures the serving path (HTTP, routing, queues, streaming).

Tokens are a deterministic function of (seed, position), drawn from the checkpoint's vocabulary
minus the stop tokens, so output is reproducible and never ends early.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sllmd.engine.base import Engine, Prefill, check_token_ids
from sllmd.errors import ContextLengthExceeded
from sllmd.types import LoadReport, SamplingParams

DEFAULT_CONTEXT_LENGTH = 2048


class DummyPrefill(Prefill):
    """Only the ids: the dummy has no KV cache, but checks the contract's errors like a real engine."""

    async def _compute(self, token_ids: list[int]) -> None:
        assert isinstance(self.engine, DummyEngine)
        self.engine.check_ids(token_ids, self.num_tokens + len(token_ids))
        self.token_ids += token_ids
        await asyncio.sleep(0)


class DummyEngine(Engine):
    def __init__(self, checkpoint_dir: Path, *, max_model_len: int | None = None) -> None:
        config_path = checkpoint_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.vocab_size = int(config.get("vocab_size", 256))
        model_length = int(config.get("max_position_embeddings", DEFAULT_CONTEXT_LENGTH))
        self.context_length = model_length if max_model_len is None else min(model_length, max_model_len)
        self._num_active = 0

    @classmethod
    def check_model(cls, config: dict[str, Any]) -> None:
        """The dummy reads only vocab_size and the context length: any config will do."""

    async def start(self) -> LoadReport:
        return LoadReport(source_tier="none", num_bytes=0, load_s=0.0, init_s=0.0)

    def check_ids(self, token_ids: list[int], num_total: int) -> None:
        check_token_ids(token_ids, num_total, vocab_size=self.vocab_size, context_length=self.context_length)

    def _new_prefill(self) -> Prefill:
        return DummyPrefill(self)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                       prefilled: Prefill | None = None) -> AsyncIterator[int]:
        if len(prompt_ids) + params.max_tokens > self.context_length:
            raise ContextLengthExceeded(
                f"prompt ({len(prompt_ids)}) + max_tokens ({params.max_tokens}) exceeds {self.context_length}"
            )
        if prefilled is not None:
            prefilled.take(self, prompt_ids)
            prefilled.close()
        seed = params.seed or 0
        self._num_active += 1
        try:
            for position in range(len(prompt_ids), len(prompt_ids) + params.max_tokens):
                token = (seed * 2654435761 + position * 40503) % self.vocab_size
                while token in params.stop_token_ids:
                    token = (token + 1) % self.vocab_size
                yield token
                await asyncio.sleep(0)  # one scheduling point per token, like a real engine's handoff
        finally:
            self._num_active -= 1

    async def stop(self) -> None:
        pass

    @property
    def num_active(self) -> int:
        return self._num_active
