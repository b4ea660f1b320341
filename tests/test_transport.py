"""PeerTransport over real sockets on 127.0.0.1: ordering, late and restarted peers, bounded queues,
hostile frames, the block() partition hook, and CurveZMQ admission."""

from __future__ import annotations

import asyncio
import os
import pathlib
import pickle
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import msgpack
import pytest
import zmq

from sllmd.cluster.curve import CurveKeys, generate_curve_keypair
from sllmd.cluster.transport import HWM, Message, PeerTransport, TransportClosedError

Make = Callable[..., Awaitable[PeerTransport]]
HOST = "127.0.0.1"


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Factory for started transports on 127.0.0.1 (a free port unless given); all closed at teardown."""
    made: list[PeerTransport] = []

    async def factory(node_id: str, port: int = 0, **kwargs: object) -> PeerTransport:
        transport = PeerTransport(node_id, HOST, port, **kwargs)  # type: ignore[arg-type]
        await transport.start()
        made.append(transport)
        return transport

    yield factory
    for transport in made:
        await transport.close()


@pytest.fixture
def raw_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def addr(t: PeerTransport) -> str:
    return f"{HOST}:{t.port}"


def mesh(*transports: PeerTransport, keys: dict[str, bytes] | None = None) -> None:
    peers = {t.node_id: addr(t) for t in transports}
    for t in transports:
        t.set_peers(peers, keys)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def link(src: PeerTransport, dst: PeerTransport, peer_id: str | None = None, timeout: float = 3.0) -> None:
    """Probe src→dst until a probe arrives: IMMEDIATE drops sends until the connection is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        src.send(peer_id or dst.node_id, Message("probe", src.node_id, 0))
        try:
            while (await asyncio.wait_for(dst.recv(), 0.05)).sender != src.node_id:
                pass
            return
        except TimeoutError:
            pass
    raise AssertionError(f"{src.node_id} → {dst.node_id}: no connection within {timeout}s")


async def collect(t: PeerTransport, kind: str, count: int, timeout: float = 3.0) -> list[Message]:
    """The next `count` messages of type `kind` (probes and other types are skipped)."""
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            message = await t.recv()
            if message.type == kind:
                got.append(message)
    return got


async def expect_nothing(t: PeerTransport, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(t.recv(), seconds)


async def test_three_nodes_exchange_both_ways_in_order(make: Make) -> None:
    nodes = [await make(name) for name in "abc"]
    mesh(*nodes)
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                await link(src, dst)
    num_messages = 300
    for seq in range(num_messages):  # interleaved, so every ROUTER fair-queues two live senders
        for src in nodes:
            for dst in nodes:
                if src is not dst:
                    assert src.send(dst.node_id, Message("data", src.node_id, 7, {"seq": seq, "to": dst.node_id}))
    for dst in nodes:
        got = await collect(dst, "data", 2 * num_messages)
        for src in nodes:
            if src is not dst:
                seqs = [m.body["seq"] for m in got if m.sender == src.node_id]
                assert seqs == list(range(num_messages)), f"{src.node_id}→{dst.node_id} lost or reordered"
        assert {m.body["to"] for m in got} == {dst.node_id} and {m.term for m in got} == {7}


async def test_messages_to_a_peer_before_it_binds_are_dropped_at_send(make: Make) -> None:
    """Designed behaviour: with IMMEDIATE nothing is queued for a peer that was never connected, so
    sends before it binds return False and are counted; they are never delivered later."""
    port = free_port()
    a = await make("a")
    a.add_peer("b", f"{HOST}:{port}")
    assert not any(a.send("b", Message("early", "a", 1, i)) for i in range(10))
    assert a.stats.dropped_full == 10 and a.stats.sent == 0
    await asyncio.sleep(0.3)  # let a's DEALER back off a few times
    b = await make("b", port)
    await link(a, b)
    assert a.send("b", Message("late", "a", 1, "x"))
    while (message := await asyncio.wait_for(b.recv(), 2)).type != "late":
        assert message.type == "probe"


async def test_restarted_peer_on_the_same_port_reconnects(make: Make) -> None:
    a, b = await make("a"), await make("b")
    mesh(a, b)
    await link(a, b)
    await link(b, a)
    port = b.port
    # b stops reading, so a's own queue fills up; that queue must die with the connection, not replay.
    assert sum(a.send("b", Message("stale", "a", 1, b"x" * 10_000)) for _ in range(20_000)) >= HWM
    await b.close()
    async with asyncio.timeout(1):  # IMMEDIATE: once the drop is seen, sends fail at once
        while a.send("b", Message("stale", "a", 1)):
            await asyncio.sleep(0.001)
    b2 = await make("b", port)
    b2.set_peers({"a": addr(a)})
    started = time.monotonic()
    await link(a, b2)
    await link(b2, a)  # a's ROUTER hands the routing id "b" over to the new connection
    assert time.monotonic() - started < 2.5
    assert a.send("b", Message("after", "a", 1))
    while (message := await asyncio.wait_for(b2.recv(), 2)).type != "after":
        assert message.type == "probe"


async def test_dead_peer_stays_bounded_and_send_stays_fast(make: Make) -> None:
    a = await make("a")
    a.add_peer("dead", f"{HOST}:{free_port()}")
    message = Message("append", "a", 3, b"x" * 1024)  # 100 MB in all, were anything queued
    rss_before = rss_bytes()
    started = time.perf_counter()
    accepted = sum(a.send("dead", message) for _ in range(100_000))
    elapsed = time.perf_counter() - started
    assert accepted == 0 and a.stats.dropped_full == 100_000
    assert elapsed < 3.0, f"100k sends to a dead peer took {elapsed:.2f}s"
    assert rss_bytes() - rss_before < 16 * 2**20


async def test_peer_that_never_reads_fills_its_queue_then_drops(make: Make, raw_context: zmq.Context) -> None:
    slow = raw_context.socket(zmq.ROUTER)  # connected but never reads
    slow.setsockopt(zmq.RCVHWM, HWM)
    slow.setsockopt(zmq.LINGER, 0)
    port = slow.bind_to_random_port(f"tcp://{HOST}")
    a = await make("a")
    a.add_peer("slow", f"{HOST}:{port}")
    message = Message("append", "a", 3, b"x" * 10_000)
    async with asyncio.timeout(3):
        while not a.send("slow", message):
            await asyncio.sleep(0.01)
    rss_before, dropped_before = rss_bytes(), a.stats.dropped_full
    accepted = sum(a.send("slow", message) for _ in range(20_000))
    # Both HWMs plus loopback kernel buffers (a few MB), nowhere near the 200 MB offered.
    assert accepted < 10_000 and a.stats.dropped_full - dropped_before == 20_000 - accepted
    assert rss_bytes() - rss_before < 128 * 2**20


class _Payload:
    """Unpickling this creates a file: proof that nothing on the receive path unpickles."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (pathlib.Path.touch, (str(self.path),))


async def test_hostile_frames_are_counted_and_dropped(
    make: Make, raw_context: zmq.Context, tmp_path: pathlib.Path
) -> None:
    a = await make("a", max_message_bytes=64 * 1024)
    evil = raw_context.socket(zmq.DEALER)
    evil.setsockopt(zmq.ROUTING_ID, b"evil")
    evil.setsockopt(zmq.LINGER, 0)
    evil.connect(f"tcp://{addr(a)}")

    def wire(**fields: object) -> bytes:
        return msgpack.packb({"type": "t", "sender": "evil", "term": 1, "body": None, **fields})

    marker = tmp_path / "unpickled"
    bad_frames = [
        b"", b"\xc1", os.urandom(64), b"\xdd\xff\xff\xff\xff",  # empty, reserved byte, noise, 4G-item array
        b"\xa2\xff\xfe",  # str with invalid UTF-8
        pickle.dumps(_Payload(marker)),
        msgpack.packb(["t", "evil", 1, None]),  # not a map
        wire(sender="b"),  # sender differs from the routing id
        wire(term="1"), wire(term=True), wire(term=-1), wire(term=2**64 - 1), wire(type=""), wire(type=1),
        wire(type="x" * 65), wire(extra=1), msgpack.packb({"type": "t", "sender": "evil", "term": 1}),
        wire(body=msgpack.ExtType(5, b"x")), wire(body={1: "int key"}),
    ]
    for frame in bad_frames:
        evil.send(frame)
    evil.send_multipart([wire(), wire()])  # two frames: one malformed delivery
    evil.send(wire(type="ok", body=[1, b"\x00"]))
    message = await asyncio.wait_for(a.recv(), 3)
    assert message == Message("ok", "evil", 1, [1, b"\x00"])
    assert a.stats.dropped_malformed == len(bad_frames) + 1 and a.stats.received == 1
    assert not marker.exists()


async def test_oversize_frame_is_refused_and_the_transport_keeps_working(
    make: Make, raw_context: zmq.Context
) -> None:
    a, b = await make("a", max_message_bytes=64 * 1024), await make("b")
    mesh(a, b)
    with pytest.raises(ValueError, match="exceeds"):
        a.send("b", Message("big", "a", 1, b"x" * 65 * 1024))
    evil = raw_context.socket(zmq.DEALER)
    evil.setsockopt(zmq.ROUTING_ID, b"evil")
    evil.setsockopt(zmq.LINGER, 0)
    evil.connect(f"tcp://{addr(a)}")
    evil.send(msgpack.packb({"type": "big", "sender": "evil", "term": 1, "body": b"x" * 2**20}))
    async with asyncio.timeout(3):  # libzmq drops the connection at the frame header (ZMQ_MAXMSGSIZE)
        while a.stats.disconnects == 0:
            await asyncio.sleep(0.01)
    await link(b, a)
    evil.send(msgpack.packb({"type": "ok", "sender": "evil", "term": 1, "body": None}))  # after reconnecting
    got = await collect(a, "ok", 1)
    assert got[0].sender == "evil" and a.stats.dropped_malformed == 0


async def test_block_drops_both_directions_until_unblocked(make: Make) -> None:
    a, b = await make("a"), await make("b")
    mesh(a, b)
    await link(a, b)
    await link(b, a)
    a.block("b")
    assert not a.send("b", Message("x", "a", 1))
    assert b.send("a", Message("x", "b", 1))  # b cannot tell; a drops it on arrival
    await expect_nothing(a, 0.3)
    await expect_nothing(b, 0.1)
    assert a.stats.dropped_blocked == 2
    a.unblock("b")
    await link(a, b)
    await link(b, a)
    a.block("b")
    a.unblock_all()
    assert a.send("b", Message("x", "a", 1))


async def test_peer_table_unknown_peers_and_iteration_end(make: Make) -> None:
    a = await make("a")
    a.set_peers({"a": addr(a), "b": f"{HOST}:{free_port()}", "c": f"{HOST}:{free_port()}"})
    socket_b = a._peers["b"].socket
    a.set_peers({"a": addr(a), "b": a._peers["b"].address})
    assert set(a._peers) == {"b"} and a._peers["b"].socket is socket_b  # unchanged peer kept its socket
    assert not a.send("c", Message("x", "a", 1)) and a.stats.dropped_unknown_peer == 1
    assert a.broadcast(Message("x", "a", 1)) == 0
    with pytest.raises(ValueError, match="sender"):
        a.send("b", Message("x", "b", 1))
    with pytest.raises(ValueError, match="address"):
        a.add_peer("d", "no-port")

    async def drain() -> list[Message]:
        return [m async for m in a]

    task = asyncio.create_task(drain())
    await asyncio.sleep(0.05)
    await a.close()
    assert await asyncio.wait_for(task, 1) == []
    with pytest.raises(TransportClosedError):
        await a.recv()


async def test_round_trip_latency_on_loopback(make: Make) -> None:
    a, b = await make("a"), await make("b")
    mesh(a, b)
    await link(a, b)
    await link(b, a)
    rtts = []
    for i in range(500):
        started = time.perf_counter()
        a.send("b", Message("ping", "a", 1, i))
        while (ping := await b.recv()).type != "ping":
            pass
        b.send("a", Message("pong", "b", 1, ping.body))
        while (pong := await a.recv()).type != "pong":
            pass
        assert pong.body == i
        rtts.append(time.perf_counter() - started)
    assert statistics.median(rtts) < 0.01  # ~0.15–0.25 ms measured; loose for loaded CI hosts


def _keys(shared: bool) -> dict[str, tuple[bytes, bytes]]:
    if shared:
        pair = generate_curve_keypair()
        return {"a": pair, "b": pair, "c": pair}
    return {name: generate_curve_keypair() for name in "abc"}


@pytest.mark.parametrize("shared", [False, True], ids=["own-pairs", "shared-pair"])
async def test_curve_keyed_nodes_talk(make: Make, shared: bool) -> None:
    pairs = _keys(shared)
    listed = sorted({public for public, _ in pairs.values()})
    nodes = [await make(n, curve=CurveKeys(pairs[n][1], pairs[n][0], listed)) for n in "abc"]
    mesh(*nodes, keys=None if shared else {n: pairs[n][0] for n in pairs})
    for src in nodes:
        for dst in nodes:
            if src is not dst:
                await link(src, dst)
    assert all(n.stats.rejected_handshakes == 0 for n in nodes)


async def test_curve_outsiders_can_neither_send_nor_receive(make: Make) -> None:
    (pa, sa), (pb, sb), (px, sx) = (generate_curve_keypair() for _ in range(3))
    a = await make("a", curve=CurveKeys(sa, pa, [pa, pb]))
    b = await make("b", curve=CurveKeys(sb, pb, [pa, pb]))
    outsider = await make("x", curve=CurveKeys(sx, px, [pa, pb, px]))  # knows the cluster, is not listed
    unkeyed = await make("u")
    mesh(a, b, keys={"a": pa, "b": pb})
    await link(a, b)
    await link(b, a)
    with pytest.raises(ValueError, match="not in cluster_public_keys"):
        a.add_peer("x", addr(outsider), public_key=px)
    outsider.add_peer("a", addr(a), public_key=pa)
    unkeyed.add_peer("a", addr(a))
    # a believes b lives at the intruders' addresses: neither can prove it holds b's secret key.
    a.add_peer("b-at-x", addr(outsider), public_key=pb)
    a.add_peer("b-at-u", addr(unkeyed), public_key=pb)

    async def spam() -> int:
        accepted = 0
        for _ in range(40):
            accepted += outsider.send("a", Message("x", "x", 9)) + unkeyed.send("a", Message("x", "u", 9))
            accepted += a.send("b-at-x", Message("x", "a", 9)) + a.send("b-at-u", Message("x", "a", 9))
            await asyncio.sleep(0.015)
        return accepted

    accepted, *_ = await asyncio.gather(
        spam(), expect_nothing(a, 0.8), expect_nothing(outsider, 0.8), expect_nothing(unkeyed, 0.8)
    )
    assert accepted == 0  # IMMEDIATE: no handshake ever completed, so nothing was even queued
    assert a.stats.rejected_handshakes > 0
    await link(b, a)  # the cluster itself is unaffected
