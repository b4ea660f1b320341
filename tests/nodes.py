"""An in-process sllmd node on a real loopback port, for tests that need the whole serving path."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sllmd.config import load_config
from sllmd.http.app import build_app
from sllmd.node import Node
from sllmd.serving.relay import Relay
from sllmd.serving.request import TokenRequest
from sllmd.types import SamplingParams
from sllmd.worker.lifecycle import EngineFactory, default_engine_factory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningNode:
    node: Node
    url: str
    http: aiohttp.ClientSession
    runner: web.AppRunner  # `cleanup()` shuts the node down (running_node then leaves it be)

    async def deploy(self, name: str, checkpoint: Path, backend: str = "transformers", **autoscaling: Any) -> dict:
        body = {"name": name, "checkpoint": str(checkpoint), "backend": backend, "autoscaling": autoscaling}
        async with self.http.post(f"{self.url}/admin/models", json=body) as response:
            assert response.status == 201, await response.text()
            return await response.json()

    async def complete(self, model: str, prompt: str = "Hello", **fields: Any) -> tuple[int, dict]:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **fields}
        async with self.http.post(f"{self.url}/v1/completions", json=body) as response:
            return response.status, await response.json()

    async def model_view(self, name: str) -> dict:
        async with self.http.get(f"{self.url}/admin/models/{name}") as response:
            assert response.status == 200
            return await response.json()


# A CPU device budget (devices.cpu_slot_memory_gb) that holds one instance of the demo model and not two: one
# asks ~130 MiB (1.8 MB of weights, 64 MiB of KV budget: 32 requests at its 1024 tokens, 64 MiB of overhead).
# ONE_DEMO_DEVICE: running_node settings for one such device.
ONE_DEMO_INSTANCE_GB = 0.2
ONE_DEMO_DEVICE = {"devices__cpu_slots": 1, "devices__cpu_slot_memory_gb": ONE_DEMO_INSTANCE_GB}


def device_free_bytes(running: RunningNode) -> list[int]:
    """Free memory of each of the node's devices, as its worker accounts it."""
    return list(running.node.worker.devices.free_by_device())


def all_devices_free(running: RunningNode) -> bool:
    pool = running.node.worker.devices
    return all(pool.free_bytes(d) == d.budget_bytes for d in pool.devices)


@asynccontextmanager
async def running_node(data_dir: Path, engine_factory: EngineFactory = default_engine_factory, *,
                       shutdown_timeout_s: float = 1.0, **settings: Any) -> AsyncIterator[RunningNode]:
    """`settings` are "section.key" overrides with dots written as double underscores,
    e.g. `devices__cpu_slots=1`."""
    port = free_port()
    overrides = {"server.data_dir": str(data_dir), "server.port": port, "server.peer_port": free_port()}
    overrides |= {key.replace("__", "."): value for key, value in settings.items()}
    node = Node.open(load_config(None, env={}, overrides=overrides), engine_factory)
    runner = web.AppRunner(build_app(node), handler_cancellation=True, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()  # starts the node
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield RunningNode(node, f"http://127.0.0.1:{port}", http, runner)
    finally:
        if runner.server is not None:  # the test did not shut it down itself
            await runner.cleanup()  # closes the node


def generate_here(url: str, model: str, prompt_ids: list[int], max_tokens: int, **sampling: Any) -> list[int]:
    """Relay a request to the node at `url` over a peer channel, as an entry node would: that node serves it
    itself. The token ids it generated; its error raised as the entry node would see it."""
    request = TokenRequest(model, tuple(prompt_ids), SamplingParams(max_tokens=max_tokens, **sampling))

    async def relayed() -> list[int]:
        relay = Relay("test")
        try:
            async with relay.open(url.removeprefix("http://"), request) as tokens:
                return [token async for token in tokens]
        finally:
            await relay.close()

    return asyncio.run(relayed())
