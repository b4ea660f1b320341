"""Peer routes: what the nodes of a cluster ask of each other over HTTP.

`GET CHANNEL_PATH` opens a peer channel (a WebSocket, see `sllmd.serving.relay`): every request another
node prepared (a `TokenRequest`: ids and sampling) and relays here is generated on an instance here, its
ids streamed back (and before them, while it waits for an instance, how that instance's start goes). A
request is served where it lands (one hop, no loops) and records no request metrics: the entry node does.

`GET /internal/checkpoints/{id}/{file}` answers one file of store entry `id` (the manifest, a data
partition or a side file), with HTTP Range support, so a peer fetches it exactly as it fetches a v1
checkpoint from an HTTP repository: several connections, every chunk verified against the manifest.
The entry is pinned while a response streams, so eviction never deletes a file mid-transfer. Guarded by
the API keys like every other route (peers send the cluster's key).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from sllmd.checkpoint.store import PEER_PATH
from sllmd.errors import NotFound, SllmdError
from sllmd.http.keys import CONFIG, ROUTER, WORKER
from sllmd.http.schemas import parse_json_object
from sllmd.serving.relay import (
    CANCEL,
    CHANNEL_PATH,
    MAX_FRAME_BYTES,
    OPEN,
    end_frame,
    error_frame,
    parse_frame,
    progress_frame,
    tokens_frame,
)
from sllmd.serving.request import TokenRequest
from sllmd.worker.probe import PROBE_DIR, PROBE_PATH
from sllmd.worker.start_progress import StartView, StartWatch

if TYPE_CHECKING:
    from sllmd.serving.pipeline import Router

log = logging.getLogger(__name__)


class _SentFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (so the entry stays pinned while it streams): aiohttp prepares
    a returned response again, which FileResponse does not tolerate once its headers are out."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


def add_routes(app: web.Application) -> None:
    channels = PeerChannels()
    app.router.add_get(CHANNEL_PATH, channels.serve)
    app.router.add_get(PEER_PATH + "/{id}/{file}", checkpoint_file)
    app.router.add_get(PROBE_PATH + "/{file}", probe_file)
    app.on_shutdown.append(lambda app: channels.drain())


class PeerChannels:
    """The serving side of this node's peer channels (see `sllmd.serving.relay`): each OPEN runs as a task
    that streams the ids an instance here generates (waiting through a cold start), until END or ERROR; a
    CANCEL or the channel's end cancels it. `drain` (at shutdown) stops starting streams and closes each
    channel once none of its streams runs."""

    def __init__(self) -> None:
        self.is_draining = False
        self._streams: dict[web.WebSocketResponse, dict[int, asyncio.Task[None]]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES)
        await ws.prepare(request)
        router = request.app[ROUTER]
        streams = self._streams[ws] = {}
        try:
            async for message in ws:
                if message.type is not WSMsgType.BINARY:
                    break
                stream_id, kind, payload = parse_frame(message.data)
                if kind == OPEN and not self.is_draining:
                    task = streams[stream_id] = asyncio.create_task(_serve_stream(ws, router, stream_id, payload))
                    task.add_done_callback(functools.partial(self._ended, ws, stream_id))
                elif kind == CANCEL and (task := streams.get(stream_id)) is not None:
                    task.cancel()
        except ValueError as exc:
            log.warning("malformed peer channel frame; closing the channel", extra={"error": repr(exc)})
        finally:
            del self._streams[ws]
            for task in streams.values():
                task.cancel()
            await asyncio.gather(*streams.values(), return_exceptions=True)
        return ws

    def _ended(self, ws: web.WebSocketResponse, stream_id: int, _: asyncio.Task[None]) -> None:
        streams = self._streams.get(ws)
        if streams is not None:
            streams.pop(stream_id, None)
            if self.is_draining and not streams:
                self._close(ws)

    def _close(self, ws: web.WebSocketResponse) -> None:
        task = asyncio.create_task(ws.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def drain(self) -> None:
        """Start no more streams; close each channel (with a close frame) once none of its streams runs."""
        self.is_draining = True
        for ws, streams in list(self._streams.items()):
            if not streams:
                self._close(ws)


async def _serve_stream(ws: web.WebSocketResponse, router: Router, stream_id: int, payload: bytes) -> None:
    num_generated = 0

    async def send_progress(start: StartView | None) -> None:
        await ws.send_bytes(progress_frame(stream_id, start))

    try:
        try:
            token_request = TokenRequest.from_wire(parse_json_object(payload))
            watch = StartWatch()
            async with AsyncExitStack() as stack:
                async with watch.reporting(send_progress):  # while it waits for an instance, if it does
                    tokens = await stack.enter_async_context(router.open_tokens(token_request, watch))
                async for token in tokens:
                    await ws.send_bytes(tokens_frame(stream_id, (token,)))
                    num_generated += 1
            last = end_frame(stream_id, len(token_request.prompt_ids), num_generated)
        except SllmdError as error:
            log.warning("relayed stream failed", extra={"error": error.message})
            last = error_frame(stream_id, error)
        await ws.send_bytes(last)
    except ConnectionError:
        pass  # the channel closed: its handler cancels what runs on it


async def probe_file(request: web.Request) -> web.StreamResponse:
    """One file of this node's probe checkpoint (built before the node serves, never changed while it
    does), for a peer timing its copy from here (`worker.probe.probe_peer_fetch`)."""
    name = request.match_info["file"]
    file = request.app[CONFIG].data_dir / PROBE_DIR / name
    if name.startswith(".") or "/" in name or not file.is_file() or file.is_symlink():
        raise NotFound(f"no probe file {name} on this node", code="probe_not_found")
    return web.FileResponse(file, chunk_size=1 << 20)


async def checkpoint_file(request: web.Request) -> web.StreamResponse:
    store = request.app[WORKER].store
    cid, name = request.match_info["id"], request.match_info["file"]
    # Only plain names of regular files inside a complete entry: nothing else of the disk is reachable.
    if not store.contains(cid) or name.startswith(".") or "/" in name:
        raise NotFound(f"no checkpoint file {cid}/{name} on this node", code="checkpoint_not_found")
    with store.pinned(cid) as path:
        file = path / name
        if not file.is_file() or file.is_symlink():
            raise NotFound(f"no checkpoint file {cid}/{name} on this node", code="checkpoint_not_found")
        response = _SentFileResponse(file, chunk_size=1 << 20)
        await response.prepare(request)  # streams the whole (ranged) body while the entry stays pinned
        return response
