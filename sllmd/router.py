"""Turns an OpenAI-level request into a token stream: resolve the model, tokenise, check the
context, get an instance (waiting through a cold start), generate, detokenise.

Everything that can be rejected is rejected in `prepare` or while opening the stream, before the
HTTP layer sends a status line, so errors keep their real status codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from sllmd.engine.base import Engine, SamplingParams
from sllmd.errors import ModelNotFound
from sllmd.http.schemas import GenerationRequest
from sllmd.metrics import Metrics
from sllmd.state.machine import LocalStateMachine
from sllmd.state.models import Deployment
from sllmd.textgen import TextStream, Tokenizer, resolve_max_tokens
from sllmd.worker.manager import Worker


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


StreamEvent = TextDelta | Finished


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    request: GenerationRequest
    deployment: Deployment
    tokenizer: Tokenizer
    prompt_ids: list[int]
    params: SamplingParams
    arrived_at: float


class TokenizerCache:
    """One loaded tokenizer per checkpoint directory; loading runs off the event loop."""

    def __init__(self) -> None:
        self._loaded: dict[str, asyncio.Future[Tokenizer]] = {}

    async def get(self, checkpoint: str) -> Tokenizer:
        future = self._loaded.get(checkpoint)
        if future is None:
            loop = asyncio.get_running_loop()
            future = self._loaded[checkpoint] = loop.run_in_executor(None, Tokenizer.from_dir, Path(checkpoint))
        try:
            return await asyncio.shield(future)
        except Exception:
            self._loaded.pop(checkpoint, None)  # let a later call retry (the files may be fixed)
            raise

    def forget(self, checkpoint: str) -> None:
        self._loaded.pop(checkpoint, None)


class Router:
    def __init__(self, state: LocalStateMachine, worker: Worker, tokenizers: TokenizerCache, metrics: Metrics) -> None:
        self.state = state
        self.worker = worker
        self.tokenizers = tokenizers
        self.metrics = metrics

    async def prepare(self, request: GenerationRequest) -> PreparedRequest:
        arrived_at = time.monotonic()
        deployment = self.state.deployment(request.model)
        if deployment is None:
            raise ModelNotFound(request.model)
        tokenizer = await self.tokenizers.get(deployment.checkpoint)
        if request.messages is not None:
            prompt_ids, param = tokenizer.render_chat(request.messages), "messages"
        elif isinstance(request.prompt, str):
            prompt_ids, param = tokenizer.encode(request.prompt), "prompt"
        else:
            prompt_ids, param = list(request.prompt or []), "prompt"
            tokenizer.check_prompt_ids(prompt_ids)
        max_tokens = resolve_max_tokens(len(prompt_ids), request.max_tokens, deployment.context_length, param=param)
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop_token_ids=tokenizer.eos_token_ids,
        )
        return PreparedRequest(request, deployment, tokenizer, prompt_ids, params, arrived_at)

    @asynccontextmanager
    async def open_stream(self, prepared: PreparedRequest) -> AsyncIterator[AsyncIterator[StreamEvent]]:
        """Holds an instance for the request while the caller consumes the yielded event stream."""
        async with (
            self.worker.lease(prepared.deployment.name) as instance,
            aclosing(self._generate(prepared, instance.engine)) as events,
        ):
            yield events

    async def _generate(self, prepared: PreparedRequest, engine: Engine | None) -> AsyncIterator[StreamEvent]:
        assert engine is not None, "leased instances are ready"
        model = prepared.deployment.name
        text = TextStream(prepared.tokenizer, prepared.request.stop)
        num_generated = 0
        is_eos = False
        self.metrics.tokens.labels(model, "in").inc(len(prepared.prompt_ids))
        async with aclosing(engine.generate(prepared.prompt_ids, prepared.params)) as tokens:
            async for token in tokens:
                if num_generated == 0:
                    self.metrics.ttft.labels(model).observe(time.monotonic() - prepared.arrived_at)
                num_generated += 1
                is_eos = token in prepared.params.stop_token_ids
                delta = text.push(token)
                if delta:
                    yield TextDelta(delta)
                if text.is_done:
                    break
        self.metrics.tokens.labels(model, "out").inc(num_generated)
        if not text.is_done:
            tail = text.finish()
            if tail:
                yield TextDelta(tail)
        finish_reason = "stop" if text.finish_reason == "stop" or is_eos else "length"
        self.metrics.latency.labels(model).observe(time.monotonic() - prepared.arrived_at)
        yield Finished(finish_reason, len(prepared.prompt_ids), num_generated)
