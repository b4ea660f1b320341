"""Request routing across three real `sllmd` processes: a model with `max_instances: 1` runs on one node
and the other nodes relay to it (same answers, streaming and not); `kill -9` of the serving node in the
middle of a relayed stream ends that stream with an error event, and the next request goes elsewhere.
Last, in process: the relay maps a peer's error statuses and broken streams to domain errors."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from sllmd.errors import Overloaded
from sllmd.scheduler.estimate import Calibration
from sllmd.scheduler.placement import NodeState, plan_checkpoint_homes
from sllmd.serving.relay import (
    CANCEL,
    CHANNEL_PATH,
    OPEN,
    Relay,
    RelayFailed,
    end_frame,
    error_frame,
    parse_frame,
    tokens_frame,
)
from sllmd.serving.request import TokenRequest
from sllmd.types import SamplingParams
from tests.nodes import generate_here, running_node
from tests.test_cluster import Member, fetches_by_tier, free_ports, running_cluster, wait_until

ONE_INSTANCE = {"max_instances": 1, "keep_alive_s": 300}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[list[Member]]:
    # One checkpoint home besides the deploying node.
    with running_cluster(tmp_path_factory.mktemp("routing"), ["n1", "n2", "n3"],
                         env={"SLLMD_CLUSTER_CHECKPOINT_COPIES": "1"}) as members:
        for name, backend in (("tiny", "dummy"), ("demo", "transformers")):
            body = {"name": name, "checkpoint": str(demo_model_dir), "backend": backend, "autoscaling": ONE_INSTANCE}
            reply = members[1].post("/admin/models", body)
            assert reply.status_code == 201, reply.text
        wait_until(lambda: all({"tiny", "demo"} <= m.models() for m in members), 5, "models everywhere", members)
        yield members


def instances(members: list[Member], model: str) -> dict[str, int]:
    """Node id -> number of instances of `model` it runs (each node reports its own)."""
    counts = {m.node_id: len(m.get(f"/admin/models/{model}")["instances"]) for m in members}
    return {node_id: count for node_id, count in counts.items() if count}


def serving_node(members: list[Member], model: str) -> Member:
    counts = instances(members, model)
    assert list(counts.values()) == [1], counts  # exactly one instance cluster-wide
    return next(m for m in members if m.node_id in counts)


def wait_known_everywhere(members: list[Member], model: str, serving: Member) -> None:
    """Until every node's view shows `serving` holding an instance of `model` (its status messages, which are
    what routing reads of other nodes)."""
    def holds(observer: Member) -> bool:
        node = next(n for n in observer.get("/admin/cluster")["nodes"] if n["id"] == serving.node_id)
        return any(instance["model"] == model for instance in node["instances"])

    wait_until(lambda: all(holds(m) for m in members), 5, f"{model} instance known everywhere", members)


def complete(member: Member, model: str, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 12, "temperature": 0, "seed": 7, **fields}
    reply = member.post("/v1/completions", body, timeout_s=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def stream_events(member: Member, path: str, body: dict[str, Any]) -> list[Any]:
    """Every SSE data payload, decoded ("[DONE]" as is)."""
    events: list[Any] = []
    with httpx.stream("POST", f"{member.url}{path}", json={**body, "stream": True}, timeout=60) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_other_nodes_relay_to_the_one_instance_with_identical_answers(cluster):
    first = complete(cluster[0], "tiny")
    serving = serving_node(cluster, "tiny")
    wait_known_everywhere(cluster, "tiny", serving)
    for member in cluster:
        again = complete(member, "tiny")
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        assert again["usage"] == first["usage"] == {"prompt_tokens": first["usage"]["prompt_tokens"],
                                                    "completion_tokens": 12,
                                                    "total_tokens": first["usage"]["prompt_tokens"] + 12}
        # Streaming, chat flavoured, through the same node: same text, usage, then [DONE].
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "temperature": 0,
                "stream_options": {"include_usage": True}}
        events = stream_events(member, "/v1/chat/completions", chat)
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 6
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
        whole = member.post("/v1/chat/completions", {**chat, "stream_options": None}).json()
        assert text == whole["choices"][0]["message"]["content"]
    assert serving_node(cluster, "tiny") is serving  # still the only instance


def metric(member: Member, name: str, labels: str) -> float:
    """The value of sample `name{labels}` in the node's /metrics (0 when absent)."""
    text = httpx.get(member.url + "/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_relayed_request_is_measured_once_on_its_entry_node(cluster):
    complete(cluster[0], "tiny")
    serving = serving_node(cluster, "tiny")
    wait_known_everywhere(cluster, "tiny", serving)
    entry = next(m for m in cluster if m is not serving)
    counted = ("sllmd_ttft_seconds_count", "sllmd_request_latency_seconds_count")
    before = {(m.node_id, name): metric(m, name, 'model="tiny"') for m in (entry, serving) for name in counted}
    out_before = {m.node_id: metric(m, "sllmd_tokens_total", 'direction="out",model="tiny"') for m in (entry, serving)}
    assert complete(entry, "tiny")["usage"]["completion_tokens"] == 12  # relayed to `serving`
    for name in counted:  # arrival to first token, on the clock of the node the client talks to
        assert metric(entry, name, 'model="tiny"') == before[(entry.node_id, name)] + 1
        assert metric(serving, name, 'model="tiny"') == before[(serving.node_id, name)]
    assert metric(entry, "sllmd_tokens_total", 'direction="out",model="tiny"') == out_before[entry.node_id] + 12
    assert metric(serving, "sllmd_tokens_total", 'direction="out",model="tiny"') == out_before[serving.node_id]


def test_every_node_sees_the_serving_nodes_soft_state(cluster):
    complete(cluster[0], "tiny")
    serving = serving_node(cluster, "tiny")

    def seen_by_all() -> bool:
        for member in cluster:
            (view,) = [n for n in member.get("/admin/cluster")["nodes"] if n["id"] == serving.node_id]
            if "tiny" not in view["queues"]:
                return False
        return True

    wait_until(seen_by_all, 5.0, "the serving node's queues in every node's cluster view", cluster)


def test_every_node_times_a_copy_of_a_peers_probe_checkpoint_at_start(cluster):
    pattern = r"probed peer fetch bandwidth peer=(n\d) bytes=(\d+) peer_gbps=([\d.]+)"
    probes = wait_until(lambda: all(re.search(pattern, m.log()) for m in cluster)
                        and [re.search(pattern, m.log()) for m in cluster], 20, "every node's link probe", cluster)
    for member, probe in zip(cluster, probes, strict=True):
        assert probe.group(1) != member.node_id and int(probe.group(2)) >= 16 << 20  # conftest: 16 MiB probes
        me = next(n for n in member.get("/admin/cluster")["nodes"] if n["id"] == member.node_id)
        assert me["calibration"]["fetch_gbps"]["peer"] != 1.0  # no longer cluster.peer_link_gbps


def test_errors_are_answered_by_the_entry_node(cluster):
    reply = cluster[2].post("/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 5000})
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "context_length_exceeded", reply.text
    reply = cluster[2].post("/v1/completions", {"model": "nope", "prompt": "Hi"})
    assert reply.status_code == 404, reply.text


def test_transformers_model_served_once_and_relayed(cluster):
    first = complete(cluster[1], "demo", max_tokens=8)
    serving = serving_node(cluster, "demo")
    wait_known_everywhere(cluster, "demo", serving)
    for member in cluster:
        assert complete(member, "demo", max_tokens=8)["choices"][0]["text"] == first["choices"][0]["text"]
    assert serving_node(cluster, "demo") is serving


def test_simultaneous_cold_starts_on_every_node_start_one_instance_where_the_leader_places_it(cluster, demo_model_dir):
    body = {"name": "burst", "checkpoint": str(demo_model_dir), "backend": "dummy", "autoscaling": ONE_INSTANCE}
    assert cluster[0].post("/admin/models", body).status_code == 201
    wait_until(lambda: all("burst" in m.models() for m in cluster), 5, "burst everywhere", cluster)

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as http:
            replies = await asyncio.gather(*(
                http.post(f"{member.url}/v1/completions", json={"model": "burst", "prompt": "Hi", "max_tokens": 4})
                for member in cluster for _ in range(3)))
        return [r.status_code for r in replies]

    assert asyncio.run(burst()) == [200] * 9
    # Without the leader's reservations each entry node would have started its own (max_instances is 1).
    assert list(instances(cluster, "burst").values()) == [1]
    leader = next(m for m in cluster if m.get("/admin/cluster")["leader"] == m.node_id)
    placed = re.findall(r"placed a new instance model=burst node=(\S+)", leader.log())
    assert placed == [serving_node(cluster, "burst").node_id]


def holders(cluster: list[Member], prefix: str) -> dict[str, str]:
    """Node id -> the store id of a checkpoint whose id starts with `prefix`, for the nodes holding one."""
    found = {}
    for node in cluster[0].get("/admin/cluster")["nodes"]:
        cid = next((c for c in node["ssd_cached"] if c.startswith(prefix)), None)
        if cid is not None:
            found[node["id"]] = cid
    return found


def test_a_deployed_checkpoint_is_fetched_by_its_home_and_a_cold_start_elsewhere_fetches_it_from_a_peer(
        cluster, demo_model_dir, tmp_path):
    source = tmp_path / "peered"
    shutil.copytree(demo_model_dir, source)
    body = {"name": "peered", "checkpoint": str(source), "backend": "transformers", "autoscaling": ONE_INSTANCE}
    reply = cluster[1].post("/admin/models", body)  # the deploying node converts it into its SSD store
    assert reply.status_code == 201, reply.text
    # Every node agrees on the one home (checkpoint_copies = 1), which fetches the checkpoint right away.
    (home,) = plan_checkpoint_homes("peered", 0, [NodeState(m.node_id, True, 0, Calibration.defaults(),
                                                            free_ssd_bytes=1 << 40) for m in cluster], 1)
    expected = {cluster[1].node_id, home}
    wait_until(lambda: set(holders(cluster, "peered-")) == expected, 10, f"checkpoint on {expected}", cluster)
    cid = holders(cluster, "peered-")[cluster[1].node_id]
    other = next(m for m in cluster if m.node_id not in expected)  # 3 nodes, at most 2 holders
    wait_until(lambda: set(holders([other], "peered-")) == expected, 5, "the holders seen by the third node", cluster)
    fetched_before = fetches_by_tier(other)
    shutil.rmtree(source)  # from now on only the holders have the bytes
    served = generate_here(other.url, "peered", [1, 2, 3], 4, temperature=0.0)  # that node serves it itself
    assert 1 <= len(served) <= 4
    fetched = fetches_by_tier(other)
    assert fetched["peer"] == fetched_before["peer"] + 1 and fetched["repository"] == fetched_before["repository"]
    assert httpx.get(cluster[1].url + f"/internal/checkpoints/{cid}/manifest.json").status_code == 200
    missing = httpx.get(cluster[1].url + f"/internal/checkpoints/{cid}/..%2Fstate")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "checkpoint_not_found"
    assert not any("Unhandled exception" in m.log() for m in cluster)  # the ranged file responses ended cleanly


def test_kill_of_the_serving_node_mid_stream_ends_the_relayed_stream_with_an_error(cluster):
    complete(cluster[0], "tiny")  # so that it runs somewhere (it may already)
    serving = serving_node(cluster, "tiny")
    wait_known_everywhere(cluster, "tiny", serving)
    entry, other = [m for m in cluster if m is not serving]
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 1000, "stream": True}
    events: list[Any] = []
    with httpx.stream("POST", f"{entry.url}/v1/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                break
        serving.kill()
        for line in lines:
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    print(f"relayed stream broke off after {len(events) - 2} chunks")
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "relay_failed", events[-2]
    assert len(events) < 1000  # it broke off: no finish, no usage
    assert not any(e["choices"][0]["finish_reason"] for e in events[:-2])

    # The next requests succeed on survivors: through `other` (which still counts the dead node alive, so
    # its relay is refused and placed again) and through `entry` (which marked it suspect).
    # With the leader dead, a node routes by the others' status messages alone: let the new instance reach
    # them before the second request (within one status period, two entry nodes may each start one).
    survivors = [entry, other]
    assert complete(other, "tiny")["usage"]["completion_tokens"] == 12
    wait_known_everywhere(survivors, "tiny", serving_node(survivors, "tiny"))
    assert complete(entry, "tiny")["usage"]["completion_tokens"] == 12
    assert sum(instances(survivors, "tiny").values()) == 1


# ------------------------------------------------------------- the relay against a misbehaving peer


def token_request() -> TokenRequest:
    params = SamplingParams(max_tokens=4, temperature=0.0, seed=3, stop_token_ids=frozenset({9}))
    return TokenRequest("m", (1, 2), params)


PeerBehaviour = Callable[[web.Request, web.WebSocketResponse, int, bytes], Awaitable[None]]


@asynccontextmanager
async def peer(on_open: PeerBehaviour, seen: list[tuple[int, int, bytes]] | None = None) -> AsyncIterator[str]:
    """A node's channel endpoint that answers each OPEN with `on_open(request, ws, stream id, payload)` (a task)
    and records every frame it gets in `seen`."""
    tasks: list[asyncio.Task[None]] = []

    async def channel(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            stream_id, kind, payload = parse_frame(message.data)
            if seen is not None:
                seen.append((stream_id, kind, payload))
            if kind == OPEN:
                tasks.append(asyncio.create_task(on_open(request, ws, stream_id, payload)))
        return ws

    app = web.Application()
    app.router.add_get(CHANNEL_PATH, channel)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_ports(1)[0]
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for task in tasks:
            task.cancel()
        await runner.cleanup()


async def drain(relay: Relay, address: str, request: TokenRequest | None = None) -> list[int]:
    async with relay.open(address, request or token_request()) as tokens:
        return [token async for token in tokens]


async def test_relay_maps_peer_errors_and_broken_streams():
    seen: list[tuple[int, int, bytes]] = []

    async def overloaded(request: web.Request, ws: web.WebSocketResponse, stream_id: int, payload: bytes) -> None:
        await ws.send_bytes(error_frame(stream_id, Overloaded("busy", retry_after_s=7, code="cold_start_timeout")))

    async def broken(request: web.Request, ws: web.WebSocketResponse, stream_id: int, payload: bytes) -> None:
        await ws.send_bytes(tokens_frame(stream_id, (5, 17)))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()  # the peer dies: no END, no close frame

    relay = Relay("entry")
    try:
        async with peer(overloaded, seen) as address:
            with pytest.raises(Overloaded) as raised:
                await drain(relay, address)
        error = raised.value  # the serving node's error as it was: class, body fields, retry hint
        assert (error.status, error.retry_after_s, error.to_body()) == (503, 7, {"error": {
            "message": "busy", "type": "overloaded_error", "param": None, "code": "cold_start_timeout"}})
        [(_, kind, payload)] = seen
        assert kind == OPEN and json.loads(payload) == {
            "model": "m", "prompt_ids": [1, 2], "generated": [], "max_tokens": 4, "temperature": 0.0,
            "top_p": 1.0, "seed": 3, "stop_token_ids": [9]}
        assert TokenRequest.from_wire(json.loads(payload)) == token_request()
        async with peer(broken) as address:
            events: list[Any] = []
            with pytest.raises(RelayFailed) as failed:
                async with relay.open(address, token_request()) as stream:
                    async for event in stream:
                        events.append(event)
        assert events == [5, 17] and not failed.value.is_connect
        with pytest.raises(RelayFailed) as refused:
            await drain(relay, address)  # nobody listens there any more
        assert refused.value.is_connect
    finally:
        await relay.close()


async def test_one_channel_carries_concurrent_streams_and_a_stream_left_early_is_cancelled_there():
    seen: list[tuple[int, int, bytes]] = []
    connections: set[Any] = set()

    async def counting(request: web.Request, ws: web.WebSocketResponse, stream_id: int, payload: bytes) -> None:
        connections.add(ws)
        first = json.loads(payload)["prompt_ids"][0]
        for i in range(4):  # the two streams' frames interleave on the one connection
            await ws.send_bytes(tokens_frame(stream_id, (first + i,)))
            await asyncio.sleep(0.01)
        await ws.send_bytes(end_frame(stream_id, 2, 4))

    async def one(relay: Relay, address: str, first: int, num_read: int) -> list[int]:
        request = TokenRequest("m", (first, 2), token_request().params)
        got: list[int] = []
        async with relay.open(address, request) as tokens:
            async for token in tokens:
                got.append(token)
                if len(got) == num_read:
                    break
        return got

    relay = Relay("entry")
    try:
        async with peer(counting, seen) as address:
            whole, cut = await asyncio.gather(one(relay, address, 100, 10), one(relay, address, 200, 1))
            await asyncio.sleep(0.1)
        assert (whole, cut) == ([100, 101, 102, 103], [200])
        assert len(connections) == 1
        opened = {json.loads(payload)["prompt_ids"][0]: stream_id for stream_id, kind, payload in seen if kind == OPEN}
        assert [(stream_id, kind) for stream_id, kind, _ in seen if kind != OPEN] == [(opened[200], CANCEL)]
    finally:
        await relay.close()


async def test_a_serving_node_shutting_down_finishes_its_relayed_streams_and_starts_no_more(tmp_path, demo_model_dir):
    relay = Relay("entry")
    request = TokenRequest("demo", (1, 5, 9), SamplingParams(max_tokens=48, temperature=0.0))
    try:
        async with running_node(tmp_path / "node", devices__cpu_slots=1, store__probe_mb=0,
                                shutdown_timeout_s=20) as node:
            await node.deploy("demo", demo_model_dir, min_instances=1)
            address = node.url.removeprefix("http://")
            reference = await drain(relay, address, request)
            async with relay.open(address, request) as tokens:
                got = [await anext(tokens)]
                began = time.monotonic()
                shutdown = asyncio.create_task(node.runner.cleanup())
                await asyncio.sleep(0.05)  # the node drains its channels
                with pytest.raises(RelayFailed) as refused:
                    await drain(relay, address)
                assert refused.value.is_connect  # never started there: safe to place elsewhere
                got += [token async for token in tokens]
            await shutdown
            assert got == reference  # the running stream ran to its end
            assert time.monotonic() - began < 10  # the channel closed once idle, not at the shutdown timeout
    finally:
        await relay.close()
