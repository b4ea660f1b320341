"""Get a checkpoint from the model repository into a local directory that is complete or absent.

A source is one of (`SourceKind`):
* a local Hugging Face model directory: converted (`convert.convert`) into the v1 format;
* a local sllmd v1 checkpoint directory: copied, every chunk verified against the manifest as it is copied;
* a local GGUF file: dequantised and converted (`gguf.convert_gguf`);
* a Hugging Face Hub model, `hf://ORG/NAME@COMMIT` (a snapshot, converted like a local directory) or
  `hf://ORG/NAME/FILE.gguf@COMMIT` (one GGUF file), downloaded by huggingface_hub into its cache
  (`sllmd.checkpoint.hub`); deploy pins a Hub id to the commit its revision names, so every node, now and
  later, fetches the same bytes;
* an `http(s)://` base URL of a v1 checkpoint (a model repository or a peer node): fetched by
  `sllmd.checkpoint.url_fetch`, whose docstring says what such a source must serve, how it is read
  (parallel Range requests, every chunk verified) and what a later attempt resumes from.

Every way ends with one `rename` of a fsynced work directory. This module holds the public entry points
(`describe`, `fetch`) and the local-directory sources; the URL client's settings and errors
(`FetchSettings`, `FetchError`, `RepositoryNotFound`, `RepositoryUnreachable`) are `url_fetch`'s.

Async functions run on the caller's event loop; blocking file work goes to threads.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import xxhash

from sllmd.checkpoint import hub
from sllmd.checkpoint.errors import CheckpointNotFound, ConversionError
from sllmd.checkpoint.gguf import is_gguf_file
from sllmd.checkpoint.hub_ref import HF_SCHEME, parse_hub_ref
from sllmd.checkpoint.layout import PartitionHasher
from sllmd.checkpoint.manifest import MANIFEST_FILE, Manifest
from sllmd.checkpoint.reader import check_partition, read_manifest_bytes, read_partition
from sllmd.checkpoint.url_fetch import (
    FetchError,
    FetchSettings,
    RepositoryNotFound,
    describe_url,
    fetch_url,
    publish,
)

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what counts as weights in a Hugging Face dir

_COPY_BLOCK_BYTES = 16 << 20  # local copies read and hash this much at a time
_DATA_FILE = re.compile(r"data-\d{5}\.bin")
_DEFAULT_SETTINGS = FetchSettings()

# Called with (phase, bytes done, bytes total) as a fetch progresses: phase "download" (a Hub or GGUF source
# arriving), then "convert" (writing the v1 checkpoint). Calls come from worker threads.
Progress = Callable[[str, int, int], None]


class SourceKind(enum.StrEnum):
    URL = "url"
    HF_DIR = "hf"
    V1_DIR = "v1"
    GGUF = "gguf"
    HUB = "hub"


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source holds, learnt without fetching its weights: for validation at deploy time."""

    source: str  # normalised; a Hub source pinned to its commit
    kind: SourceKind
    num_bytes: int  # v1: the manifest's total_bytes; HF and Hub: the weight files' size (the converted size is
    # close); GGUF: the file's size (dequantised it grows: the store makes room again once it is converted)
    config: dict[str, Any] | None  # config.json; None for a GGUF, whose config is known once it is converted
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
    """The canonical spelling of a source: a URL without trailing slashes, a Hub id as `hf://REPO[/FILE][@REV]`,
    or a normalised absolute path. `ValueError` with a readable reason for anything else."""
    source = source.strip()
    if is_url(source):
        parts = urlsplit(source)
        if not parts.hostname:
            raise ValueError(f"{source!r} has no host")
        if parts.query or parts.fragment:
            raise ValueError(f"{source!r}: a checkpoint URL is a base URL, without query or fragment")
        return source.rstrip("/")
    ref = parse_hub_ref(source)
    if ref is not None:
        return ref.source
    if "://" in source:
        raise ValueError(f"{source!r}: only hf://, http:// and https:// sources are supported")
    if not os.path.isabs(source):
        raise ValueError("checkpoint must be a Hugging Face Hub id (org/model[@revision]), an absolute path or an "
                         "http(s):// URL")
    return os.path.normpath(source)


def source_kind(source: str) -> SourceKind:
    """The kind of the normalised `source` (a local path is looked at: v1 if it has a manifest)."""
    if is_url(source):
        return SourceKind.URL
    if source.startswith(HF_SCHEME):
        return SourceKind.HUB
    if source.endswith(".gguf") and not Path(source).is_dir():
        return SourceKind.GGUF
    return SourceKind.V1_DIR if (Path(source) / MANIFEST_FILE).is_file() else SourceKind.HF_DIR


def is_local_dir(source: str) -> bool:
    """Whether `source` is a model directory on this machine that engines can read as it is."""
    return source_kind(source) in (SourceKind.HF_DIR, SourceKind.V1_DIR)


# ---- describe ----------------------------------------------------------------------------------


async def describe(source: str, settings: FetchSettings = _DEFAULT_SETTINGS) -> SourceInfo:
    """Size, config and fingerprint of `source`, reading only small files (the manifest, config.json).

    The fingerprint is the xxh3 of the manifest for v1 sources (URL or directory); the commit for Hub sources
    (which `describe` pins: its `source` names the commit); of the names, sizes and modification times of the
    top-level files for Hugging Face directories and GGUF files. Raises `RepositoryNotFound`,
    `RepositoryUnreachable`, `FetchError`, `ManifestError`, `CheckpointNotFound` or `ConversionError`.
    """
    source = normalize_source(source)
    kind = source_kind(source)
    if kind is SourceKind.URL:
        manifest_bytes, manifest, config_bytes = await describe_url(source, settings)
        config = _parse_config(config_bytes, f"{source}/config.json")
        return SourceInfo(source, kind, manifest.total_bytes, config, xxhash.xxh3_128_hexdigest(manifest_bytes))
    if kind is SourceKind.HUB:
        return await asyncio.to_thread(_describe_hub, source, settings.hub_endpoint)
    if kind is SourceKind.GGUF:
        return await asyncio.to_thread(_describe_gguf, source)
    return await asyncio.to_thread(_describe_dir, source, kind)


def _describe_hub(source: str, endpoint: str | None) -> SourceInfo:
    ref = parse_hub_ref(source)
    assert ref is not None
    pinned = hub.resolve(ref, endpoint=endpoint)
    assert pinned.revision is not None
    files = hub.list_files(pinned, endpoint=endpoint)
    if pinned.filename is not None:
        return SourceInfo(pinned.source, SourceKind.HUB, files[pinned.filename], None, pinned.revision)
    config = _parse_config(hub.read_file(pinned, "config.json", endpoint=endpoint), f"{pinned.source}/config.json")
    num_bytes = sum(files[path] for path in hub.select_model_files(files) if path.endswith(WEIGHT_SUFFIXES))
    return SourceInfo(pinned.source, SourceKind.HUB, num_bytes, config, pinned.revision)


def _describe_gguf(source: str) -> SourceInfo:
    path = Path(source)
    if not path.is_file():
        raise RepositoryNotFound(f"GGUF file {path} does not exist")
    if not is_gguf_file(path):
        raise ConversionError(f"{path} is not a GGUF file")
    st = path.stat()
    stamp = f"{path.name}\t{st.st_size}\t{st.st_mtime_ns}"
    return SourceInfo(source, SourceKind.GGUF, st.st_size, None, xxhash.xxh3_128_hexdigest(stamp.encode()))


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


async def fetch(source: str, dst: Path, *, work_dir: Path, settings: FetchSettings = _DEFAULT_SETTINGS,
                progress: Progress | None = None, show_bars: bool = False) -> FetchReport:
    """Make `dst` (which must not exist) a verified v1 checkpoint of `source`, atomically.

    `work_dir` is where a URL fetch keeps its partial files between attempts: pass the same one to
    resume. It must be on `dst`'s filesystem; it is gone after success and after any error that a retry
    cannot fix (checksums, a changed or invalid manifest, 404), and kept after transient ones. A Hub download
    lives in huggingface_hub's cache instead, which keeps every file it completed. `progress` hears how a
    download and a conversion advance; `show_bars` draws progress bars on stderr (the CLI's).
    """
    source, dst, start = normalize_source(source), Path(dst), time.monotonic()
    kind = source_kind(source)
    if os.path.lexists(dst):
        raise FetchError(f"{dst} already exists")
    if kind in (SourceKind.HF_DIR, SourceKind.GGUF, SourceKind.HUB):
        fingerprint = await asyncio.to_thread(_convert, source, kind, dst, settings.hub_endpoint, progress, show_bars)
        report = FetchReport(source, kind, _dir_bytes(dst), time.monotonic() - start, fingerprint)
    elif kind is SourceKind.V1_DIR:
        num_bytes, fingerprint = await asyncio.to_thread(_copy_v1, Path(source), dst, work_dir)
        report = FetchReport(source, kind, num_bytes, time.monotonic() - start, fingerprint)
    else:
        fetched = await fetch_url(source, dst, work_dir, settings)
        report = FetchReport(source, kind, fetched.num_bytes, time.monotonic() - start, fetched.fingerprint,
                             fetched.num_retries, fetched.num_refetched_chunks)
    log.info("checkpoint fetched", extra={"source": source, "kind": kind.value, "bytes": report.num_bytes,
                                          "seconds": round(report.seconds, 3), "gb_per_s": round(report.gb_per_s, 3),
                                          "retries": report.num_retries})
    return report


def _convert(source: str, kind: SourceKind, dst: Path, hub_endpoint: str | None, progress: Progress | None,
             show_bars: bool) -> str:
    """Convert a Hugging Face directory, a GGUF file or a Hub model into `dst`; returns the source's fingerprint.
    Blocking. Torch and transformers are imported here: only conversions need them."""
    from sllmd.checkpoint.convert import convert
    from sllmd.checkpoint.gguf import convert_gguf

    def converting(done: int, total: int) -> None:
        if progress is not None:
            progress("convert", done, total)

    if kind is SourceKind.HUB:
        ref = parse_hub_ref(source)
        assert ref is not None and ref.revision is not None  # deploy pinned it
        local = hub.download(ref, endpoint=hub_endpoint, show_bar=show_bars,
                             progress=None if progress is None else lambda done, total: progress("download", done,
                                                                                                 total))
        fingerprint = ref.revision
    else:
        local = Path(source)
        info = _describe_gguf(source) if kind is SourceKind.GGUF else _describe_dir(source, kind)
        fingerprint = info.fingerprint
    if local.is_file():
        convert_gguf(local, dst, progress=show_bars, on_progress=converting)
    else:
        convert(local, dst, progress=show_bars, on_progress=converting)
    return fingerprint


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


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
        publish(work_dir, dst)
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
