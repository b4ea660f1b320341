# long: one job, the HTTP client of v1 checkpoints; its docstring is the wire contract and its resume rules.
"""The HTTP client for checkpoints served by a model repository or a peer node (`http(s)://` sources).

What a URL source must serve, under its base URL `BASE`:
* `BASE/manifest.json`: a v1 manifest (docs/checkpoint-format.md), at most `MAX_MANIFEST_BYTES`;
* `BASE/data-NNNNN.bin`: every partition the manifest names, with its exact size, answering
  `Range: bytes=lo-hi` requests with 206 and a matching `Content-Range` (a 200 with the whole file is
  accepted only for a request that starts at byte 0);
* `BASE/config.json`, and optionally the other non-weight files in `SIDE_FILES` (HTTP cannot list a
  directory; a 404 for an optional one is fine), each at most `FetchSettings.max_side_file_bytes`.
Responses must not be content-encoded (every request sends `Accept-Encoding: identity`). 404 and 410 mean
`RepositoryNotFound`; 429, 5xx, refused, reset or timed-out connections are retried with a jittered
exponential backoff, `FetchSettings.retries` times per request (the count resets whenever a chunk
verifies), then `RepositoryUnreachable`; any other status or an inconsistent answer is `FetchError`.

`fetch_url` reads each partition in requests of `FetchSettings.request_bytes` (a whole number of the
manifest's hash chunks) over `connections` parallel connections, writing at the right offsets of a
pre-sized file in a work directory and checking every chunk's xxh3-128 as it lands. A dropped connection
or a 5xx resumes at the first unverified chunk; a chunk that arrives corrupt is fetched once more, then
`ChecksumMismatch`. Every chunk of every partition is verified, which covers every byte; the whole-file
digest is not recomputed. The work directory becomes the checkpoint by one `rename` after everything is
fsynced (`publish`).

Between attempts: after a transient failure (`RepositoryUnreachable`, a timeout, cancellation) the work
directory is kept, holding the manifest and the partial files; a later `fetch_url` into it keeps every
chunk that already hashes right, unless the repository's manifest changed (then it starts over). After
any other error (checksums, a changed or invalid manifest, 404) the work directory is removed.

Async functions run on the caller's event loop; blocking file work goes to threads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import shutil
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import xxhash

from sllmd.checkpoint.errors import CheckpointError, ChecksumMismatch
from sllmd.checkpoint.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest
from sllmd.fsutil import publish_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

# Non-weight files fetched next to a URL checkpoint. HTTP cannot list a directory, so these are the
# names transformers and tokenizers look for; only config.json must exist.
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
    "preprocessor_config.json",
)
REQUIRED_SIDE_FILES = frozenset({"config.json"})

_REHASH_BYTES = 16 << 20  # a resumed fetch re-reads and hashes an earlier attempt's file this much at a time
_PIECE_BYTES = 4 << 20  # a URL fetch hashes, and hands a thread to write, this much at a time
_MAX_BACKOFF_S = 2.0


class FetchError(CheckpointError):
    """The repository could not supply the checkpoint (bad response, too large, inconsistent)."""


class RepositoryNotFound(FetchError):
    """The repository has no such checkpoint or file (HTTP 404/410, or a missing path)."""


class RepositoryUnreachable(FetchError):
    """Connections kept failing (refused, reset, timed out, 5xx) after every retry."""


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """How URL fetches behave. `request_bytes` is rounded down to whole hash chunks (at least one)."""

    connections: int = 4
    request_bytes: int = 64 << 20
    timeout_s: float = 30.0  # to connect, and between two reads of one response
    retries: int = 5  # per request, reset whenever a chunk verifies
    backoff_s: float = 0.25  # first retry delay; doubles up to 2 s, with jitter
    max_side_file_bytes: int = 256 << 20
    bearer_token: str | None = None  # sent as Authorization on every request: for peers, never a repository
    hub_endpoint: str | None = None  # the Hugging Face Hub for hf:// sources; None: HF_ENDPOINT, else huggingface.co


@dataclass(frozen=True, slots=True)
class UrlFetched:
    """What `fetch_url` did."""

    num_bytes: int  # bytes written into the checkpoint (data, non-weight files and the manifest)
    fingerprint: str  # xxh3-128 of the manifest
    num_retries: int  # requests repeated after a connection error or a 5xx
    num_refetched_chunks: int  # chunks that arrived corrupt once


async def describe_url(base: str, settings: FetchSettings) -> tuple[bytes, Manifest, bytes]:
    """(manifest bytes, parsed manifest, config.json bytes) of the checkpoint at `base`, reading nothing
    else. Raises `RepositoryNotFound`, `RepositoryUnreachable`, `FetchError` or `ManifestError`."""
    async with _session(settings) as http:
        manifest_bytes = await _get_small(http, f"{base}/{MANIFEST_FILE}", MAX_MANIFEST_BYTES, settings)
        assert manifest_bytes is not None
        manifest = Manifest.parse(manifest_bytes)
        config_bytes = await _get_small(http, f"{base}/config.json", settings.max_side_file_bytes, settings)
        assert config_bytes is not None
    return manifest_bytes, manifest, config_bytes


async def fetch_url(base: str, dst: Path, work_dir: Path, settings: FetchSettings) -> UrlFetched:
    """Make `dst` (which must not exist) a verified v1 checkpoint of the one at `base`, through `work_dir`
    (on `dst`'s filesystem; see the module docstring for what is kept there between attempts)."""
    return await _UrlFetch(base, dst, work_dir, settings).run()


def publish(work_dir: Path, dst: Path) -> None:
    """Rename the finished, fsynced `work_dir` to `dst`; `FetchError` if `dst` exists."""
    try:
        publish_dir(work_dir, dst)
    except FileExistsError as exc:
        raise FetchError(str(exc)) from None


# ---- internals ---------------------------------------------------------------------------------


class _Retryable(Exception):
    """A response worth retrying (5xx, 429)."""


_RETRYABLE = (aiohttp.ClientError, TimeoutError, ConnectionError, asyncio.IncompleteReadError, _Retryable)


def _session(settings: FetchSettings) -> aiohttp.ClientSession:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeout_s, sock_read=settings.timeout_s)
    return aiohttp.ClientSession(
        timeout=timeout,
        connector=aiohttp.TCPConnector(limit=settings.connections + 1),
        auto_decompress=False,
        read_bufsize=_PIECE_BYTES,  # the flow-control window: 64 KiB (the default) starves one connection
        headers={"Accept-Encoding": "identity", "User-Agent": "sllmd",
                 **({"Authorization": f"Bearer {settings.bearer_token}"} if settings.bearer_token else {})},
    )


def _check_status(response: aiohttp.ClientResponse, url: str) -> None:
    if response.status in (404, 410):
        raise RepositoryNotFound(f"{url} not found in repository (HTTP {response.status})")
    if response.status == 429 or response.status >= 500:
        raise _Retryable(f"HTTP {response.status}")
    if response.status not in (200, 206):
        raise FetchError(f"{url}: unexpected HTTP {response.status} {response.reason or ''}".rstrip())


async def _backoff(attempt: int, settings: FetchSettings, url: str, exc: BaseException) -> None:
    """Sleep before retry number `attempt` (1-based), or raise once the retries are spent."""
    if attempt > settings.retries:
        reason = str(exc) or type(exc).__name__
        raise RepositoryUnreachable(f"{url}: {reason} (gave up after {settings.retries} retries)") from None
    delay = min(settings.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S) * random.uniform(0.5, 1.0)
    log.warning("fetch failed, retrying", extra={"url": url, "error": repr(exc), "attempt": attempt,
                                                 "delay_s": round(delay, 3)})
    await asyncio.sleep(delay)


async def _get_small(http: aiohttp.ClientSession, url: str, limit: int, settings: FetchSettings, *,
                     missing_ok: bool = False) -> bytes | None:
    """The body of a small file, at most `limit` bytes; None for a 404 when `missing_ok`."""
    attempt = 0
    while True:
        try:
            async with http.get(url) as response:
                try:
                    _check_status(response, url)
                except RepositoryNotFound:
                    if missing_ok:
                        return None
                    raise
                if response.content_length is not None and response.content_length > limit:
                    raise FetchError(f"{url} is {response.content_length} bytes, over the {limit}-byte limit")
                body = bytearray()
                async for piece in response.content.iter_chunked(1 << 20):
                    body += piece
                    if len(body) > limit:
                        raise FetchError(f"{url} is over the {limit}-byte limit")
                return bytes(body)
        except _RETRYABLE as exc:
            attempt += 1
            await _backoff(attempt, settings, url, exc)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _verified_chunks(path: Path, manifest: Manifest, index: int) -> set[int]:
    """Chunks of a partial file from an earlier attempt that already hash right."""
    done: set[int] = set()
    part = manifest.partitions[index]
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for k, (lo, hi) in enumerate(manifest.chunk_ranges(index)):
            if hi > size:
                break
            hasher = xxhash.xxh3_128()
            for offset in range(lo, hi, _REHASH_BYTES):
                hasher.update(os.pread(f.fileno(), min(_REHASH_BYTES, hi - offset), offset))
            if hasher.hexdigest() == part.chunk_digests[k]:
                done.add(k)
    return done


class _UrlFetch:
    """One fetch of a URL checkpoint into `work_dir`, then published as `dst`."""

    def __init__(self, base: str, dst: Path, work_dir: Path, settings: FetchSettings) -> None:
        self.base, self.dst, self.work_dir, self.settings = base, dst, work_dir, settings
        self.num_retries = 0
        self.num_refetched = 0

    async def run(self) -> UrlFetched:
        try:
            async with _session(self.settings) as http:
                url = f"{self.base}/{MANIFEST_FILE}"
                manifest_bytes = await _get_small(http, url, MAX_MANIFEST_BYTES, self.settings)
                assert manifest_bytes is not None
                manifest = Manifest.parse(manifest_bytes)
                await asyncio.to_thread(self._prepare_work_dir, manifest_bytes)
                side_bytes = await self._fetch_side_files(http)
                await self._fetch_partitions(http, manifest)
            await asyncio.to_thread(publish, self.work_dir, self.dst)
        except (RepositoryUnreachable, TimeoutError, asyncio.CancelledError):
            raise  # transient: keep the verified chunks for the next attempt
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)
            raise
        return UrlFetched(manifest.total_bytes + side_bytes + len(manifest_bytes),
                          xxhash.xxh3_128_hexdigest(manifest_bytes), self.num_retries, self.num_refetched)

    def _prepare_work_dir(self, manifest_bytes: bytes) -> None:
        """Keep an earlier attempt's files only if they belong to the same manifest."""
        saved = self.work_dir / MANIFEST_FILE
        if saved.is_file() and saved.read_bytes() != manifest_bytes:
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not saved.is_file():
            saved.write_bytes(manifest_bytes)

    async def _fetch_side_files(self, http: aiohttp.ClientSession) -> int:
        async def one(name: str) -> int:
            url = f"{self.base}/{name}"
            data = await _get_small(http, url, self.settings.max_side_file_bytes, self.settings,
                                    missing_ok=name not in REQUIRED_SIDE_FILES)
            if data is None:
                await asyncio.to_thread((self.work_dir / name).unlink, True)  # one an earlier attempt saw
                return 0
            await asyncio.to_thread((self.work_dir / name).write_bytes, data)
            return len(data)

        return sum(await _all_or_nothing([one(name) for name in SIDE_FILES]))

    async def _fetch_partitions(self, http: aiohttp.ClientSession, manifest: Manifest) -> None:
        fds: list[int] = []
        try:
            jobs: list[tuple[int, int, int]] = []
            per_request = max(1, self.settings.request_bytes // manifest.chunk_bytes)
            for index, part in enumerate(manifest.partitions):
                path = self.work_dir / part.file
                existed = path.exists()
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                fds.append(fd)
                done = await asyncio.to_thread(_verified_chunks, path, manifest, index) if existed else set()
                os.ftruncate(fd, part.nbytes)
                missing = [k for k in range(len(part.chunk_digests)) if k not in done]
                jobs += _runs(index, missing, per_request)
            queue = list(reversed(jobs))

            async def worker() -> None:
                while queue:
                    index, first, end = queue.pop()
                    await self._fetch_range(http, manifest, fds[index], index, first, end)

            await _all_or_nothing([worker() for _ in range(min(self.settings.connections, len(jobs)))])
        finally:
            for fd in fds:
                os.close(fd)

    async def _fetch_range(self, http: aiohttp.ClientSession, manifest: Manifest, fd: int, index: int,
                           first: int, end: int) -> None:
        """Chunks [first, end) of partition `index`, in as few requests as the connection allows."""
        part = manifest.partitions[index]
        ranges = manifest.chunk_ranges(index)
        url = f"{self.base}/{part.file}"
        k, attempt, refetched = first, 0, set()
        writes = _Writes(fd)
        while k < end:
            lo, hi = ranges[k][0], ranges[end - 1][1]
            try:
                async with http.get(url, headers={"Range": f"bytes={lo}-{hi - 1}"}) as response:
                    _check_status(response, url)
                    _check_range(response, url, lo, hi, part.nbytes)
                    while k < end:
                        chunk_lo, chunk_hi = ranges[k]
                        hasher = xxhash.xxh3_128()  # > 10 GB/s: cheap enough for the event loop
                        for offset in range(chunk_lo, chunk_hi, _PIECE_BYTES):
                            piece = await response.content.readexactly(min(_PIECE_BYTES, chunk_hi - offset))
                            hasher.update(piece)
                            await writes.submit(piece, offset)
                        if hasher.hexdigest() == part.chunk_digests[k]:
                            k, attempt = k + 1, 0
                            continue
                        if k in refetched:
                            raise ChecksumMismatch(part.file, chunk_lo, chunk_hi)
                        refetched.add(k)
                        self.num_refetched += 1
                        log.warning("chunk failed its checksum, fetching it again",
                                    extra={"url": url, "start": chunk_lo, "end": chunk_hi})
                        break  # a new request from chunk k
            except _RETRYABLE as exc:
                attempt += 1
                self.num_retries += 1
                await _backoff(attempt, self.settings, url, exc)
            finally:
                # A retry rewrites these offsets: no write of this attempt may land after one of the next.
                await writes.drain()


class _Writes:
    """pwrite()s of one connection in worker threads, a few in flight so that receiving overlaps
    writing (first writes into fresh page cache run at well under 1 GB/s on small VMs)."""

    def __init__(self, fd: int, max_in_flight: int = 4) -> None:
        self._fd, self._max = fd, max_in_flight
        self._pending: set[asyncio.Future[None]] = set()

    async def submit(self, data: bytes, offset: int) -> None:
        while len(self._pending) >= self._max:
            done, self._pending = await asyncio.wait(self._pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                future.result()
        self._pending.add(asyncio.ensure_future(asyncio.to_thread(_pwrite_all, self._fd, data, offset)))

    async def drain(self) -> None:
        """Wait for every write (even when cancelled: the file descriptor closes after), then raise the
        first error."""
        pending, self._pending = self._pending, set()
        if not pending:
            return
        waiter = asyncio.ensure_future(asyncio.wait(pending))
        try:
            await asyncio.shield(waiter)
        except asyncio.CancelledError:
            await waiter
            raise
        for future in pending:
            future.result()


async def _all_or_nothing(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `coros` concurrently; on the first failure cancel the rest and wait for them, then raise it."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _runs(index: int, chunks: Iterable[int], per_request: int) -> list[tuple[int, int, int]]:
    """(partition, first, end) jobs over runs of consecutive chunks, at most `per_request` long."""
    jobs: list[tuple[int, int, int]] = []
    for k in chunks:
        if jobs and jobs[-1][2] == k and k - jobs[-1][1] < per_request:
            jobs[-1] = (index, jobs[-1][1], k + 1)
        else:
            jobs.append((index, k, k + 1))
    return jobs


def _check_range(response: aiohttp.ClientResponse, url: str, lo: int, hi: int, size: int) -> None:
    """The response must carry bytes [lo, hi) of a file of `size` bytes, or the whole file from 0."""
    if response.status == 200:
        if lo != 0:
            raise FetchError(f"{url}: the server ignored the Range header (HTTP 200 for bytes {lo}-{hi - 1})")
        if response.content_length is not None and response.content_length != size:
            raise FetchError(f"{url} is {response.content_length} bytes, the manifest says {size}")
        return
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if match is None or (int(match[1]), int(match[2]) + 1) != (lo, hi):
        raise FetchError(f"{url}: asked for bytes {lo}-{hi - 1}, got Content-Range "
                         f"{response.headers.get('Content-Range')!r}")
    if match[3] != "*" and int(match[3]) != size:
        raise FetchError(f"{url} is {match[3]} bytes, the manifest says {size}")

