"""`backend: vllm` through the whole serving path: admin deploy, the store's sllmd checkpoint, a real vLLM engine
started from sllmd's loader, the OpenAI API. `make test-vllm`."""

from __future__ import annotations

import json

import pytest
import pytest_asyncio

from tests.nodes import RunningNode, running_node

pytestmark = pytest.mark.vllm


@pytest_asyncio.fixture(scope="module")
async def served(demo_model_dir, tmp_path_factory) -> RunningNode:
    pytest.importorskip("vllm")
    async with running_node(tmp_path_factory.mktemp("vllm-api"), devices__cpu_slots=2) as running:
        await running.deploy("demo-vllm", demo_model_dir, backend="vllm", keep_alive_s=600)
        await running.deploy("demo-hf", demo_model_dir, backend="transformers", keep_alive_s=600)
        yield running


async def test_completion_matches_the_transformers_backend(served: RunningNode) -> None:
    """Greedy text from vLLM equals the transformers backend's on the same checkpoint (fp32 both)."""
    status, body = await served.complete("demo-vllm", "Hello, my name is", max_tokens=16)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 16
    status, reference = await served.complete("demo-hf", "Hello, my name is", max_tokens=16)
    assert status == 200, reference
    assert body["choices"][0]["text"] == reference["choices"][0]["text"] != ""
    view = await served.model_view("demo-vllm")
    assert view["backend"] == "vllm"


async def test_streamed_chat_with_stop_string(served: RunningNode) -> None:
    whole_status, whole = await served.complete("demo-vllm", "The morning was", max_tokens=24)
    assert whole_status == 200
    text = whole["choices"][0]["text"]
    stop = text[len(text) // 2:][:3]
    body = {"model": "demo-vllm", "prompt": "The morning was", "max_tokens": 24, "temperature": 0,
            "stream": True, "stop": [stop]}
    chunks = []
    async with served.http.post(f"{served.url}/v1/completions", json=body) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c.get("choices"))
    assert streamed == text[: text.index(stop)]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "stop"
