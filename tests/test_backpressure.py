"""Honest back-pressure on real daemons: a full queue is a 429 with Retry-After and OpenAI's error shape (the
openai SDK raises RateLimitError), here and through a relay; a streaming request waiting on a cold start gets its
headers at once and SSE comments on the start's progress (which the SDK skips), and so does the admin view."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from sllmd.engine import NO_RESOURCES, EngineResources
from sllmd.errors import QueueFull, error_from_wire
from sllmd.serving.relay import Relay
from sllmd.serving.request import TokenRequest
from sllmd.state.models import Deployment
from sllmd.types import SamplingParams, Tier
from sllmd.worker.lifecycle import EngineFactory, default_engine_factory
from sllmd.worker.start_progress import StartPhase, StartView, StartWatch
from tests.nodes import RunningNode, running_node

BODY = {"model": "demo", "prompt": "Hello", "max_tokens": 8, "temperature": 0}


def gated_engine_factory(gate: threading.Event) -> EngineFactory:
    """The real engine factory, but building an engine waits for `gate`: a start held in its CREATING phase."""
    def create(deployment: Deployment, checkpoint_dir: Path, device: str,
               resources: EngineResources = NO_RESOURCES) -> Any:
        gate.wait()
        return default_engine_factory(deployment, checkpoint_dir, device, resources)
    return create


@asynccontextmanager
async def gated_node(tmp_path: Path, demo_model_dir: Path, **settings: Any
                     ) -> AsyncIterator[tuple[RunningNode, threading.Event]]:
    """A node serving "demo" whose starts wait until the yielded gate is set."""
    gate = threading.Event()
    async with running_node(tmp_path, gated_engine_factory(gate), **settings) as running:
        try:
            await running.deploy("demo", demo_model_dir, keep_alive_s=600)
            yield running, gate
        finally:
            gate.set()  # a start still held ends, so the node can close


def waiting(running: RunningNode) -> int:
    return running.node.worker.runtimes["demo"].num_waiting


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def read_stream(response: aiohttp.ClientResponse) -> tuple[list[str], list[Any]]:
    """(comment lines before the first event, every data event) of an SSE response, read to its end."""
    comments: list[str] = []
    events: list[Any] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":") and not events:
            comments.append(line)
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return comments, events


async def test_a_full_queue_answers_429_with_retry_after_and_an_openai_error(demo_model_dir, tmp_path):
    async with gated_node(tmp_path, demo_model_dir, serving__max_queue_per_model=1) as (running, gate):
        first = asyncio.create_task(running.complete("demo"))  # waits for the held start: the queue is full
        await wait_until(lambda: waiting(running) == 1)
        async with running.http.post(f"{running.url}/v1/completions", json=BODY) as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "1"
            body = await response.json()
        assert body == {"error": {"type": "rate_limit_error", "param": None, "code": "queue_full",
                                  "message": body["error"]["message"]}}
        assert "'demo'" in body["error"]["message"] and "bound of 1 request" in body["error"]["message"]

        client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as limited:
            await client.completions.create(model="demo", prompt="Hello", max_tokens=4)
        assert limited.value.status_code == 429 and limited.value.code == "queue_full"
        assert limited.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):  # a stream too: refused before any header went out
            await client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                                 stream=True)
        gate.set()
        status, _ = await first
        assert status == 200


async def test_a_streamed_cold_start_shows_its_progress_before_the_first_token(demo_model_dir, tmp_path):
    async with gated_node(tmp_path, demo_model_dir) as (running, gate):
        body = {**BODY, "stream": True}
        async with running.http.post(f"{running.url}/v1/completions", json=body) as response:
            # The headers came while the start is held, and with them what it is doing: first "pending" (for a
            # moment it has not begun), then building the engine, which the gate holds.
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
            first = (await response.content.readline()).decode()
            assert first.startswith(": waiting for 'demo' to start: pending from ssd, "), first
            assert await response.content.readline() == b"\n"
            line = (await response.content.readline()).decode()
            assert line.startswith(": waiting for 'demo' to start: creating from ssd, "), line

            view = await running.model_view("demo")
            (instance,) = view["instances"]
            progress = instance["progress"]
            assert (progress["phase"], progress["tier"], progress["bytes_done"]) == ("creating", "ssd", None)
            assert progress["bytes_total"] == view["checkpoint_bytes"] and progress["estimated_s"] > 0

            assert await response.content.readline() == b"\n"
            again = (await response.content.readline()).decode()  # a second later, still creating
            assert again.startswith(": waiting for 'demo' to start: creating from ssd, "), again
            gate.set()
            comments, events = await read_stream(response)
        assert all(c.startswith(": waiting for 'demo' to start: ") for c in comments), comments
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["text"] for e in events[:-1])
        assert (await running.model_view("demo"))["instances"][0]["progress"] is None  # ready: nothing to show


async def test_the_sdk_parses_a_stream_that_waited_on_a_cold_start_unchanged(demo_model_dir, tmp_path):
    async with gated_node(tmp_path, demo_model_dir) as (running, gate):
        client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        asyncio.get_running_loop().call_later(1.5, gate.set)  # a start long enough for two comments
        stream = await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0, stream=True)
        chunks = [chunk async for chunk in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
        whole = await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)
        assert streamed == whole.choices[0].message.content and streamed
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"


async def test_an_error_after_the_headers_arrives_as_an_sse_error_event(demo_model_dir, tmp_path):
    async with gated_node(tmp_path, demo_model_dir, serving__queue_timeout_s=0.5,
                          serving__max_start_wait_s=1.0) as (running, _):
        async with running.http.post(f"{running.url}/v1/completions", json={**BODY, "stream": True}) as response:
            assert response.status == 200
            comments, events = await read_stream(response)
        assert comments
        assert events[0]["error"]["code"] == "cold_start_timeout" and events[1:] == ["[DONE]"]
        client = openai.AsyncOpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="did not become ready"):
            async for _ in await client.completions.create(model="demo", prompt="Hello", stream=True):
                pass


async def test_a_relayed_request_carries_the_start_progress_and_the_429(demo_model_dir, tmp_path):
    relay = Relay("entry")
    request = TokenRequest("demo", (1, 5, 9), SamplingParams(max_tokens=4, temperature=0.0))
    try:
        async with gated_node(tmp_path, demo_model_dir, serving__max_queue_per_model=1) as (running, gate):
            address = running.url.removeprefix("http://")
            seen: list[StartView | None] = []

            async def show(start: StartView | None) -> None:
                seen.append(start)

            async def relayed() -> list[int]:
                watch = StartWatch()
                async with AsyncExitStack() as stack:
                    async with watch.reporting(show):
                        tokens = await stack.enter_async_context(relay.open(address, request, watch))
                    return [token async for token in tokens]

            first = asyncio.create_task(relayed())
            await wait_until(lambda: waiting(running) == 1)
            with pytest.raises(QueueFull) as full:  # the serving node's 429, raised again as it was
                async with relay.open(address, request):
                    pass
            assert (full.value.status, full.value.retry_after_s, full.value.code) == (429, 1, "queue_full")
            await wait_until(lambda: any(s is not None and s.phase is StartPhase.CREATING for s in seen))
            gate.set()
            assert len(await first) == 4
        assert all(s is not None and s.tier is Tier.SSD and s.estimated_s > 0 for s in seen), seen
    finally:
        await relay.close()


def test_start_progress_and_a_full_queue_survive_their_wire_forms():
    view = StartView(StartPhase.FETCHING, Tier.PEER, 3 << 20, 12 << 20, 1.3, 4.0)
    assert StartView.from_wire(json.loads(json.dumps(view.to_wire()))) == view
    assert view.describe() == "fetching from peer, 3.0 MiB of 12.0 MiB, 1.3 s of an estimated 4.0 s"
    for bad in ([], {**view.to_wire(), "phase": "dancing"}, {**view.to_wire(), "bytes_total": -1},
                {**view.to_wire(), "elapsed_s": "soon"}):
        with pytest.raises(ValueError):
            StartView.from_wire(bad)
    again = error_from_wire(QueueFull("m", 3, retry_after_s=2).to_wire())
    assert isinstance(again, QueueFull) and (again.status, again.retry_after_s) == (429, 2)
