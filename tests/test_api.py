"""The OpenAI-compatible API through a real server and the official openai SDK."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
import pytest_asyncio

from tests.nodes import RunningNode, running_node

PROMPT = "Hello, my name is"


@pytest_asyncio.fixture(scope="module")
async def served(demo_model_dir, tmp_path_factory) -> RunningNode:
    async with running_node(tmp_path_factory.mktemp("api"), devices__cpu_slots=2) as running:
        await running.deploy("demo", demo_model_dir, keep_alive_s=600)
        await running.deploy("fast", demo_model_dir, backend="dummy", keep_alive_s=600)
        yield running


@pytest.fixture
def client(served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


async def read_sse(response: aiohttp.ClientResponse) -> list[dict | str]:
    events = []
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_sdk_lists_models(client):
    models = await client.models.list()
    assert {m.id for m in models.data} == {"demo", "fast"}
    demo = next(m for m in models.data if m.id == "demo")
    assert demo.max_model_len == 1024 and demo.dtype == "float32"  # the demo model's context, stored dtype


async def test_sdk_retrieves_a_model_and_404s_an_unknown_one(client):
    model = await client.models.retrieve("demo")
    assert (model.id, model.object, model.owned_by) == ("demo", "model", "sllmd")
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("nope")
    assert caught.value.body["code"] == "model_not_found"


async def test_sdk_streamed_and_whole_completions_are_identical_at_temperature_zero(client):
    whole = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 24
    stream = await client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert whole.choices[0].text.strip()
    assert chunks[-1].usage.completion_tokens == 24


async def test_sdk_chat_whole_and_streamed(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    whole = await client.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    stream = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=16, temperature=0, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


async def test_seeded_sampling_is_reproducible_and_seed_dependent(client):
    async def sample(seed: int) -> str:
        result = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=16, seed=seed,
                                                 temperature=1.0, top_p=0.95)
        return result.choices[0].text

    first, again, other = await sample(7), await sample(7), await sample(8)
    assert first == again
    assert first != other


async def test_stop_string_truncates_and_reports_stop(client):
    whole = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0)
    text = whole.choices[0].text
    stop = text[5:8]
    cut = await client.completions.create(model="demo", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


async def test_token_id_prompts_are_accepted(client):
    result = await client.completions.create(model="demo", prompt=[5, 6, 7, 8], max_tokens=4, temperature=0)
    assert result.usage.prompt_tokens == 4


async def test_concurrent_requests_to_one_instance_match_their_sequential_results(served, client):
    prompts = [f"{PROMPT} {word}" for word in ("Ada", "Bob", "Cy", "Di", "Eve", "Flo")]

    async def run(prompt: str) -> str:
        result = await client.completions.create(model="demo", prompt=prompt, max_tokens=12, temperature=0)
        return result.choices[0].text

    sequential = [await run(p) for p in prompts]
    concurrent = await asyncio.gather(*(run(p) for p in prompts))
    assert list(concurrent) == sequential
    assert len(served.node.worker.runtimes["demo"].instances) == 1  # all on the one instance


ERROR_CASES = [
    # (path, body or raw bytes, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "demo"}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 5000}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": "word " * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": "demo", "prompt": [10**9]}, 400, "prompt[0]"),
    ("/v1/chat/completions", {"model": "demo", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "demo", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), ERROR_CASES)
async def test_bad_input_gets_its_status_and_an_openai_error_body(served, path, body, status, param):
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with served.http.post(f"{served.url}{path}", **kwargs) as response:
        assert response.status == status
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    status_after, _ = await served.complete("fast")  # the server keeps serving
    assert status_after == 200


async def test_sdk_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match=r"(?i)only n=1"):
        await client.completions.create(model="demo", prompt="x", n=2)
    with pytest.raises(openai.BadRequestError) as excinfo:
        await client.completions.create(model="demo", prompt="x", max_tokens=5000)
    assert excinfo.value.code == "context_length_exceeded"


async def test_unknown_route_and_method_are_json_errors(served):
    async with served.http.get(f"{served.url}/v1/nothing") as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "unknown_route"
    async with served.http.get(f"{served.url}/v1/completions") as response:
        assert response.status == 405
        assert "POST" in response.headers["Allow"]


async def test_client_disconnect_stops_generation(served):
    engine = served.node.worker.runtimes["demo"].ready()[0].engine
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True}
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{served.url}/v1/completions", json=body)
        await response.content.readline()  # the first event is flowing
        assert engine.num_active == 1
        response.close()  # drop the connection mid-stream
    for _ in range(200):
        if engine.num_active == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.num_active == 0
    status, _ = await served.complete("demo")
    assert status == 200


async def test_sse_shape_ends_with_done_and_usage_chunk(served):
    body = {"model": "fast", "prompt": "x", "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    async with served.http.post(f"{served.url}/v1/completions", json=body) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(response)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 4
    assert events[-3]["choices"][0]["finish_reason"] == "length"


async def test_health_and_metrics(served):
    async with served.http.get(f"{served.url}/health") as response:
        assert (await response.json())["status"] == "ok"
    async with served.http.get(f"{served.url}/metrics") as response:
        text = await response.text()
    for name in ("sllmd_requests_total", "sllmd_ttft_seconds_bucket", "sllmd_request_latency_seconds_bucket",
                 "sllmd_cold_starts_total", "sllmd_tokens_total", "sllmd_instances"):
        assert name in text
    assert 'sllmd_cold_starts_total{model="demo",tier="ssd"} 1.0' in text
