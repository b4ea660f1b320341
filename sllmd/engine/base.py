"""The backend contract: token ids in, token ids out.

Engines know nothing of text, HTTP or scheduling. Tokenising, chat templates, stop strings and
detokenising happen above them (`sllmd.serving.textgen`), so every backend — and migration, which moves
only tokens — works on the same representation.

Live migration (`sllmd.worker.migration.source`) needs two things of every backend, both in this contract:
* resuming: `generate(prompt + tokens generated so far, params with max_tokens reduced by their
  number)` continues the request exactly where it was, because the token at sequence index p is
  chosen from the logits and (params.seed, p) alone — the index counts the original prompt too;
* catching up: `prefill(ids)` builds the KV cache of a sequence without generating, `extend` grows it
  as more tokens arrive, and `generate(..., prefilled=handle)` starts from it, computing only the
  tokens the handle does not cover yet.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import Any

from sllmd.errors import ContextLengthExceeded, EngineFailed, InvalidRequest
from sllmd.types import LoadReport, SamplingParams

# The floating dtypes a deployment may be served in (torch's names), and the other spellings clients use.
SERVING_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}
AUTO_DTYPE = "auto"  # the dtype the checkpoint's weights are stored in
# How a vLLM engine starts: "compiled" (torch.compile and, on GPUs, CUDA graphs: slower to start, faster to
# decode) or "eager" (neither). The transformers backend always runs eagerly.
START_MODES = ("compiled", "eager")


def serving_dtype(name: str) -> str | None:
    """The canonical serving dtype `name` spells ("auto" stays "auto"), or None if it is none of them."""
    name = DTYPE_ALIASES.get(name, name)
    return name if name in SERVING_DTYPES or name == AUTO_DTYPE else None


def check_token_ids(token_ids: list[int], num_total: int, *, vocab_size: int, context_length: int) -> None:
    """Ids in [0, vocab_size) and a sequence of `num_total` tokens within the context length (every backend
    checks before queueing: an out-of-range id would trip a device-side assert on CUDA, poisoning the context)."""
    if num_total > context_length:
        raise ContextLengthExceeded(f"{num_total} tokens exceed the context length {context_length}")
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        raise InvalidRequest(f"token ids must be in [0, {vocab_size})", param="prompt")


def check_request(prompt_ids: list[int], params: SamplingParams, *, vocab_size: int, context_length: int) -> None:
    """What every backend's `generate` rejects before queueing anything."""
    if not prompt_ids:
        raise InvalidRequest("prompt must contain at least one token", param="messages")
    if params.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
    if params.temperature < 0:
        raise InvalidRequest("temperature must be >= 0", param="temperature")
    if not 0 < params.top_p <= 1:
        raise InvalidRequest("top_p must be in (0, 1]", param="top_p")
    if len(prompt_ids) + params.max_tokens > context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens; the prompt has "
            f"{len(prompt_ids)} and max_tokens is {params.max_tokens}.")
    check_token_ids(prompt_ids, len(prompt_ids), vocab_size=vocab_size, context_length=context_length)


class Prefill(abc.ABC):
    """A sequence's KV cache on one engine, built without generating anything.

    Owned by one caller on one event loop; `extend` calls must not overlap. The handle is consumed by
    the `generate(..., prefilled=handle)` it is passed to (after which `extend` raises) or dropped by
    `close()`; both are idempotent with respect to the memory, which is freed once, by either.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.token_ids: list[int] = []  # every id the cache covers, in order
        self.is_open = True

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    async def extend(self, token_ids: list[int]) -> None:
        """Append `token_ids` to the sequence and compute their KV entries (nothing is emitted).
        InvalidRequest for out-of-vocabulary ids; ContextLengthExceeded past the context length;
        EngineFailed when the engine stopped or the handle was consumed or closed."""
        if not self.is_open:
            raise EngineFailed("prefill handle was consumed or closed")
        await self._compute(token_ids)

    @abc.abstractmethod
    async def _compute(self, token_ids: list[int]) -> None:
        """Check `token_ids`, compute their KV entries after the current ones, then append them to `token_ids`."""

    def close(self) -> None:
        """Free the cache now (no-op once consumed or closed). Never blocks."""
        self.is_open = False

    def take(self, engine: Engine, prompt_ids: list[int]) -> None:
        """Check that `generate(prompt_ids, prefilled=self)` on `engine` may use this handle: open, made by
        `engine`, its ids a prefix of `prompt_ids` (EngineFailed / InvalidRequest otherwise)."""
        if self.engine is not engine or not self.is_open:
            raise EngineFailed("prefill handle was consumed, closed or made by another engine")
        if prompt_ids[:self.num_tokens] != self.token_ids:
            raise InvalidRequest("the prefilled ids are not a prefix of the prompt", param="prompt")


class Engine(abc.ABC):
    """One instance of one model on one device slot.

    Lifecycle: `start()` once, then any number of concurrent `generate()` calls, then `stop()` once.
    `generate()` is an async generator: closing it early (the client went away) must stop the
    work for that request promptly and free what it held.
    """

    #: Longest prompt + completion in tokens.
    context_length: int

    @classmethod
    @abc.abstractmethod
    def check_model(cls, config: dict[str, Any]) -> None:
        """Deploy time, before any weights are fetched: `UnsupportedArchitecture` (a 400 naming the architecture)
        if this backend cannot serve the model `config` (its config.json) describes correctly."""

    @abc.abstractmethod
    async def start(self) -> LoadReport: ...

    @abc.abstractmethod
    def generate(self, prompt_ids: list[int], params: SamplingParams, *,
                 prefilled: Prefill | None = None) -> AsyncIterator[int]:
        """Yield up to `params.max_tokens` new token ids; ends early after a stop token (yielded).

        The k-th yielded token (k from 0) sits at sequence index len(prompt_ids) + k, which keys its
        sampling. With `prefilled` (a handle of this engine whose ids are a prefix of `prompt_ids`,
        else InvalidRequest), its KV cache is reused and only the ids after that prefix are computed;
        the handle is consumed. Validation errors are raised before anything is queued."""

    async def prefill(self, token_ids: list[int]) -> Prefill:
        """A new handle covering `token_ids` (at least one), computed on this engine's device. Same
        errors as `Prefill.extend`. Does not count in `num_active`."""
        if not token_ids:
            raise InvalidRequest("prefill needs at least one token", param="prompt")
        handle = self._new_prefill()
        await handle.extend(token_ids)
        return handle

    @abc.abstractmethod
    def _new_prefill(self) -> Prefill:
        """An empty handle of this engine."""

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def num_active(self) -> int:
        """Requests currently generating on this engine."""

    @property
    def has_died(self) -> bool:
        """The engine ended on its own, not by `stop` (its worker thread or process died): it serves nothing
        more, and its instance should be stopped to free what it holds."""
        return False
