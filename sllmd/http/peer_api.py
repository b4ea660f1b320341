"""Peer routes: a node serves the checkpoints in its SSD store (and its probe checkpoint) to the other
nodes of its cluster.

`GET /internal/checkpoints/{id}/{file}` answers one file of store entry `id` (the manifest, a data
partition or a side file), with HTTP Range support, so a peer fetches it exactly as it fetches a v1
checkpoint from an HTTP repository: several connections, every chunk verified against the manifest.
The entry is pinned while a response streams, so eviction never deletes a file mid-transfer. Guarded by
the API keys like every other route (peers send the cluster's key).
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from sllmd.checkpoint.store import PEER_PATH
from sllmd.errors import NotFound
from sllmd.http.keys import NODE
from sllmd.worker.probe import PROBE_DIR, PROBE_PATH


class _SentFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself (so the entry stays pinned while it streams): aiohttp prepares
    a returned response again, which FileResponse does not tolerate once its headers are out."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return None
        return await super().prepare(request)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get(PEER_PATH + "/{id}/{file}", checkpoint_file)
    router.add_get(PROBE_PATH + "/{file}", probe_file)


async def probe_file(request: web.Request) -> web.StreamResponse:
    """One file of this node's probe checkpoint (built before the node serves, never changed while it
    does), for a peer timing its copy from here (`worker.probe.probe_peer_fetch`)."""
    node, name = request.app[NODE], request.match_info["file"]
    file = node.config.data_dir / PROBE_DIR / name
    if name.startswith(".") or "/" in name or not file.is_file() or file.is_symlink():
        raise NotFound(f"no probe file {name} on this node", code="probe_not_found")
    return web.FileResponse(file, chunk_size=1 << 20)


async def checkpoint_file(request: web.Request) -> web.StreamResponse:
    store = request.app[NODE].worker.store
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
