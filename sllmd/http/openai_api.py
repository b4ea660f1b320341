"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (JSON or SSE).

Whichever node serves the request, the node it entered shapes the answer (`sllmd.serving.pipeline`).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web

from sllmd.errors import ModelNotFound, SllmdError
from sllmd.http.keys import ROUTER, STATE
from sllmd.http.schemas import parse_chat_request, parse_completion_request, parse_json_object
from sllmd.serving.pipeline import Finished, PreparedRequest, TextDelta
from sllmd.serving.request import GenerationRequest
from sllmd.state.models import Deployment
from sllmd.worker.start_progress import StartView, StartWatch, describe_wait

log = logging.getLogger(__name__)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/models", list_models)
    router.add_get("/v1/models/{model:.+}", retrieve_model)  # ids may contain "/"
    router.add_post("/v1/completions", completions)
    router.add_post("/v1/chat/completions", chat_completions)


def _model_object(deployment: Deployment) -> dict[str, Any]:
    """OpenAI's Model object, plus what a client sizes requests by (as vLLM's /v1/models does)."""
    return {"id": deployment.name, "object": "model", "created": int(deployment.created_at), "owned_by": "sllmd",
            "max_model_len": deployment.context_length, "dtype": deployment.dtype,
            "backend": deployment.backend.value}


async def list_models(request: web.Request) -> web.Response:
    data = [_model_object(d) for d in request.app[STATE].deployments().values()]
    return web.json_response({"object": "list", "data": data})


async def retrieve_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    deployment = request.app[STATE].deployment(name)
    if deployment is None:
        raise ModelNotFound(name)
    return web.json_response(_model_object(deployment))


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_completion_request(parse_json_object(await request.read())), is_chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, parse_chat_request(parse_json_object(await request.read())), is_chat=True)


class _Shape:
    """Builds the OpenAI objects of one response, completion or chat flavoured."""

    def __init__(self, request: GenerationRequest, is_chat: bool) -> None:
        self.is_chat = is_chat
        self.id = ("chatcmpl-" if is_chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = request.model

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, text: str | None, finish_reason: str | None, *, is_first: bool = False) -> dict[str, Any]:
        if self.is_chat:
            delta: dict[str, Any] = {}
            if is_first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.is_chat else "text_completion", [])
        body["usage"] = usage
        return body

    def whole(self, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.is_chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage
        return body


def _usage(finished: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.completion_tokens,
        "total_tokens": finished.prompt_tokens + finished.completion_tokens,
    }


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _event_stream() -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


async def _serve(request: web.Request, parsed: GenerationRequest, *, is_chat: bool) -> web.StreamResponse:
    router = request.app[ROUTER]
    prepared = await router.prepare(parsed)
    shape = _Shape(parsed, is_chat)
    if parsed.stream:
        return await _stream(request, prepared, shape)
    # Opening the stream waits through a cold start; its errors (429, 503, 500) still get real statuses.
    async with router.open_stream(prepared) as events:
        parts: list[str] = []
        async for event in events:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            else:
                return web.json_response(shape.whole("".join(parts), event.finish_reason, _usage(event)))
    raise AssertionError("event stream ended without Finished")  # pragma: no cover


async def _stream(request: web.Request, prepared: PreparedRequest, shape: _Shape) -> web.StreamResponse:
    """The SSE answer. Errors raised before anything went out keep their real status (the middleware answers
    them); once the request waits for an instance to start, the headers go out and SSE comments say how the
    start goes, so a later error arrives as an error event."""
    response = _event_stream()
    watch = StartWatch()

    async def send(payload: dict[str, Any] | str) -> None:
        await response.write(_sse(payload))

    async def show_wait(start: StartView | None) -> None:
        if not response.prepared:
            await response.prepare(request)
        # A comment: clients and the SDKs skip it; proxies see the connection alive, people see it move.
        await response.write(f": {describe_wait(shape.model, start)}\n\n".encode())

    try:
        async with AsyncExitStack() as source:
            async with watch.reporting(show_wait):
                events = await source.enter_async_context(request.app[ROUTER].open_stream(prepared, watch))
            if not response.prepared:
                await response.prepare(request)
            is_first = True
            async for event in events:
                if isinstance(event, TextDelta):
                    await send(shape.chunk(event.text, None, is_first=is_first))
                    is_first = False
                    continue
                if is_first and shape.is_chat:
                    await send(shape.chunk("", None, is_first=True))
                await send(shape.chunk(None if shape.is_chat else "", event.finish_reason))
                if prepared.request.include_usage:
                    await send(shape.usage_chunk(_usage(event)))
    except SllmdError as error:
        if not response.prepared:
            raise
        # The status line is gone; the error travels as an SSE event the SDKs raise on.
        log.warning("stream failed", extra={"model": shape.model, "error": error.message})
        await send(error.to_body())
    await send("[DONE]")
    await response.write_eof()
    return response
