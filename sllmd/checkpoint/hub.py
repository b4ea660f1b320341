"""The Hugging Face Hub client: models named by Hub id (`sllmd.checkpoint.hub_ref`), resolved to a commit and
downloaded with huggingface_hub's own code.

Contract:
* `resolve` pins a ref to the commit sha its revision (default "main") points to; every other function
  works at one commit, so a download never mixes files of two commits.
* `download` puts the files a causal LM needs (or the one named file) into huggingface_hub's cache
  (`HF_HUB_CACHE`, else `HF_HOME/hub`, or `cache_dir`) and returns the snapshot directory (or the file).
  Files already in the cache at that commit are not fetched again.
* `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE` and the cache variables are honoured because huggingface_hub
  reads them (all but HF_TOKEN once, at import); `endpoint=` / `token=` override them when given. `resolve`,
  `list_files` and `download` always ask the Hub (offline they raise `RepositoryUnreachable`, even for a
  cached model); `read_file` at a commit sha is served from the cache.
* Errors are sllmd's (`sllmd.checkpoint.url_fetch`): `RepositoryNotFound` (no such repo, revision or file,
  or no access: private, gated, bad token), `RepositoryUnreachable` (connection refused, reset or timed out,
  408/429/5xx, offline mode), `FetchError` (anything else the Hub answered that we cannot use). Local
  filesystem errors (`OSError` with an errno: disk full, permissions) propagate unchanged.

Resuming and retries (huggingface_hub 2.4's own): within one call a transfer cut mid-body, refused or timed
out is retried 1 s later with `Range: bytes=N-`, N the bytes written so far, a multiple of its 10 MiB read
size (`constants.DOWNLOAD_CHUNK_SIZE`), so a cut in the first 10 MiB restarts at 0; it gives up after 5
retries without new bytes. A 5xx or 4xx answer to a download GET fails the call at once, while a 5xx to the
HEAD before it is retried for about 23 s (1+2+4+8+8). Across calls nothing is resumed: every download
writes a process-unique `<etag>.<random>.incomplete` that is deleted when it fails, so a failed call keeps
only the files it finished (a later call skips those) and the next call restarts the file it was in.

Every function blocks (network and disk); callers run them in threads.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx2
from huggingface_hub import (
    HfApi,
    RepoFile,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub import try_to_load_from_cache as _cached_path
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import tqdm as hf_tqdm

from sllmd.checkpoint.hub_ref import HubRef, check_filename
from sllmd.checkpoint.url_fetch import FetchError, RepositoryNotFound, RepositoryUnreachable

log = logging.getLogger(__name__)

DEFAULT_REVISION = "main"

# What a causal LM needs from a model repo, matched against files at the top of the repo only: config and
# generation config, tokenizer files (tokenizer.json, vocab/merges, sentencepiece, tiktoken), chat templates,
# and the weights. Sub-folders (onnx/, original/, gguf/ ...) hold other formats of the same model.
MODEL_FILE_PATTERNS = ("*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken", "*.safetensors")
# Weights taken only when the repo has no safetensors (older repos): pickled PyTorch state dicts.
FALLBACK_WEIGHT_PATTERNS = ("*.bin",)

MAX_READ_FILE_BYTES = 256 << 20
_API_TIMEOUT_S = 30.0  # HfApi calls have no timeout unless given one
_COMMIT_SHA_CHARS = frozenset("0123456789abcdef")
_WEIGHT_INDEX = {".safetensors": "model.safetensors.index.json", ".bin": "pytorch_model.bin.index.json"}
# The huggingface_hub progress bars that count file bytes as they land on disk: snapshot_download's
# aggregate (every file's bytes, and the bytes a resumed transfer already had), and a single hf_hub_download's
# plain-HTTP or Xet bar. Its other bars (files done, network transfer) would count the same bytes twice.
_BYTE_BARS = frozenset({"huggingface_hub.snapshot_download", "huggingface_hub.http_get", "huggingface_hub.xet_get"})

Progress = Callable[[int, int], None]


def resolve(ref: HubRef, *, endpoint: str | None = None, token: str | None = None) -> HubRef:
    """`ref` with its revision replaced by the commit sha it points to now (revision None means "main").
    With a filename, also checks that the file exists at that commit."""
    sha = _model_info(ref, endpoint=endpoint, token=token).sha
    pinned = replace(ref, revision=sha)
    if ref.filename is not None:
        _file_size(pinned, ref.filename, endpoint=endpoint, token=token)
    return pinned


def list_files(ref: HubRef, *, endpoint: str | None = None, token: str | None = None) -> dict[str, int]:
    """Every file of the repo at the ref's revision (default "main"): path in the repo → size in bytes."""
    return _list_files(_model_info(ref, endpoint=endpoint, token=token, files_metadata=True), ref,
                       endpoint=endpoint, token=token)


def read_file(ref: HubRef, filename: str, *, endpoint: str | None = None, token: str | None = None,
              cache_dir: str | Path | None = None, max_bytes: int = MAX_READ_FILE_BYTES) -> bytes:
    """The bytes of the small file `filename` (e.g. `config.json`) of the ref's repo at its commit, through
    huggingface_hub's cache. `FetchError` if it is over `max_bytes`."""
    check_filename(filename)
    sha = _commit_of(ref, endpoint=endpoint, token=token)
    at = replace(ref, revision=sha, filename=filename)
    with _hub_errors(at, endpoint):
        path = hf_hub_download(ref.repo_id, filename, revision=sha, tqdm_class=_progress_bar_class(None, False),
                               **_hub_kwargs(endpoint, token, cache_dir))
    size = os.path.getsize(path)
    if size > max_bytes:
        raise FetchError(f"{filename} in {at.source} is {size} bytes, over the {max_bytes}-byte limit")
    return Path(path).read_bytes()


def select_model_files(files: dict[str, int] | list[str]) -> list[str]:
    """The files of a model repo that `download` fetches for a snapshot ref: top-level files matching
    `MODEL_FILE_PATTERNS`, plus `FALLBACK_WEIGHT_PATTERNS` when there are no safetensors. Sorted."""
    top = [path for path in files if "/" not in path]
    selected = {path for path in top if _matches(path, MODEL_FILE_PATTERNS)}
    if not any(path.endswith(".safetensors") for path in selected):
        selected |= {path for path in top if _matches(path, FALLBACK_WEIGHT_PATTERNS)}
    return sorted(selected)


def download(ref: HubRef, *, endpoint: str | None = None, token: str | None = None,
             cache_dir: str | Path | None = None, progress: Progress | None = None,
             show_bar: bool = False) -> Path:
    """Download the ref at the commit its revision points to into huggingface_hub's cache and return the
    local path: the snapshot directory for a snapshot ref (the files `select_model_files`
    picks, narrowed to the shards a weight index names), or the file for a filename ref.

    `progress(bytes_done, bytes_total)` is called from download threads, one call at a time, as bytes
    land: first with the bytes already cached, then increasing (never decreasing) to `bytes_total` on
    success. It must be quick and must not call back into this module. `show_bar` also draws
    huggingface_hub's usual tqdm bars on stderr (they follow its TTY and HF_HUB_DISABLE_PROGRESS_BARS
    rules); without it none are drawn."""
    if ref.filename is not None:
        return _download_file(ref, endpoint=endpoint, token=token, cache_dir=cache_dir, progress=progress,
                              show_bar=show_bar)
    info = _model_info(ref, endpoint=endpoint, token=token, files_metadata=True)
    pinned = replace(ref, revision=info.sha)
    files = _list_files(info, ref, endpoint=endpoint, token=token)
    wanted = _narrow_to_index(select_model_files(files), pinned, endpoint=endpoint, token=token, cache_dir=cache_dir)
    if not any(path.endswith((".safetensors", ".bin")) for path in wanted):
        ggufs = sorted(path for path in files if path.endswith(".gguf"))
        hint = f"; to load a GGUF file, name it, e.g. {replace(pinned, filename=ggufs[0]).source}" if ggufs else ""
        raise FetchError(f"{pinned.source} has no *.safetensors or *.bin weights at its top level{hint}")
    counter = _ByteCounter(sum(files[path] for path in wanted), progress)
    counter.add_initial(sum(files[path] for path in wanted if _is_cached(pinned, path, cache_dir)))
    with _hub_errors(pinned, endpoint):
        snapshot = snapshot_download(
            ref.repo_id, revision=info.sha, allow_patterns=[glob.escape(path) for path in wanted],
            tqdm_class=_progress_bar_class(counter, show_bar), **_hub_kwargs(endpoint, token, cache_dir))
    return Path(snapshot)


# ---- internals ---------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _is_commit_sha(revision: str | None) -> bool:
    return revision is not None and len(revision) == 40 and set(revision) <= _COMMIT_SHA_CHARS


def _endpoint(endpoint: str | None) -> str:
    return (endpoint or constants.ENDPOINT).rstrip("/")


def _hub_kwargs(endpoint: str | None, token: str | None, cache_dir: str | Path | None) -> dict[str, Any]:
    """Only what was given: huggingface_hub falls back to HF_ENDPOINT, HF_TOKEN and its cache by itself."""
    kwargs: dict[str, Any] = {}
    if endpoint is not None:
        kwargs["endpoint"] = endpoint.rstrip("/")
    if token is not None:
        kwargs["token"] = token
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    return kwargs


def _api(endpoint: str | None, token: str | None) -> HfApi:
    return HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token, library_name="sllmd")


@contextmanager
def _hub_errors(ref: HubRef, endpoint: str | None) -> Iterator[None]:
    """Turn huggingface_hub's and httpx2's errors about `ref` into sllmd's (see the module docstring)."""
    revision = ref.revision or DEFAULT_REVISION
    where = f"{ref.repo_id}@{revision}"
    hub = _endpoint(endpoint)
    try:
        yield
    except FetchError:
        raise
    except RevisionNotFoundError:
        raise RepositoryNotFound(f"revision {revision!r} not found in repo {ref.repo_id} on {hub}") from None
    except RemoteEntryNotFoundError as exc:
        url_path = exc.response.url.path if exc.response is not None else "?"
        filename = ref.filename or unquote(url_path.rsplit("/", 1)[-1])
        raise RepositoryNotFound(f"file {filename!r} not found in repo {ref.repo_id} at revision {revision} "
                                 f"on {hub}") from None
    except GatedRepoError:
        raise RepositoryNotFound(f"repo {ref.repo_id} on {hub} is gated: accept its terms on the Hub with the "
                                 "account whose token sllmd uses (HF_TOKEN)") from None
    except RepositoryNotFoundError as exc:
        status = exc.response.status_code if exc.response is not None else 404
        # the Hub answers 401 for a missing repo too, when the request has no valid token
        why = "or it is private and the token (HF_TOKEN) is missing or not allowed" if status == 401 else \
            "or it is private: set HF_TOKEN"
        raise RepositoryNotFound(f"repo {ref.repo_id} not found on {hub} (HTTP {status}), {why}") from None
    except OfflineModeIsEnabled:
        raise RepositoryUnreachable(f"{where}: HF_HUB_OFFLINE is set, so the Hub is not asked") from None
    except LocalEntryNotFoundError as exc:
        # huggingface_hub's "could not reach the Hub and the file is not cached"; the cause says why
        cause = exc.__cause__ or exc
        raise RepositoryUnreachable(f"{hub} unreachable for {where}: {_first_line(cause)}") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if status in (401, 403):
            raise RepositoryNotFound(f"no access to {where} on {hub} (HTTP {status}): check the token (HF_TOKEN)"
                                     ) from None
        if status in (408, 429) or status >= 500:
            raise RepositoryUnreachable(f"{hub} answered HTTP {status} for {where}") from None
        raise FetchError(f"{hub} answered {_first_line(exc)} for {where}") from None
    except httpx2.TransportError as exc:  # refused, reset, timed out, cut mid-body, proxy
        raise RepositoryUnreachable(f"{hub} unreachable for {where}: {_first_line(exc)}") from None
    except (httpx2.HTTPError, FileMetadataError, ValueError, KeyError) as exc:  # KeyError: a malformed answer
        raise FetchError(f"{where} from {hub}: {_first_line(exc)}") from None
    except OSError as exc:
        if exc.errno is not None:
            raise  # the local disk's error, not the Hub's
        # e.g. "Consistency check failed: file should be of size N but has size M"
        raise FetchError(f"{where} from {hub}: {_first_line(exc)}") from None


def _model_info(ref: HubRef, *, endpoint: str | None, token: str | None, files_metadata: bool = False) -> Any:
    """`HfApi.model_info` at the ref's revision (default "main"), with a commit sha."""
    revision = ref.revision or DEFAULT_REVISION
    with _hub_errors(replace(ref, revision=revision), endpoint):
        info = _api(endpoint, token).model_info(ref.repo_id, revision=revision, files_metadata=files_metadata,
                                                timeout=_API_TIMEOUT_S)
    if not _is_commit_sha(info.sha):
        raise FetchError(f"{_endpoint(endpoint)} gave no commit sha for {ref.repo_id}@{revision}: {info.sha!r}")
    return info


def _commit_of(ref: HubRef, *, endpoint: str | None, token: str | None) -> str:
    if _is_commit_sha(ref.revision):
        assert ref.revision is not None
        return ref.revision
    return _model_info(ref, endpoint=endpoint, token=token).sha


def _list_files(info: Any, ref: HubRef, *, endpoint: str | None, token: str | None) -> dict[str, int]:
    siblings = info.siblings or []
    if siblings and all(sibling.size is not None for sibling in siblings):
        return {sibling.rfilename: sibling.size for sibling in siblings}
    # A server that lists names without sizes: ask the tree API (it has no timeout; the Hub never needs it)
    pinned = replace(ref, revision=info.sha)
    with _hub_errors(pinned, endpoint):
        return {entry.path: entry.size
                for entry in _api(endpoint, token).list_repo_tree(ref.repo_id, recursive=True, revision=info.sha)
                if isinstance(entry, RepoFile)}


def _file_size(pinned: HubRef, filename: str, *, endpoint: str | None, token: str | None) -> int | None:
    """The size of `filename` at the pinned commit, from a HEAD request; `RepositoryNotFound` if missing."""
    at = replace(pinned, filename=filename)
    with _hub_errors(at, endpoint):
        url = hf_hub_url(pinned.repo_id, filename, revision=pinned.revision, endpoint=_endpoint(endpoint))
        return get_hf_file_metadata(url, token=token, endpoint=endpoint).size


def _is_cached(pinned: HubRef, filename: str, cache_dir: str | Path | None) -> bool:
    return isinstance(_cached_path(pinned.repo_id, filename, cache_dir=cache_dir, revision=pinned.revision), str)


def _narrow_to_index(wanted: list[str], pinned: HubRef, *, endpoint: str | None, token: str | None,
                     cache_dir: str | Path | None) -> list[str]:
    """Drop weight files the weight index does not name (e.g. Mistral's consolidated.safetensors next to
    the sharded model-*.safetensors: the same weights twice). Without a readable index, keep them all."""
    for suffix, index_name in _WEIGHT_INDEX.items():
        if index_name not in wanted:
            continue
        try:
            weight_map = json.loads(read_file(pinned, index_name, endpoint=endpoint, token=token,
                                              cache_dir=cache_dir))["weight_map"]
            shards = set(weight_map.values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("unreadable weight index, downloading every weight file",
                        extra={"source": pinned.source, "index": index_name, "error": repr(exc)})
            continue
        if shards and shards <= set(wanted):
            return [path for path in wanted if not path.endswith(suffix) or path in shards]
    return wanted


def _download_file(ref: HubRef, *, endpoint: str | None, token: str | None, cache_dir: str | Path | None,
                   progress: Progress | None, show_bar: bool) -> Path:
    assert ref.filename is not None
    pinned = replace(ref, revision=_commit_of(ref, endpoint=endpoint, token=token))
    total = _file_size(pinned, ref.filename, endpoint=endpoint, token=token) or 0
    counter = _ByteCounter(total, progress)
    counter.add_initial(total if _is_cached(pinned, ref.filename, cache_dir) else 0)
    with _hub_errors(pinned, endpoint):
        path = hf_hub_download(ref.repo_id, ref.filename, revision=pinned.revision,
                               tqdm_class=_progress_bar_class(counter, show_bar),
                               **_hub_kwargs(endpoint, token, cache_dir))
    return Path(path)


class _ByteCounter:
    """Bytes landed out of a total, shared by every download thread of one call; reports a high-water mark
    (a transfer restarted from 0 takes bytes back, which are not reported until passed again)."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self._total = total
        self._progress = progress
        self._lock = threading.Lock()
        self._raw = 0
        self._reported = -1

    def add_initial(self, num_bytes: int) -> None:
        self.add(num_bytes, force=True)

    def add(self, num_bytes: int, *, force: bool = False) -> None:
        with self._lock:
            self._raw += num_bytes
            done = min(max(self._raw, 0), self._total)
            if self._progress is not None and (done > self._reported or (force and self._reported < 0)):
                self._reported = done
                # under the lock: calls stay in order, so the caller sees them increase
                self._progress(done, self._total)


def _progress_bar_class(counter: _ByteCounter | None, show_bar: bool) -> type[hf_tqdm]:
    """A `tqdm_class` for huggingface_hub: feeds `counter` from the byte-counting bars, and draws nothing
    unless `show_bar` (then huggingface_hub's own rules decide)."""

    class _Bar(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._sllmd_counter = counter if kwargs.get("name") in _BYTE_BARS else None
            if not show_bar:
                kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            if self._sllmd_counter is not None and kwargs.get("initial"):
                self._sllmd_counter.add(int(kwargs["initial"]))

        def update(self, n: float | None = 1) -> bool | None:
            if self._sllmd_counter is not None and n:
                self._sllmd_counter.add(int(n))
            return super().update(n)

    return _Bar
