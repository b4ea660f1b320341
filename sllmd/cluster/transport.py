"""Peer transport: msgpack messages between cluster nodes over ZeroMQ, optionally CurveZMQ.

Topology. Each node binds one ROUTER on its peer port and only receives on it; for every peer it holds
one DEALER, connected to that peer's ROUTER, and only sends on it. The DEALER's routing id is this node's
id, so the ROUTER knows who sent each frame. One direction per socket keeps ordering simple (each ordered
pair of nodes is exactly one TCP connection, so ZeroMQ's per-connection FIFO is the pair's FIFO) and makes
reconnects independent: a restarting peer resets only the connections touching it, and no reply ever has
to find its way back over a connection the other side opened.

Contracts.
- Delivery: none. A message is dropped, and counted, when the peer has no live connection, its queue is
  full, either side blocks it (test hook), or the receiver rejects it. Raft retransmits.
- Ordering: FIFO per sender→receiver pair while the connection stays up. Messages still queued when a
  connection breaks die with it and are never replayed, so a reconnect loses a suffix but never reorders.
  Messages sent before a peer is first reachable are dropped at `send` (False), not delivered later.
- Memory: per peer at most HWM messages on each side plus kernel socket buffers, each message at most
  `max_message_bytes`. A dead or never-started peer costs nothing: IMMEDIATE makes `send` fail at once
  instead of queueing for a connection that does not exist, and ZMTP heartbeats tear down half-open
  connections (peer host gone without a FIN) so they fall back to that case within HEARTBEAT_TIMEOUT_MS.
- Threads: not thread-safe. One event loop owns a transport; call everything from it.
- Wire: one frame, a msgpack map {"type": str, "sender": str, "term": int, "body": any msgpack}.
  Frames from the network are decoded with bounded sizes and validated; nothing is ever unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from sllmd.cluster.curve import CurveKeys, KeyAllowlist, z85_key

HWM = 1000  # messages queued per peer and direction before `send` drops; Raft only needs the newest few
MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # default frame cap; Raft batches and snapshot chunks must fit in it
RECONNECT_IVL_MS = 100  # the first retry comes soon: a restarted peer is back within an election timeout,
RECONNECT_IVL_MAX_MS = 1000  # and backoff caps a dead peer's cost at one connection attempt per second
CONNECT_TIMEOUT_MS = 2000  # black-holed host: retry rather than wait out the kernel's ~2 min SYN timeout
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
MAX_TYPE_LEN = 64
ZAP_DOMAIN = "sllmd"
_WIRE_KEYS = frozenset({"type", "sender", "term", "body"})
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class TransportClosedError(RuntimeError):
    """The transport was closed; `recv` raises it (and `async for` ends) instead of waiting forever."""


@dataclass(frozen=True, slots=True)
class Message:
    type: str  # a StrEnum is fine to send; it arrives as a plain str
    sender: str  # a node id; on receipt it has been checked against the connection's routing id
    term: int
    body: Any = None


@dataclass(slots=True)
class TransportStats:
    sent: int = 0  # accepted into a peer's queue (not necessarily delivered)
    received: int = 0
    dropped_full: int = 0  # queue at HWM, or no live connection to the peer (IMMEDIATE)
    dropped_malformed: int = 0  # frames from the network that failed decoding or validation
    dropped_blocked: int = 0  # test hook: block()
    dropped_unknown_peer: int = 0  # send() to an id not in the peer table
    disconnects: int = 0  # inbound connections lost; an oversize frame ends its connection, so lands here
    rejected_handshakes: int = 0  # CURVE key not listed, wrong server key, or an unkeyed client


@dataclass(slots=True)
class _Peer:
    address: str
    server_key: bytes | None
    socket: zmq.Socket[bytes]


class PeerTransport:
    """One node's end of the peer mesh: `await start()`, `set_peers(...)`, then `send`/`broadcast` and
    `recv` (or `async for`), and `await close()`. Node and peer ids are 1..255 UTF-8 bytes; addresses are
    "host:port" ("[v6addr]:port" for IPv6). bind_port 0 picks a free port, readable as `.port`."""

    def __init__(
        self, node_id: str, bind_host: str, bind_port: int, *, curve: CurveKeys | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        raw_id = node_id.encode()
        if not 0 < len(raw_id) <= 255 or raw_id[0] == 0:  # ZeroMQ reserves NUL-led ids for generated ones
            raise ValueError(f"node id must be 1..255 UTF-8 bytes, not starting with NUL: {node_id!r}")
        self.node_id, self._routing_id = node_id, raw_id
        self._bind_host, self.port = bind_host, bind_port
        self._curve, self._max_bytes = curve, max_message_bytes
        self._peers: dict[str, _Peer] = {}
        self._blocked: set[str] = set()
        self._stats = TransportStats()
        self._context: zmq.asyncio.Context | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._auth: AsyncioAuthenticator | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._is_closed = False

    @property
    def stats(self) -> TransportStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    async def start(self) -> None:
        """Bind the ROUTER. With CURVE, the ZAP authenticator starts first, and ZAP_ENFORCE_DOMAIN makes
        the ROUTER refuse every client should it be missing: libzmq would otherwise admit any key."""
        if self._context is not None:
            raise RuntimeError("PeerTransport already started")
        self._context = zmq.asyncio.Context()
        router = self._router = self._context.socket(zmq.ROUTER)
        options = [
            (zmq.LINGER, 0), (zmq.RCVHWM, HWM), (zmq.ROUTER_HANDOVER, 1),  # a restarted peer takes its id over
            # libzmq drops a connection whose frame header announces more, before allocating the frame.
            (zmq.MAXMSGSIZE, self._max_bytes),
            (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS), (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS),
            (zmq.IPV6, int(":" in self._bind_host)),
        ]
        if self._curve is not None:
            self._auth = AsyncioAuthenticator(self._context)
            self._auth.start()
            self._auth.configure_curve_callback(ZAP_DOMAIN, KeyAllowlist(self._curve.cluster_public_keys))
            options += [
                (zmq.CURVE_SERVER, 1), (zmq.CURVE_SECRETKEY, self._curve.secret_key),
                (zmq.CURVE_PUBLICKEY, self._curve.public_key), (zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode()),
                (zmq.ZAP_ENFORCE_DOMAIN, 1),
            ]
        for option, value in options:
            router.setsockopt(option, value)
        host = f"[{self._bind_host.strip('[]')}]" if ":" in self._bind_host else self._bind_host
        try:
            router.bind(f"tcp://{host}:{self.port or '*'}")
        except zmq.ZMQError:
            await self.close()
            raise
        self.port = int(router.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
        monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED | _HANDSHAKE_FAILED)
        self._monitor_task = asyncio.create_task(self._count_monitor_events(monitor))

    def set_peers(self, peers: Mapping[str, str], public_keys: Mapping[str, bytes | str] | None = None) -> None:
        """Make the peer table exactly `peers` (id → "host:port"), skipping this node's own id. Peers whose
        address and key are unchanged keep their connection. `public_keys`: see `add_peer`."""
        wanted = {pid: address for pid, address in peers.items() if pid != self.node_id}
        for pid in [pid for pid in self._peers if pid not in wanted]:
            self.remove_peer(pid)
        for pid, address in wanted.items():
            self.add_peer(pid, address, public_key=(public_keys or {}).get(pid))

    def add_peer(self, peer_id: str, address: str, *, public_key: bytes | str | None = None) -> None:
        """Connect a DEALER to the peer; ZeroMQ connects in the background and retries with backoff. With
        CURVE, `public_key` is the peer's (listed) server key; omit it when the cluster shares one pair."""
        if self._context is None or self._is_closed:
            raise RuntimeError("PeerTransport is not running")
        host, sep, port = address.rpartition(":")
        if not (sep and host and port.isdigit()):
            raise ValueError(f"peer {peer_id}: address must be host:port, got {address!r}")
        server_key = self._server_key(peer_id, public_key)
        old = self._peers.get(peer_id)
        if old is not None and (old.address, old.server_key) == (address, server_key):
            return
        self.remove_peer(peer_id)
        sock: zmq.Socket[bytes] = zmq.Socket(self._context, zmq.DEALER)  # a plain socket: send() is sync
        options = [
            (zmq.ROUTING_ID, self._routing_id), (zmq.LINGER, 0), (zmq.SNDHWM, HWM), (zmq.IMMEDIATE, 1),
            (zmq.RECONNECT_IVL, RECONNECT_IVL_MS), (zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS),
            (zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS), (zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS),
            (zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS), (zmq.IPV6, int(host.startswith("["))),
        ]
        if self._curve is not None and server_key is not None:
            options += [
                (zmq.CURVE_SERVERKEY, server_key), (zmq.CURVE_PUBLICKEY, self._curve.public_key),
                (zmq.CURVE_SECRETKEY, self._curve.secret_key),
            ]
        for option, value in options:
            sock.setsockopt(option, value)
        sock.connect(f"tcp://{address}")
        self._peers[peer_id] = _Peer(address, server_key, sock)

    def remove_peer(self, peer_id: str) -> None:
        """Disconnect from the peer, discarding what is queued for it. Unknown ids are ignored."""
        peer = self._peers.pop(peer_id, None)
        if peer is not None:
            peer.socket.close(linger=0)

    def send(self, peer_id: str, message: Message) -> bool:
        """Queue `message` for `peer_id` without blocking; True if queued. A full queue, a dead or unknown
        peer, or a block drops it (counted) and returns False. Raises ValueError only for a programming
        error: `sender` not this node, a bad type or term, or more than max_message_bytes once encoded
        (TypeError for a body msgpack cannot encode)."""
        return self._send_frame(peer_id, self._encode(message))

    def broadcast(self, message: Message) -> int:
        """`send` to every peer, encoding once; returns how many peers queued it."""
        frame = self._encode(message)
        return sum(self._send_frame(pid, frame) for pid in list(self._peers))

    async def recv(self) -> Message:
        """The next valid message from any peer; invalid frames are counted and skipped. Raises
        TransportClosedError once the transport is closed, also in a recv already waiting."""
        if self._router is None:
            raise RuntimeError("PeerTransport is not started")
        while True:
            if self._is_closed:
                raise TransportClosedError(self.node_id)
            try:
                frames = await self._router.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                # close() cancels pyzmq's pending future: tell that apart from our caller being cancelled.
                task = asyncio.current_task()
                if self._is_closed and not (task is not None and task.cancelling()):
                    raise TransportClosedError(self.node_id) from None
                raise
            message = self._decode(frames)
            if message is None:
                self._stats.dropped_malformed += 1
            elif message.sender in self._blocked:
                self._stats.dropped_blocked += 1
            else:
                self._stats.received += 1
                return message

    async def __aiter__(self) -> AsyncIterator[Message]:
        with contextlib.suppress(TransportClosedError):
            while True:
                yield await self.recv()

    async def close(self) -> None:
        """Close every socket without lingering; whatever is queued is discarded. Idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        for pid in list(self._peers):
            self.remove_peer(pid)
        if self._monitor_task is not None:
            # Stop the monitor while its PAIR socket is still open: libzmq's stop event (and any event)
            # sent to a closed PAIR blocks the caller forever (zeromq/libzmq#3575, pyzmq#1020).
            self._router.disable_monitor()  # type: ignore[union-attr]
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
        if self._auth is not None:
            self._auth.stop()
        if self._context is not None:
            self._context.destroy(linger=0)

    # Fault injection for tests: partitions without root or network namespaces. Not for production use.
    def block(self, peer_id: str) -> None:
        """TEST HOOK: drop every message to `peer_id` and from it, at this node, until unblocked."""
        self._blocked.add(peer_id)

    def unblock(self, peer_id: str) -> None:
        """TEST HOOK: undo `block(peer_id)`."""
        self._blocked.discard(peer_id)

    def unblock_all(self) -> None:
        """TEST HOOK: undo every `block`."""
        self._blocked.clear()

    def _server_key(self, peer_id: str, public_key: bytes | str | None) -> bytes | None:
        if self._curve is None:
            return None
        listed = self._curve.cluster_public_keys
        if public_key is None and len(set(listed)) != 1:
            raise ValueError(f"peer {peer_id}: public_key required (the cluster has several key pairs)")
        key = listed[0] if public_key is None else z85_key(public_key)
        if key not in listed:
            raise ValueError(f"peer {peer_id}: public_key is not in cluster_public_keys")
        return key

    def _send_frame(self, peer_id: str, frame: bytes) -> bool:
        peer = self._peers.get(peer_id)
        if peer_id in self._blocked:
            self._stats.dropped_blocked += 1
            return False
        if peer is None:
            self._stats.dropped_unknown_peer += 1
            return False
        try:
            peer.socket.send(frame, zmq.NOBLOCK)
        except zmq.Again:  # queue at SNDHWM, or (IMMEDIATE) no completed connection to queue on
            self._stats.dropped_full += 1
            return False
        self._stats.sent += 1
        return True

    def _encode(self, message: Message) -> bytes:
        if message.sender != self.node_id:
            raise ValueError(f"message.sender must be this node ({self.node_id!r}), got {message.sender!r}")
        if not _is_valid_header(message.type, message.term):
            raise ValueError(f"invalid message type or term: {message.type!r}, {message.term!r}")
        wire = {"type": str(message.type), "sender": self.node_id, "term": message.term, "body": message.body}
        frame = msgpack.packb(wire, use_bin_type=True)
        if len(frame) > self._max_bytes:  # the receiver would drop the whole connection over it
            raise ValueError(f"{message.type} message of {len(frame)} bytes exceeds {self._max_bytes}")
        return frame

    def _decode(self, frames: list[bytes]) -> Message | None:
        """Validate one ROUTER delivery, [routing id, payload]; None when it must be dropped."""
        if len(frames) != 2 or len(frames[1]) > self._max_bytes:
            return None
        routing_id, payload = frames
        # No container can hold more items than the frame has bytes: a 5-byte frame cannot make the decoder
        # preallocate a 4-billion-item array. Ext types (timestamps included) are not part of the protocol.
        limit = len(payload)
        try:
            obj = msgpack.unpackb(
                payload, raw=False, strict_map_key=True, max_str_len=limit, max_bin_len=limit,
                max_array_len=limit, max_map_len=limit, max_ext_len=0,
            )
        except Exception:  # hostile bytes: whatever the decoder raises (Value, Type, Unpack, Stack…) is a drop
            return None
        if not isinstance(obj, dict) or obj.keys() != _WIRE_KEYS:
            return None
        sender = obj["sender"]
        if not isinstance(sender, str) or sender.encode() != routing_id:
            return None
        if not _is_valid_header(obj["type"], obj["term"]):
            return None
        return Message(type=obj["type"], sender=sender, term=obj["term"], body=obj["body"])

    async def _count_monitor_events(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event & zmq.EVENT_DISCONNECTED:
                    self._stats.disconnects += 1
                elif event & _HANDSHAKE_FAILED:
                    self._stats.rejected_handshakes += 1
        finally:
            monitor.close(linger=0)


def _is_valid_header(type_: Any, term: Any) -> bool:
    return (
        isinstance(type_, str) and 0 < len(type_) <= MAX_TYPE_LEN
        and isinstance(term, int) and not isinstance(term, bool) and 0 <= term < 2**63
    )
