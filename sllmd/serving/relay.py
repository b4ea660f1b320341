"""The peer channel: a node relays a request to the node that serves it and gets back the token ids
generated there, over one WebSocket per pair of nodes that carries every relayed request between them.

The entry node has already validated and tokenised the request and fixed its sampling, so what crosses
is a `TokenRequest`: ids and sampling parameters, no OpenAI fields. The serving node never parses,
tokenises or renders text: the entry node detokenises and applies stop strings itself
(`sllmd.serving.pipeline`), with the same code as for a local request, so the chat template is applied
once and the entry node always knows exactly which tokens the client has seen: it can resume the request
elsewhere from them (prompt + tokens so far) when the serving node dies.

Why a channel and not an HTTP request per relayed request: the relayed request's first token waits on the
hop, and an HTTP request costs both nodes a request line, headers, a routing and middleware pass and a
response head before any id moves; a frame on an open channel costs its bytes. The channel is opened (and
authenticated, by the same middleware as every route) once per pair of nodes, at `CHANNEL_PATH`.

Frames are binary messages: a 4-byte big-endian stream id (chosen by the entry node, unique on its
channel), a 1-byte kind, then the payload.

    entry -> serving   OPEN    TokenRequest.to_wire() as JSON: start generating
                       CANCEL  (empty) the entry node stopped reading: stop and send nothing more
    serving -> entry   TOKENS  generated ids, in order, as little-endian uint32 (one or more)
                       END     {"prompt_tokens": P, "completion_tokens": N} as JSON: N ids were sent in all
                       ERROR   SllmdError.to_wire() as JSON: the stream failed
                       PROGRESS {"start": StartView.to_wire() or null} as JSON: the request waits for an
                               instance, for that start (null: none is starting); sent when the wait begins,
                               on each phase change and every second while it lasts

A stream is OPEN, then PROGRESS frames while it waits for an instance, then TOKENS frames, then END or ERROR.
The entry node shows PROGRESS to a streaming client (`StartWatch`); each one also proves the serving node alive
through a cold start longer than the read timeout. Errors keep their identity: the serving node's
error is raised on the entry node as the same class with the same fields (`errors.error_from_wire`) —
when entering `Relay.open` if no id came before it, else while iterating.

Failure: a channel's connection breaking fails every stream open on it at once, as `RelayFailed` (502),
and cancels them on the serving node; so does a stream with no frame within the read timeout. A serving
node that shuts down stops starting streams, lets the running ones finish and then closes its channels
with a close frame: it closes a channel only when none of its streams runs there, so a stream still
unanswered at a close frame never started and the entry node may place it elsewhere (`is_connect`).

Not thread-safe: one `Relay` per node, used from its event loop.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing, asynccontextmanager, suppress
from typing import Any

import aiohttp

from sllmd.errors import EngineFailed, SllmdError, error_from_wire
from sllmd.serving.request import TokenRequest
from sllmd.worker.start_progress import StartView, StartWatch

CHANNEL_PATH = "/internal/channel"
CONNECT_TIMEOUT_S = 2.0
READ_SLACK_S = 30.0  # beyond the longest a serving node waits for a cold start, before a silent peer counts as dead
MAX_FRAME_BYTES = 64 << 20  # an OPEN frame carries a whole prompt's ids

OPEN, CANCEL, TOKENS, END, ERROR, PROGRESS = 1, 2, 3, 4, 5, 6
_HEADER = struct.Struct(">IB")
_NEVER_STARTED = -1  # queued to a stream unanswered when its channel closed cleanly
_BROKEN = -2  # queued to every stream when its channel broke


class RelayFailed(SllmdError):
    """The serving node could not be reached, or its answer broke off; a retry goes elsewhere."""

    status = 502
    error_type = "server_error"

    def __init__(self, message: str, *, is_connect: bool = False) -> None:
        super().__init__(message, code="relay_failed")
        self.is_connect = is_connect  # the request never started on the serving node: safe to place again


def frame(stream_id: int, kind: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(stream_id, kind) + payload


def parse_frame(data: bytes) -> tuple[int, int, bytes]:
    """(stream id, kind, payload) of a frame; ValueError if it is too short to have a header."""
    if len(data) < _HEADER.size:
        raise ValueError(f"frame of {len(data)} bytes")
    stream_id, kind = _HEADER.unpack_from(data)
    return stream_id, kind, data[_HEADER.size:]


def tokens_frame(stream_id: int, token_ids: Sequence[int]) -> bytes:
    return frame(stream_id, TOKENS, struct.pack(f"<{len(token_ids)}I", *token_ids))


def end_frame(stream_id: int, num_prompt_tokens: int, num_generated: int) -> bytes:
    usage = {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_generated}
    return frame(stream_id, END, json.dumps(usage, separators=(",", ":")).encode())


def error_frame(stream_id: int, error: SllmdError) -> bytes:
    return frame(stream_id, ERROR, json.dumps(error.to_wire(), separators=(",", ":")).encode())


def progress_frame(stream_id: int, start: StartView | None) -> bytes:
    wire = {"start": None if start is None else start.to_wire()}
    return frame(stream_id, PROGRESS, json.dumps(wire, separators=(",", ":")).encode())


class _Channel:
    """The entry side of one open channel: a reader task hands each frame to its stream's queue."""

    def __init__(self, address: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.address = address
        self.ws = ws
        self.streams: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}
        self.stream_ids = itertools.count(1)
        self.is_open = True
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        end = _BROKEN
        try:
            while True:
                message = await self.ws.receive()
                if message.type is aiohttp.WSMsgType.BINARY:
                    stream_id, kind, payload = parse_frame(message.data)
                    queue = self.streams.get(stream_id)
                    if queue is not None:  # else one the entry stopped reading
                        queue.put_nowait((kind, payload))
                    continue
                if message.type is aiohttp.WSMsgType.CLOSE:
                    end = _NEVER_STARTED
                break
        except ValueError:
            pass  # a malformed frame: the channel is broken
        finally:
            self.is_open = False
            for queue in self.streams.values():
                queue.put_nowait((end, b""))
            if not self.ws.closed:
                await self.ws.close()

    async def close(self) -> None:
        await self.ws.close()
        await self.reader


class _Stream:
    """One relayed request on a channel, from the entry side."""

    def __init__(self, channel: _Channel, read_timeout_s: float, watch: StartWatch | None) -> None:
        self.channel = channel
        self.read_timeout_s = read_timeout_s
        self.watch = watch
        self.start: StartView | None = None  # what the last PROGRESS frame said
        self.stream_id = next(channel.stream_ids)
        self.queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.is_ended = False  # END or ERROR came: the serving node sends nothing more
        channel.streams[self.stream_id] = self.queue

    async def next(self) -> tuple[int, bytes]:
        """The next frame's (kind, payload), PROGRESS frames aside (they go to the watch); RelayFailed when the
        channel broke, nothing came in time or a PROGRESS frame was malformed."""
        kind, payload = await self._receive()
        while kind == PROGRESS:
            self._progressed(payload)
            kind, payload = await self._receive()
        return kind, payload

    def _progressed(self, payload: bytes) -> None:
        try:
            start = json.loads(payload)["start"]
            self.start = None if start is None else StartView.from_wire(start)
        except (ValueError, KeyError, TypeError) as exc:
            raise RelayFailed(f"node at {self.channel.address} sent a malformed frame: {exc!r}") from None
        if self.watch is not None:
            self.watch.waiting(lambda: self.start)

    async def _receive(self) -> tuple[int, bytes]:
        if self.queue.empty():
            try:
                async with asyncio.timeout(self.read_timeout_s):
                    kind, payload = await self.queue.get()
            except TimeoutError:
                raise RelayFailed(f"node at {self.channel.address} sent nothing for {self.read_timeout_s:g} s"
                                  ) from None
        else:
            kind, payload = self.queue.get_nowait()
        if kind == _BROKEN:
            raise RelayFailed(f"node at {self.channel.address} broke off the stream (its channel closed)")
        self.is_ended = kind in (END, ERROR)
        return kind, payload

    async def token_ids(self, kind: int, payload: bytes) -> AsyncIterator[int]:
        """The ids of the frames from (`kind`, `payload`) on, up to END; the serving node's error for ERROR."""
        address = self.channel.address
        num_received = 0
        try:
            while True:
                if kind == TOKENS:
                    if len(payload) % 4:
                        raise ValueError(f"{len(payload)} bytes of token ids")
                    for token in struct.unpack(f"<{len(payload) // 4}I", payload):
                        num_received += 1
                        yield token
                elif kind == END:
                    num_counted = json.loads(payload)["completion_tokens"]
                    if num_counted != num_received:
                        raise ValueError(f"{num_counted} tokens counted, {num_received} sent")
                    return
                elif kind == ERROR:
                    raise _error(payload, address)
                elif kind == _NEVER_STARTED:
                    raise RelayFailed(f"node at {address} closed its channel mid-stream")
                else:
                    raise ValueError(f"frame kind {kind}")
                kind, payload = await self.next()
        except (ValueError, KeyError, TypeError) as exc:
            raise RelayFailed(f"node at {address} sent a malformed frame: {exc!r}") from None

    async def close(self) -> None:
        """Forget the stream; cancel it on the serving node unless it ended."""
        del self.channel.streams[self.stream_id]
        if not self.is_ended and self.channel.is_open:
            with suppress(ConnectionError, RuntimeError):
                await self.channel.ws.send_bytes(frame(self.stream_id, CANCEL))


class Relay:
    """Owns the node's one HTTP client session (made on first use) and its channels to the other nodes
    (opened on first use, reopened after they break); `close` closes both."""

    def __init__(self, node_id: str, *, api_key: str | None = None, read_timeout_s: float = 90.0) -> None:
        self.node_id = node_id
        self.api_key = api_key
        self.read_timeout_s = read_timeout_s
        self.timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._channels: dict[str, _Channel] = {}
        self._connecting: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Nodes set no cookies; a real jar would be consulted on every request and answer.
            self._session = aiohttp.ClientSession(timeout=self.timeout, auto_decompress=False,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _channel(self, address: str) -> _Channel:
        channel = self._channels.get(address)
        if channel is not None and channel.is_open:
            return channel
        async with self._connecting[address]:  # one connection per peer, however many requests wait for it
            channel = self._channels.get(address)
            if channel is None or not channel.is_open:
                try:
                    ws = await self._client().ws_connect(f"http://{address}{CHANNEL_PATH}", headers=self._auth(),
                                                         max_msg_size=MAX_FRAME_BYTES, autoping=True)
                except aiohttp.WSServerHandshakeError as exc:  # a middleware's refusal: a wrong API key
                    raise EngineFailed(f"serving node answered HTTP {exc.status}: {exc.message}",
                                       code="relay_refused") from None
                except (aiohttp.ClientError, TimeoutError) as exc:
                    raise RelayFailed(f"node at {address} did not answer: {exc!r}", is_connect=True) from None
                channel = self._channels[address] = _Channel(address, ws)
            return channel

    @asynccontextmanager
    async def open(self, address: str, request: TokenRequest, watch: StartWatch | None = None
                   ) -> AsyncIterator[AsyncIterator[int]]:
        """The token ids the serving node at `address` generates for `request`. Entering waits for the first
        frame and raises the serving node's error when no id came before it; iterating may raise
        SllmdError. Leaving before the end cancels the request there. `watch` hears when the request waits
        for an instance there, and sees that start as the serving node last told it."""
        stream = _Stream(await self._channel(address), self.read_timeout_s, watch)
        try:
            try:
                await stream.channel.ws.send_bytes(frame(stream.stream_id, OPEN, json.dumps(
                    request.to_wire(), separators=(",", ":")).encode()))
            except (ConnectionError, RuntimeError) as exc:  # the channel closed under us: nothing went out
                raise RelayFailed(f"node at {address} did not answer: {exc!r}", is_connect=True) from None
            kind, payload = await stream.next()
            if kind == _NEVER_STARTED:
                raise RelayFailed(f"node at {address} closed its channel before starting the request",
                                  is_connect=True)
            if kind == ERROR:
                raise _error(payload, address)
            async with aclosing(stream.token_ids(kind, payload)) as tokens:
                yield tokens
        finally:
            await stream.close()

    async def call(self, address: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
                   ) -> tuple[int, Any]:
        """POST `body` as JSON to another node's `path` (with this cluster's API key); (status, JSON answer).
        `RelayFailed` if the node cannot be reached or its answer is not JSON."""
        headers = self._auth() | dict(headers or {})
        try:
            async with self._client().post(f"http://{address}{path}", json=body, headers=headers) as answer:
                return answer.status, await answer.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise RelayFailed(f"node at {address} did not answer {path}: {exc!r}",
                              is_connect=isinstance(exc, aiohttp.ClientConnectorError)) from None


def _error(payload: bytes, address: str) -> SllmdError:
    try:
        return error_from_wire(json.loads(payload))
    except ValueError:
        return RelayFailed(f"node at {address} sent a malformed error")
