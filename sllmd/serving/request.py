"""A request at each stage of the serving path.

`GenerationRequest` is what the HTTP layer validated (OpenAI fields); the entry node resolves it once
(`sllmd.serving.pipeline.PreparedRequest`: deployment, tokenizer, prompt ids, sampling fixed); a
`TokenRequest` is what any node's instance generates from, and what crosses the internal hop to a serving
node (`to_wire` / `from_wire`): ids in, ids out, so the serving node never parses, tokenises or renders
text.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sllmd.errors import InvalidRequest
from sllmd.types import SamplingParams

MAX_TOKEN_ID = 2**31 - 1  # keeps ids machine-sized; the vocabulary check is the engine's


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant" ("developer" arrives here as "system")
    content: str


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated request. Exactly one of `prompt` (completions) and `messages` (chat) is set."""

    model: str
    prompt: str | list[int] | None
    messages: tuple[ChatMessage, ...] | None
    max_tokens: int | None  # None (chat only): as many as fit in the context window
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """Generate for `model` from `prompt_ids` + `generated` by `params`, `max_tokens` counting `generated`
    (a request resumed elsewhere continues from the tokens its client has; sampling is keyed by (seed,
    absolute position), so the continuation equals an uninterrupted run)."""

    model: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    generated: tuple[int, ...] = ()

    def sequence(self) -> list[int]:
        """The ids an instance starts from."""
        return [*self.prompt_ids, *self.generated]

    def remaining_params(self) -> SamplingParams:
        """`params` for the tokens still to generate."""
        return replace(self.params, max_tokens=self.params.max_tokens - len(self.generated))

    def to_wire(self) -> dict[str, Any]:
        p = self.params
        return {"model": self.model, "prompt_ids": list(self.prompt_ids), "generated": list(self.generated),
                "max_tokens": p.max_tokens, "temperature": p.temperature, "top_p": p.top_p, "seed": p.seed,
                "stop_token_ids": sorted(p.stop_token_ids)}

    @classmethod
    def from_wire(cls, raw: Any) -> TokenRequest:
        """A decoded JSON body as a TokenRequest, every field checked; InvalidRequest naming the field."""
        if not isinstance(raw, dict):
            raise InvalidRequest("body must be an object")
        unknown = set(raw) - _WIRE_FIELDS
        if unknown:
            raise InvalidRequest(f"unknown field '{sorted(unknown)[0]}'", param=sorted(unknown)[0])
        model = raw.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidRequest("model must be a non-empty string", param="model")
        prompt_ids = _token_ids(raw.get("prompt_ids"), "prompt_ids")
        generated = _token_ids(raw.get("generated", []), "generated")
        max_tokens, seed = raw.get("max_tokens"), raw.get("seed")
        if not _is_int(max_tokens) or max_tokens <= len(generated):
            raise InvalidRequest("max_tokens must be an integer above the number generated", param="max_tokens")
        if seed is not None and not _is_int(seed):
            raise InvalidRequest("seed must be an integer or null", param="seed")
        temperature, top_p = _number(raw.get("temperature"), "temperature"), _number(raw.get("top_p"), "top_p")
        if not prompt_ids:
            raise InvalidRequest("prompt_ids must hold at least one id", param="prompt_ids")
        if temperature < 0 or not 0 < top_p <= 1:
            raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]", param="temperature")
        stop_token_ids = frozenset(_token_ids(raw.get("stop_token_ids", []), "stop_token_ids"))
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                stop_token_ids=stop_token_ids)
        return cls(model, tuple(prompt_ids), params, tuple(generated))


_WIRE_FIELDS = {"model", "prompt_ids", "generated", "max_tokens", "temperature", "top_p", "seed", "stop_token_ids"}


def _is_int(value: Any) -> bool:
    return type(value) is int


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InvalidRequest(f"{name} must be a number", param=name)
    return float(value)


def _token_ids(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(i) and 0 <= i <= MAX_TOKEN_ID for i in value):
        raise InvalidRequest(f"{name} must be a list of token ids", param=name)
    return value
