"""Runs one node: opens its state, serves HTTP, and shuts down gracefully on SIGTERM/SIGINT.

Signals only set a flag. Shutdown stops accepting connections, gives in-flight requests
`server.shutdown_timeout_s` to finish, cancels the rest (and says how many), then stops engines.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from sllmd.cluster.shell import ClusterStartupError
from sllmd.config import Config, StoreConfig
from sllmd.control.deployments import DeploySpec
from sllmd.engine import preload_backends
from sllmd.errors import Conflict, SllmdError
from sllmd.http.app import build_app
from sllmd.node import Node
from sllmd.types import Backend

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The daemon cannot start; the message is the one-line reason for the operator."""


def notify_systemd(state: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(state.encode())


def lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive lock on the data dir for the process lifetime: two daemons on one state
    would each believe they own it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StartupError(f"data dir {data_dir} is in use by another sllmd (pid {holder})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def prepare_loader(store: StoreConfig) -> None:
    """Apply the node's loader settings, and on CUDA nodes pin the staging buffers now rather than
    during the first cold start."""
    import torch

    from sllmd.checkpoint import loader, pool

    loader.configure(num_readers=store.loader_readers, chunk_bytes=store.loader_chunk_mb << 20)
    if torch.cuda.is_available():
        pool.default_pool(store.staging_buffers, store.loader_chunk_mb << 20)


async def serve(config: Config, ensure_deployed: Sequence[tuple[str, str]] = ()) -> None:
    lock_fd = lock_data_dir(config.data_dir)
    if config.serving.torch_threads:
        import torch

        torch.set_num_threads(config.serving.torch_threads)
    await asyncio.to_thread(preload_backends)
    await asyncio.to_thread(prepare_loader, config.store)
    try:
        node = Node.open(config)
        if config.store.probe_mb:
            await _probe(node)
        server = config.server
        runner = web.AppRunner(build_app(node), handler_cancellation=True, access_log=None,
                               shutdown_timeout=server.shutdown_timeout_s)
        try:
            await runner.setup()  # starts the node (`build_app`)
        except ClusterStartupError as exc:
            raise StartupError(str(exc)) from None
        try:
            for name, checkpoint in ensure_deployed:
                if node.state.deployment(name) is None:
                    spec = DeploySpec(name, checkpoint, Backend.TRANSFORMERS, config.autoscaling)
                    try:
                        await node.deployments.deploy(spec, show_progress=sys.stderr.isatty())
                    except Conflict:  # another member deployed it first; this node had not applied that yet
                        continue
                    log.info("deployed", extra={"model": name, "checkpoint": str(checkpoint)})
            if config.store.probe_mb:
                node.start_peer_link_probe()
            await _serve_http(runner, node)
        finally:
            await runner.cleanup()  # waits up to shutdown_timeout for handlers, cancels them, then closes the node
            log.info("http stopped")
    finally:
        os.close(lock_fd)


async def _probe(node: Node) -> None:
    """Measure this node's load bandwidths before it reports them (a failed probe keeps the defaults)."""
    from sllmd.worker.probe import probe_bytes, probe_calibration

    worker, store = node.worker, node.config.store
    if not worker.devices.devices:
        return  # a node without devices serves no model: nothing of its own to time
    num_bytes = probe_bytes(node.config.data_dir, store.probe_mb << 20)
    if not num_bytes:
        log.warning("too little free disk for the load bandwidth probe; estimates start from defaults",
                    extra={"data_dir": str(node.config.data_dir)})
        return
    try:
        calibration = await asyncio.to_thread(probe_calibration, node.config.data_dir, worker.devices.devices[0].name,
                                              num_bytes, worker.estimates.calibration)
    except (OSError, SllmdError) as exc:
        log.warning("load bandwidth probe failed; estimates start from defaults", extra={"error": repr(exc)})
        return
    worker.estimates.set_calibration(calibration)


async def _serve_http(runner: web.AppRunner, node: Node) -> None:
    """Listen until SIGTERM or SIGINT."""
    server = node.config.server
    site = web.TCPSite(runner, server.host, server.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise StartupError(f"cannot listen on {server.host}:{server.port}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("serving", extra={"node_id": node.node_id, "http": f"{server.host}:{server.port}",
                               "peer": f"{server.host}:{server.peer_port}", "leader": node.state.leader_id,
                               "devices": [f"{d.name} {d.budget_bytes >> 20} MiB"
                                           for d in node.worker.devices.devices]})
    notify_systemd("READY=1")
    await stop.wait()
    notify_systemd("STOPPING=1")
    num_in_flight = len(runner.server.connections) if runner.server else 0
    log.info("shutting down", extra={"open_connections": num_in_flight, "timeout_s": server.shutdown_timeout_s})
