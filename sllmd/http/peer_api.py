"""Peer routes: what the nodes of a cluster ask of each other over HTTP.

`POST GENERATE_PATH` (the internal generate hop, see `sllmd.serving.relay`) generates a request another
node prepared (a `TokenRequest`: ids and sampling) on an instance here, and streams the ids back. It is
served where it lands (one hop, no loops) and records no request metrics: the entry node does.

`GET /internal/checkpoints/{id}/{file}` answers one file of store entry `id` (the manifest, a data
partition or a side file), with HTTP Range support, so a peer fetches it exactly as it fetches a v1
checkpoint from an HTTP repository: several connections, every chunk verified against the manifest.
The entry is pinned while a response streams, so eviction never deletes a file mid-transfer. Guarded by
the API keys like every other route (peers send the cluster's key).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from sllmd.checkpoint.store import PEER_PATH
from sllmd.errors import NotFound, SllmdError
from sllmd.http.keys import CONFIG, ROUTER, WORKER
from sllmd.http.schemas import parse_json_object
from sllmd.serving.relay import GENERATE_PATH, end_event, error_event, token_ids_event
from sllmd.serving.request import TokenRequest
from sllmd.worker.probe import PROBE_DIR, PROBE_PATH

log = logging.getLogger(__name__)


class _SentFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (so the entry stays pinned while it streams): aiohttp prepares
    a returned response again, which FileResponse does not tolerate once its headers are out."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post(GENERATE_PATH, generate)
    router.add_get(PEER_PATH + "/{id}/{file}", checkpoint_file)
    router.add_get(PROBE_PATH + "/{file}", probe_file)


async def generate(request: web.Request) -> web.StreamResponse:
    """The token ids of a request another node prepared, generated on an instance here (waiting through a
    cold start). An error before the stream answers its status with `{"error": error.to_wire()}`; one within
    it is an error event (see `sllmd.serving.relay`)."""
    try:
        token_request = TokenRequest.from_wire(parse_json_object(await request.read()))
        async with request.app[ROUTER].open_tokens(token_request) as tokens:
            return await _stream_tokens(request, token_request, tokens)
    except SllmdError as error:  # `_stream_tokens` keeps its own: this is before the status line went out
        headers = {"Retry-After": str(error.retry_after_s)} if getattr(error, "retry_after_s", None) else {}
        return web.json_response({"error": error.to_wire()}, status=error.status, headers=headers)


async def _stream_tokens(request: web.Request, token_request: TokenRequest, tokens: AsyncIterator[int]
                         ) -> web.StreamResponse:
    # The first token is on the entry node's critical path and the status line is not (the entry waits for
    # the token either way): the engine takes the request before the response is prepared.
    first = asyncio.ensure_future(anext(tokens, None))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await asyncio.sleep(0)  # one turn: the request reaches the engine, whose queue it then waits on
        await response.prepare(request)
    except BaseException:
        # The generator sees the cancellation (its instance drops the request) and must have stopped
        # running before the caller closes it.
        first.cancel()
        with contextlib.suppress(BaseException):
            await first
        raise
    num_generated = 0
    try:
        token = await first
        while token is not None:
            await response.write(token_ids_event((token,)))
            num_generated += 1
            token = await anext(tokens, None)
        last = end_event(len(token_request.prompt_ids), num_generated)
    except SllmdError as error:
        log.warning("relayed stream failed", extra={"model": token_request.model, "error": error.message})
        last = error_event(error)
    # One write with the end of the body: the relay sees the stream complete as it reads [DONE], so its
    # connection goes back to the pool rather than being closed mid-body.
    await response.write_eof(last + b"data: [DONE]\n\n")
    return response


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
