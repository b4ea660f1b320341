"""Get a checkpoint from the model repository into a local directory that is complete or absent.

A source is one of (`SourceKind`):
* a local Hugging Face model directory: converted (`convert.convert`) into the v1 format;
* a local sllmd v1 checkpoint directory: copied, every chunk verified against the manifest as it is copied;
* an `http(s)://` base URL of a v1 checkpoint: `BASE/manifest.json`, `BASE/data-NNNNN.bin` and the
  non-weight files in `SIDE_FILES` (a 404 for an optional one is fine), read with Range requests.

URL fetches read each partition in requests of `FetchSettings.request_bytes` (a whole number of the
manifest's hash chunks) over `connections` parallel connections, writing at the right offsets of a
pre-sized file in a work directory and checking every chunk's xxh3-128 as it lands. A dropped connection
or a 5xx resumes at the first unverified chunk after a backoff; a chunk that arrives corrupt is fetched
once more, then `ChecksumMismatch`. A later `fetch` into the same work directory (after an error or a
timeout) keeps every chunk that already hashes right, unless the repository's manifest changed. The
work directory becomes the checkpoint by one `rename` after everything is fsynced. Every chunk of every
partition is verified, which covers every byte; the whole-file digest is not recomputed.

Async functions run on the caller's event loop; blocking file work goes to threads.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import xxhash

from sllmd.checkpoint.format import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    CheckpointError,
    CheckpointNotFound,
    ChecksumMismatch,
    Manifest,
    PartitionHasher,
)
from sllmd.checkpoint.reader import check_partition, read_manifest_bytes, read_partition
from sllmd.fsutil import publish_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

# Non-weight files fetched next to a URL checkpoint. HTTP cannot list a directory, so these are the
# names transformers and tokenizers look for; only config.json must exist.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what counts as weights in a Hugging Face dir
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
    "preprocessor_config.json",
)
REQUIRED_SIDE_FILES = frozenset({"config.json"})

_COPY_BLOCK_BYTES = 16 << 20  # local copies read and hash this much at a time
_PIECE_BYTES = 4 << 20  # a URL fetch hashes, and hands a thread to write, this much at a time
_MAX_BACKOFF_S = 2.0
_DATA_FILE = re.compile(r"data-\d{5}\.bin")


class SourceKind(enum.StrEnum):
    URL = "url"
    HF_DIR = "hf"
    V1_DIR = "v1"


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


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source holds, learnt without fetching its weights: for validation at deploy time."""

    source: str
    kind: SourceKind
    num_bytes: int  # v1: the manifest's total_bytes; HF: the weight files' size (the converted size is close)
    config: dict[str, Any]  # config.json
    fingerprint: str  # changes when the source's content does (see `describe`)


@dataclass(frozen=True, slots=True)
class FetchReport:
    source: str
    kind: SourceKind
    num_bytes: int  # bytes written into the checkpoint (data and non-weight files)
    seconds: float
    fingerprint: str
    num_retries: int = 0  # requests repeated after a connection error or a 5xx
    num_refetched_chunks: int = 0  # chunks that arrived corrupt once

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9) / 1e9


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def normalize_source(source: str) -> str:
    """The canonical spelling of a source: a URL without trailing slashes, or a normalised absolute
    path. `ValueError` with a readable reason for anything else."""
    source = source.strip()
    if is_url(source):
        parts = urlsplit(source)
        if not parts.hostname:
            raise ValueError(f"{source!r} has no host")
        if parts.query or parts.fragment:
            raise ValueError(f"{source!r}: a checkpoint URL is a base URL, without query or fragment")
        return source.rstrip("/")
    if "://" in source:
        raise ValueError(f"{source!r}: only http:// and https:// URLs are supported")
    if not os.path.isabs(source):
        raise ValueError("checkpoint must be an absolute path or an http(s):// URL")
    return os.path.normpath(source)


def source_kind(source: str) -> SourceKind:
    if is_url(source):
        return SourceKind.URL
    return SourceKind.V1_DIR if (Path(source) / MANIFEST_FILE).is_file() else SourceKind.HF_DIR


# ---- describe ----------------------------------------------------------------------------------


async def describe(source: str, settings: FetchSettings = FetchSettings()) -> SourceInfo:
    """Size, config and fingerprint of `source`, reading only small files (the manifest, config.json).

    The fingerprint is the xxh3 of the manifest for v1 sources (URL or directory); of the names, sizes
    and modification times of the top-level files for Hugging Face directories. Raises
    `RepositoryNotFound`, `RepositoryUnreachable`, `FetchError`, `ManifestError` or `CheckpointNotFound`.
    """
    source = normalize_source(source)
    kind = source_kind(source)
    if kind is SourceKind.URL:
        async with _session(settings) as http:
            manifest_bytes = await _get_small(http, f"{source}/{MANIFEST_FILE}", MAX_MANIFEST_BYTES, settings)
            manifest = Manifest.parse(manifest_bytes)
            config_bytes = await _get_small(http, f"{source}/config.json", settings.max_side_file_bytes, settings)
        config = _parse_config(config_bytes, f"{source}/config.json")
        return SourceInfo(source, kind, manifest.total_bytes, config, xxhash.xxh3_128_hexdigest(manifest_bytes))
    return await asyncio.to_thread(_describe_dir, source, kind)


def _describe_dir(source: str, kind: SourceKind) -> SourceInfo:
    path = Path(source)
    if not path.is_dir():
        raise RepositoryNotFound(f"checkpoint directory {path} does not exist")
    try:
        config = _parse_config((path / "config.json").read_bytes(), f"{path}/config.json")
    except FileNotFoundError:
        raise CheckpointNotFound(f"{path} has no config.json") from None
    if kind is SourceKind.V1_DIR:
        manifest_bytes = read_manifest_bytes(path)
        manifest = Manifest.parse(manifest_bytes)
        return SourceInfo(source, kind, manifest.total_bytes, config, xxhash.xxh3_128_hexdigest(manifest_bytes))
    files = sorted((f.name, f.stat()) for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    stamp = "\n".join(f"{name}\t{st.st_size}\t{st.st_mtime_ns}" for name, st in files)
    num_bytes = sum(st.st_size for name, st in files if name.endswith(WEIGHT_SUFFIXES))
    return SourceInfo(source, kind, num_bytes, config, xxhash.xxh3_128_hexdigest(stamp.encode()))


def _parse_config(data: bytes, where: str) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FetchError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise FetchError(f"{where} must hold a JSON object")
    return config


# ---- fetch -------------------------------------------------------------------------------------


async def fetch(source: str, dst: Path, *, work_dir: Path, settings: FetchSettings = FetchSettings()) -> FetchReport:
    """Make `dst` (which must not exist) a verified v1 checkpoint of `source`, atomically.

    `work_dir` is where a URL fetch keeps its partial files between attempts: pass the same one to
    resume. It must be on `dst`'s filesystem; it is gone after success and after any error that a retry
    cannot fix (checksums, a changed or invalid manifest, 404), and kept after transient ones.
    """
    source, dst, start = normalize_source(source), Path(dst), time.monotonic()
    kind = source_kind(source)
    if os.path.lexists(dst):
        raise FetchError(f"{dst} already exists")
    if kind is SourceKind.HF_DIR:
        info = await asyncio.to_thread(_describe_dir, source, kind)
        from sllmd.checkpoint.convert import convert  # imports torch; only conversions need it

        await asyncio.to_thread(convert, Path(source), dst)
        report = FetchReport(source, kind, _dir_bytes(dst), time.monotonic() - start, info.fingerprint)
    elif kind is SourceKind.V1_DIR:
        num_bytes, fingerprint = await asyncio.to_thread(_copy_v1, Path(source), dst, work_dir)
        report = FetchReport(source, kind, num_bytes, time.monotonic() - start, fingerprint)
    else:
        report = await _UrlFetch(source, dst, work_dir, settings).run()
    log.info("checkpoint fetched", extra={"source": source, "kind": kind.value, "bytes": report.num_bytes,
                                          "seconds": round(report.seconds, 3), "gb_per_s": round(report.gb_per_s, 3),
                                          "retries": report.num_retries})
    return report


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _publish(work_dir: Path, dst: Path) -> None:
    try:
        publish_dir(work_dir, dst)
    except FileExistsError as exc:
        raise FetchError(str(exc)) from None


def _copy_v1(src: Path, dst: Path, work_dir: Path) -> tuple[int, str]:
    """Copy a local v1 checkpoint, hashing while copying; returns (bytes, manifest fingerprint)."""
    manifest_bytes = read_manifest_bytes(src)
    manifest = Manifest.parse(manifest_bytes)
    shutil.rmtree(work_dir, ignore_errors=True)  # local copies are fast: no resume
    work_dir.mkdir(parents=True)
    try:
        buffer = memoryview(bytearray(_COPY_BLOCK_BYTES))
        total = sum(_copy_partition(src, work_dir, manifest, index, buffer)
                    for index in range(len(manifest.partitions)))
        for f in sorted(src.iterdir()):
            if f.name.startswith(".") or not f.is_file() or f.name == MANIFEST_FILE or _DATA_FILE.fullmatch(f.name):
                continue
            shutil.copyfile(f, work_dir / f.name)
            total += f.stat().st_size
        (work_dir / MANIFEST_FILE).write_bytes(manifest_bytes)
        _publish(work_dir, dst)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    return total + len(manifest_bytes), xxhash.xxh3_128_hexdigest(manifest_bytes)


def _copy_partition(src: Path, work_dir: Path, manifest: Manifest, index: int, buffer: memoryview) -> int:
    hasher = PartitionHasher(manifest.chunk_bytes)
    with open(work_dir / manifest.partitions[index].file, "wb", buffering=0) as fout:
        for view in read_partition(src, manifest, index, buffer):
            hasher.update(view)
            while view:
                view = view[fout.write(view) :]
    check_partition(manifest, index, hasher)
    return manifest.partitions[index].nbytes


# ---- HTTP --------------------------------------------------------------------------------------


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
            for offset in range(lo, hi, _COPY_BLOCK_BYTES):
                hasher.update(os.pread(f.fileno(), min(_COPY_BLOCK_BYTES, hi - offset), offset))
            if hasher.hexdigest() == part.chunk_digests[k]:
                done.add(k)
    return done


class _UrlFetch:
    """One fetch of a URL checkpoint into `work_dir`, then published as `dst`."""

    def __init__(self, base: str, dst: Path, work_dir: Path, settings: FetchSettings) -> None:
        self.base, self.dst, self.work_dir, self.settings = base, dst, work_dir, settings
        self.num_retries = 0
        self.num_refetched = 0

    async def run(self) -> FetchReport:
        start = time.monotonic()
        try:
            async with _session(self.settings) as http:
                url = f"{self.base}/{MANIFEST_FILE}"
                manifest_bytes = await _get_small(http, url, MAX_MANIFEST_BYTES, self.settings)
                assert manifest_bytes is not None
                manifest = Manifest.parse(manifest_bytes)
                await asyncio.to_thread(self._prepare_work_dir, manifest_bytes)
                side_bytes = await self._fetch_side_files(http)
                await self._fetch_partitions(http, manifest)
            await asyncio.to_thread(_publish, self.work_dir, self.dst)
        except (RepositoryUnreachable, TimeoutError, asyncio.CancelledError):
            raise  # transient: keep the verified chunks for the next attempt
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)
            raise
        return FetchReport(self.base, SourceKind.URL, manifest.total_bytes + side_bytes + len(manifest_bytes),
                           time.monotonic() - start, xxhash.xxh3_128_hexdigest(manifest_bytes), self.num_retries,
                           self.num_refetched)

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

