"""Shared helpers for the benchmark scripts: run an sllmd daemon (or any HTTP server) as a child
process on free 127.0.0.1 ports, wait until it answers, and always stop it again.

Children write their output to a log file in a temp dir (never a pipe that could fill up); the
last lines of that log are put into the error when a child fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.02


class ChildError(RuntimeError):
    """A child process failed to start or exited early; the message ends with its log tail."""


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1, all bound at once so none repeats."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _log_tail(path: Path, num_lines: int = 20) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-num_lines:]) or "(empty log)"


class Child:
    """A child HTTP server on 127.0.0.1:`port`; `stop()` is idempotent and safe to call always."""

    def __init__(self, argv: Sequence[str], port: int, log_path: Path, *, name: str,
                 env: Mapping[str, str] | None = None, peer_port: int | None = None) -> None:
        self.name = name
        self.port = port
        self.peer_port = peer_port
        self.base_url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.started_at = time.perf_counter()
        self.ready_s: float | None = None  # spawn -> first successful health answer
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def log_tail(self, num_lines: int = 20) -> str:
        return _log_tail(self.log_path, num_lines)

    async def wait_ready(self, path: str = "/health", timeout_s: float = READY_TIMEOUT_S) -> float:
        """Poll GET `path` until it answers 200; seconds from spawn. ChildError on exit or timeout."""
        deadline = self.started_at + timeout_s
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if self.proc.poll() is not None:
                    raise ChildError(f"{self.name} exited with status {self.proc.returncode} before "
                                     f"answering {path}; log tail:\n{self.log_tail()}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(self.base_url + path) as resp:
                        await resp.read()
                        if resp.status == 200:
                            self.ready_s = time.perf_counter() - self.started_at
                            return self.ready_s
                if time.perf_counter() > deadline:
                    raise ChildError(f"{self.name} did not answer {path} within {timeout_s:.0f}s; "
                                     f"log tail:\n{self.log_tail()}")
                await asyncio.sleep(POLL_INTERVAL_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                print(f"{self.name}: no exit {timeout_s:.0f}s after SIGTERM; killing", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(5.0)
        return self.proc.returncode


def start_daemon(
    data_dir: Path, *, deploy: Sequence[tuple[str, Path]] = (), log_path: Path | None = None,
    extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
) -> Child:
    """Spawn `python -m sllmd` on free ports with its state in `data_dir` (and `env` over this process's
    environment); call `wait_ready()` next. Its peer port is `Child.peer_port` (for another's `--join`)."""
    port, peer_port = free_ports(2)
    argv = [sys.executable, "-m", "sllmd", "--data-dir", str(data_dir), "--port", str(port),
            "--peer-port", str(peer_port), "--log-format", "text", *extra_args]
    for name, checkpoint in deploy:
        argv += ["--deploy", f"{name}={checkpoint}"]
    return Child(argv, port, log_path or data_dir.parent / f"sllmd-{port}.log", name="sllmd", env=env,
                 peer_port=peer_port)


def start_script(script: Path, args: Sequence[str], *, log_path: Path) -> Child:
    """Spawn `python script --port P args...` on a free port (for baseline servers)."""
    (port,) = free_ports(1)
    return Child([sys.executable, str(script), *args, "--port", str(port)], port, log_path, name=script.name)


def make_demo_model(out_dir: Path, timeout_s: float = 600.0) -> Path:
    """Write the demo model into `out_dir` (must not exist or be empty) with `sllmd demo-model`."""
    result = subprocess.run(
        [sys.executable, "-m", "sllmd", "demo-model", str(out_dir)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout_s,
    )
    if result.returncode != 0 or not (out_dir / "config.json").exists():
        raise ChildError(f"sllmd demo-model failed (status {result.returncode}):\n{result.stderr[-2000:]}")
    return out_dir.resolve()


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into SystemExit for the block, so `finally` clauses (child stops, temp dir
    removal) still run when the benchmark itself is terminated."""

    def raise_exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StreamError(RuntimeError):
    """An SSE stream carried an error event or ended without `data: [DONE]`."""


async def sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """Each JSON event of an OpenAI-style SSE stream, in order; StreamError on an error event or
    when the stream ends without `[DONE]`."""
    async for line in response.content:
        if not line.startswith(b"data: "):
            continue
        data = line[6:].strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            raise StreamError(f"error event in the stream: {data[:300]!r}")
        yield event
    raise StreamError("stream ended without [DONE]")


def evict_page_cache(root: Path) -> None:
    """Drop the cached pages of every file under `root` (posix_fadvise; root-free, and leaves other users'
    page cache alone, unlike drop_caches), so the next read of them comes from the disk."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
