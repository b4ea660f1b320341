"""Deploying by Hugging Face Hub id, against a real local Hub stand-in (tests/hub_server.py) that
huggingface_hub's own download code talks to: the checkpoint is fetched (a cut connection resumed), converted
once into the store, its progress visible while it downloads; a wrong revision or repo is a clear 400 and
registers nothing; a second node copies the checkpoint from the first, not from the Hub."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from sllmd.cli import _parse_deploy
from tests.gguf_builder import write_llama_gguf
from tests.hub_server import HubServer, private_hf_home
from tests.nodes import RunningNode, generate_here, running_node
from tests.test_cluster import fetches_by_tier, running_cluster, wait_until

REPO = "sllmd-test/demo"
WEIGHTS = "model.safetensors"
GREEDY = {"prompt": "Hello, my name is", "max_tokens": 12, "temperature": 0}


@pytest.fixture(autouse=True)
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return private_hf_home(tmp_path / "hf-home", monkeypatch)


@pytest_asyncio.fixture
async def hub(demo_model_dir: Path) -> AsyncIterator[HubServer]:
    async with HubServer() as server:
        server.add_repo(REPO, demo_model_dir)
        yield server


@pytest_asyncio.fixture
async def node(hub: HubServer, tmp_path: Path) -> AsyncIterator[RunningNode]:
    async with running_node(tmp_path / "data", store__hub_endpoint=hub.endpoint) as running:
        yield running


async def post_deploy(node: RunningNode, body: dict) -> tuple[int, dict]:
    async with node.http.post(f"{node.url}/admin/models", json=body) as response:
        return response.status, await response.json()


async def get(node: RunningNode, path: str) -> tuple[int, dict]:
    async with node.http.get(f"{node.url}{path}") as response:
        return response.status, await response.json()


async def test_a_hub_id_is_downloaded_with_progress_resumed_after_a_cut_and_served(
        node: RunningNode, hub: HubServer, demo_model_dir: Path) -> None:
    sha = hub.add_repo(REPO, demo_model_dir)  # the same files again: "main" moves to a new commit
    hub.cut_after(WEIGHTS, 300_000)  # the first GET breaks off; huggingface_hub resumes from its last piece
    go_on = hub.hold_after(WEIGHTS, 600_000)  # the resumed GET stops midway until the test has looked
    deploying = asyncio.create_task(post_deploy(node, {"name": "hub", "checkpoint": REPO}))
    seen: dict = {}

    async def downloading() -> bool:
        nonlocal seen
        status, seen = await get(node, "/admin/models/hub")
        return status == 200 and seen["progress"]["phase"] == "download" and seen["progress"]["bytes_done"] > 0

    for _ in range(200):
        if await downloading():
            break
        await asyncio.sleep(0.05)
    assert seen["status"] == "deploying" and seen["checkpoint"] == f"hf://{REPO}@{sha}", seen
    progress = seen["progress"]
    total = sum(p.stat().st_size for p in demo_model_dir.iterdir())
    assert progress["bytes_total"] == total and 0 < progress["bytes_done"] < total, progress
    assert 0 < progress["fraction"] < 1
    _, listed = await get(node, "/admin/models")
    assert [m["status"] for m in listed["models"] if m["name"] == "hub"] == ["deploying"]
    go_on.set()
    status, deployed = await deploying
    assert status == 201, deployed
    assert deployed["checkpoint"] == f"hf://{REPO}@{sha}" and deployed["status"] == "deployed"
    assert hub.ranges(WEIGHTS) == [None, "bytes=262144-"]  # cut at 300 kB, resumed after one 256 KiB piece
    # Converted into the store at deploy: the first cold start is an SSD hit, and the text is the model's.
    await node.deploy("local", demo_model_dir)
    status, from_hub = await node.complete("hub", **GREEDY)
    assert status == 200, from_hub
    assert from_hub["choices"][0]["text"] == (await node.complete("local", **GREEDY))[1]["choices"][0]["text"]
    view = await node.model_view("hub")
    assert view["instances"][0]["load"]["source_tier"] in ("ssd", "dram")
    # The same commit deployed again is in the store already: nothing is downloaded.
    num_requests = len(hub.requests)
    status, again = await post_deploy(node, {"name": "hub2", "checkpoint": f"hf://{REPO}@{sha}"})
    assert status == 201 and again["checkpoint"] == deployed["checkpoint"]
    assert not [r for r in hub.requests[num_requests:] if "/resolve/" in r[1] and r[1].endswith(WEIGHTS)]


async def test_a_gguf_file_in_a_hub_repo_deploys_and_serves_what_the_original_model_does(
        node: RunningNode, hub: HubServer, demo_model_dir: Path, tmp_path: Path) -> None:
    gguf = write_llama_gguf(demo_model_dir, tmp_path / "demo-f32.gguf")
    sha = hub.add_repo("sllmd-test/demo-GGUF", {"demo-f32.gguf": gguf.read_bytes(), "README.md": b"# GGUF\n"})
    status, deployed = await post_deploy(node, {"name": "gguf", "checkpoint": "sllmd-test/demo-GGUF/demo-f32.gguf"})
    assert status == 201, deployed
    assert deployed["checkpoint"] == f"hf://sllmd-test/demo-GGUF/demo-f32.gguf@{sha}"
    assert not [r for r in hub.requests if r[1].endswith("README.md")]  # only the named file is fetched
    await node.deploy("local", demo_model_dir)
    status, from_gguf = await node.complete("gguf", **GREEDY)
    assert status == 200, from_gguf
    assert from_gguf["choices"][0]["text"] == (await node.complete("local", **GREEDY))[1]["choices"][0]["text"]


@pytest.mark.parametrize(("checkpoint", "words"), [
    (f"{REPO}@no-such-branch", ["no-such-branch", "not found"]),
    ("sllmd-test/absent", ["sllmd-test/absent", "not found"]),
    (f"hf://{REPO}/missing.gguf", ["missing.gguf"]),
])
async def test_a_wrong_revision_repo_or_file_is_a_400_and_registers_nothing(
        node: RunningNode, checkpoint: str, words: list[str]) -> None:
    status, body = await post_deploy(node, {"name": "bad", "checkpoint": checkpoint})
    assert status == 400 and body["error"]["code"] == "checkpoint_not_found", body
    assert body["error"]["param"] == "checkpoint"
    assert all(word in body["error"]["message"] for word in words), body
    assert (await get(node, "/admin/models/bad"))[0] == 404
    assert (await get(node, "/admin/models"))[1]["models"] == []
    assert node.node.deployments.store.entries() == []


async def test_an_unreachable_hub_is_a_clear_error(node: RunningNode, hub: HubServer) -> None:
    await hub.close()
    status, body = await post_deploy(node, {"name": "down", "checkpoint": REPO})
    assert status == 503 and body["error"]["code"] == "repository_unreachable", body
    assert "unreachable" in body["error"]["message"] and REPO in body["error"]["message"]
    assert (await get(node, "/admin/models/down"))[0] == 404


def test_the_cli_keeps_hub_ids_and_resolves_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    parser = argparse.ArgumentParser()
    pairs = _parse_deploy(["a=Qwen/Qwen2.5-0.5B-Instruct@main", "b=org/local", "c=hf://gpt2", "d=./models/x.gguf"],
                          parser)
    assert pairs == [("a", "Qwen/Qwen2.5-0.5B-Instruct@main"), ("b", str(tmp_path / "org" / "local")),
                     ("c", "hf://gpt2"), ("d", str(tmp_path / "models" / "x.gguf"))]


# ---------------------------------------------------------------- two daemons: the second copies from the first


@contextlib.contextmanager
def hub_in_a_thread(demo_model_dir: Path) -> Iterator[HubServer]:
    """The Hub stand-in on its own event loop thread, for tests whose daemons are other processes."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = HubServer()
    server.add_repo(REPO, demo_model_dir)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_second_node_copies_a_hub_checkpoint_from_the_first_not_from_the_hub(
        demo_model_dir: Path, tmp_path: Path) -> None:
    with hub_in_a_thread(demo_model_dir) as hub:
        node_env = {node_id: {"HF_HOME": str(tmp_path / f"hf-{node_id}"), "HF_HUB_DISABLE_TELEMETRY": "1"}
                    for node_id in ("n1", "n2")}
        with running_cluster(tmp_path, ["n1", "n2"], env={"SLLMD_STORE_HUB_ENDPOINT": hub.endpoint},
                             node_env=node_env) as (n1, n2):
            reply = n1.post("/admin/models", {"name": "hub", "checkpoint": REPO})
            assert reply.status_code == 201, reply.text
            # Two nodes, two checkpoint copies: n2 is a home too and fetches it as soon as it learns the deployment.
            wait_until(lambda: fetches_by_tier(n2)["peer"] == 1, 20, "n2 copying the checkpoint", [n1, n2])
            assert fetches_by_tier(n1)["repository"] == 1 and fetches_by_tier(n2)["repository"] == 0
            answer = generate_here(n2.url, "hub", [1, 2, 3], 4, temperature=0.0)  # n2 serves it itself
            assert 1 <= len(answer) <= 4
        weight_gets = [r for r in hub.requests if r[0] == "GET" and r[1].endswith("/" + WEIGHTS)]
        assert len(weight_gets) == 1  # n1's download: n2 never asked the Hub for the weights
