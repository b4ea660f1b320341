"""The node's local SSD store of sllmd v1 checkpoints, under `<data_dir>/store/`.

Layout: `<root>/<id>/` is one complete checkpoint; `<root>/index.json` records each entry's source,
size, fingerprint and last use (wall-clock seconds), so LRU order survives restarts; anything hidden
(`.NAME`) is a fetch or conversion in progress, removed when the store opens (a crash leftover).

An entry's id is derived from its normalised source (`checkpoint_id`), so every node, and every
restart, finds a deployment's checkpoint from the deployment alone. Entries appear only complete: the
fetcher builds them under a hidden name and renames them into place. The store keeps the bytes of its
entries plus those being fetched within `budget_bytes` (less where the disk is smaller), evicting entries that
no instance has pinned: the least valuable first by the node's `eviction_cost` (expected seconds of fetching
again per second, per byte), then the least recently used.

Not thread-safe: every method runs on the event loop. Blocking work (fetches, deletions) runs in
threads; `ensure` of one id by many callers fetches once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import xxhash

from sllmd.checkpoint.errors import CheckpointError, StoreFull
from sllmd.checkpoint.fetch import (
    FetchReport,
    Progress,
    SourceKind,
    describe,
    fetch,
    is_local_dir,
    normalize_source,
    source_kind,
)
from sllmd.checkpoint.manifest import MANIFEST_FILE
from sllmd.checkpoint.progress import human_bytes
from sllmd.checkpoint.url_fetch import FetchSettings
from sllmd.config import StoreConfig
from sllmd.types import Backend, Tier

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
DISK_RESERVE_BYTES = 1 << 30  # disk space the store leaves free for everything else (5% of a small disk)
PEER_PATH = "/internal/checkpoints"  # + "/{id}": where a node serves its store's entries to its peers


def reads_store(backend: Backend, source: str) -> bool:
    """Whether instances of a deployment read the store's copy of `source`: all but the dummy backend,
    which reads only config.json and so serves a local model directory as is."""
    return backend is not Backend.DUMMY or not is_local_dir(source)


class CheckpointInUse(CheckpointError):
    """The operation needs an entry that a running instance has pinned."""


def checkpoint_id(source: str) -> str:
    """A stable, file-name-safe id for a source: a readable stem plus 16 hex digits of its xxh3."""
    source = normalize_source(source)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", source.rstrip("/").rsplit("/", 1)[-1]).strip(".-")[:48] or "checkpoint"
    return f"{stem}-{xxhash.xxh3_64_hexdigest(source.encode())}"


@dataclass(slots=True)
class StoreEntry:
    id: str
    source: str  # empty for an entry found on disk without an index record
    num_bytes: int
    last_used: float  # time.time() of the last ensure
    fingerprint: str = ""  # `fetch.describe`'s fingerprint of the source when it was fetched


@dataclass(frozen=True, slots=True)
class CheckpointLease:
    """A pinned entry: it stays on disk until `CheckpointStore.release`."""

    id: str
    path: Path
    tier: Tier  # SSD if it was there already, else where this lease fetched it from: PEER or REPOSITORY
    fetch: FetchReport | None = None


class CheckpointStore:
    def __init__(self, root: Path, budget_bytes: int, settings: FetchSettings | None = None,
                 peer_settings: FetchSettings | None = None, *,
                 peer_sources: Callable[[str], Sequence[str]] = lambda checkpoint_id: (),
                 on_fetched: Callable[[Tier, FetchReport], None] = lambda tier, report: None,
                 eviction_cost: Callable[[str, int], float] = lambda checkpoint_id, num_bytes: 0.0) -> None:
        """Open (creating) the store at `root`: remove crash leftovers, reconcile the index with the
        directories, evict down to `budget_bytes`. Blocking; call before the event loop is busy.

        `peer_sources(checkpoint id)`: base URLs (`peer_url`) of other nodes holding it, best first.
        `on_fetched(tier, report)`: called after every completed fetch (the node's estimators learn from it).
        `eviction_cost(checkpoint id, bytes)`: what dropping that entry costs (see the module docstring)."""
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.settings = settings or FetchSettings()
        self.peer_settings = peer_settings or self.settings  # carries the cluster's API key, if any
        self.peer_sources = peer_sources
        self.on_fetched = on_fetched
        self.eviction_cost = eviction_cost
        self._pins: Counter[str] = Counter()
        self._reserved: dict[str, int] = {}  # id -> bytes being fetched
        self._jobs: dict[str, asyncio.Task[tuple[Tier, FetchReport]]] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries = self._open()
        while self.used_bytes > self.budget_bytes and self._entries:
            victim = min(self._entries.values(), key=lambda e: (e.last_used, e.id))
            log.info("store over budget at start, evicting", extra={"checkpoint": victim.id})
            del self._entries[victim.id]
            shutil.rmtree(self.path_of(victim.id), ignore_errors=True)
        self._save_index()

    # -- queries -------------------------------------------------------------------------------

    def path_of(self, id: str) -> Path:
        if not id or id.startswith(".") or "/" in id or id == INDEX_FILE:
            raise ValueError(f"invalid checkpoint id {id!r}")
        return self.root / id

    def contains(self, id: str) -> bool:
        return id in self._entries

    def entries(self) -> list[StoreEntry]:
        """Every entry, least recently used first."""
        return sorted(self._entries.values(), key=lambda e: (e.last_used, e.id))

    @property
    def used_bytes(self) -> int:
        """Bytes of the complete entries plus those reserved by fetches under way."""
        return sum(e.num_bytes for e in self._entries.values()) + sum(self._reserved.values())

    def is_pinned(self, id: str) -> bool:
        return self._pins[id] > 0

    # -- pins ----------------------------------------------------------------------------------

    def pin(self, id: str) -> None:
        """Keep entry `id` from eviction until a matching `unpin`; pins nest. KeyError if absent."""
        if id not in self._entries:
            raise KeyError(id)
        self._pins[id] += 1

    def unpin(self, id: str) -> None:
        if self._pins[id] <= 1:
            self._pins.pop(id, None)
        else:
            self._pins[id] -= 1

    @contextmanager
    def pinned(self, id: str) -> Iterator[Path]:
        self.pin(id)
        try:
            yield self.path_of(id)
        finally:
            self.unpin(id)

    # -- getting checkpoints -------------------------------------------------------------------

    async def ensure(self, source: str, *, refresh: bool = False, progress: Progress | None = None,
                     show_bars: bool = False) -> tuple[Path, Tier]:
        """The local path of `source`'s checkpoint and the tier it came from: SSD if the store had it,
        else PEER or REPOSITORY, where it was fetched (or converted) from now.

        With `refresh`, an entry whose source changed since it was fetched (see `fetch.describe`) is
        fetched again; `CheckpointInUse` if an instance has it pinned. Fetch errors propagate
        (`url_fetch.FetchError`, `ManifestError`, `ConversionError`, `ChecksumMismatch`, `StoreFull`, ...).
        `progress` and `show_bars` go to the repository fetch this call starts (see `fetch.fetch`), if any.
        """
        lease = await self._ensure(source, refresh=refresh, pin=False, progress=progress, show_bars=show_bars)
        return lease.path, lease.tier

    async def acquire(self, source: str, *, progress: Progress | None = None) -> CheckpointLease:
        """`ensure` and `pin` in one step (no eviction can come between): for an instance's lifetime. `progress`
        hears the repository fetch this call starts, if any, as in `ensure`."""
        return await self._ensure(source, refresh=False, pin=True, progress=progress)

    def release(self, lease: CheckpointLease) -> None:
        self.unpin(lease.id)

    async def remove(self, id: str) -> bool:
        """Delete entry `id` now; False if absent. `CheckpointInUse` if pinned."""
        if id not in self._entries:
            return False
        if self.is_pinned(id):
            raise CheckpointInUse(f"checkpoint {id} is in use by a running instance")
        await self._delete(id)
        return True

    async def close(self) -> None:
        """Cancel fetches under way (their verified chunks are not kept: the next open cleans up)."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def _ensure(self, source: str, *, refresh: bool, pin: bool, progress: Progress | None = None,
                      show_bars: bool = False) -> CheckpointLease:
        source = normalize_source(source)
        cid = checkpoint_id(source)
        tier, report = Tier.SSD, None
        # A Hub source names a commit (deploy pins it), whose files never change.
        if refresh and cid in self._entries and cid not in self._jobs and source_kind(source) is not SourceKind.HUB:
            await self._drop_if_stale(cid, source)
        while True:
            entry = self._entries.get(cid)
            if entry is not None:  # checked and pinned with no await in between: eviction cannot interleave
                entry.last_used = time.time()
                self._save_index()
                if pin:
                    self.pin(cid)
                return CheckpointLease(cid, self.path_of(cid), tier, report)
            job = self._jobs.get(cid)
            if job is None or job.done():
                job = self._jobs[cid] = asyncio.get_running_loop().create_task(
                    self._fetch(cid, source, progress, show_bars))
                job.add_done_callback(self._job_done)
            tier, report = await asyncio.shield(job)
            # Loop: the entry is normally there now, but could have been evicted before we resumed.

    def _job_done(self, job: asyncio.Task[tuple[Tier, FetchReport]]) -> None:
        for cid, current in list(self._jobs.items()):
            if current is job:
                del self._jobs[cid]
        if not job.cancelled():
            job.exception()  # retrieved: every waiter got it already, or none is left to

    async def _drop_if_stale(self, cid: str, source: str) -> None:
        entry = self._entries[cid]
        info = await describe(source, self.settings)
        if cid not in self._entries or entry.fingerprint == info.fingerprint:
            return
        if self.is_pinned(cid):
            raise CheckpointInUse(f"{source} changed since it was stored, and a running instance uses the stored "
                                  "copy; stop its instances (or wait for keep-alive) and deploy again")
        log.info("source changed since it was stored, fetching it again", extra={"checkpoint": cid, "source": source})
        await self._delete(cid)

    async def _fetch(self, cid: str, source: str, progress: Progress | None = None,
                     show_bars: bool = False) -> tuple[Tier, FetchReport]:
        """(tier it came from, report). Peers holding `cid` go first; one that fails is skipped (logged). The
        repository is last, so a checkpoint still reaches this node while its repository is down."""
        for peer in self.peer_sources(cid):
            try:
                report = await self._fetch_from(cid, source, peer, self.peer_settings)
            except (CheckpointError, OSError) as exc:
                log.warning("peer could not supply the checkpoint; trying the next source",
                            extra={"checkpoint": cid, "peer": peer, "error": repr(exc)})
                shutil.rmtree(self.root / f".{cid}.partial", ignore_errors=True)  # a peer's chunks: not resumable
                continue
            self.on_fetched(Tier.PEER, report)
            return Tier.PEER, report
        report = await self._fetch_from(cid, source, source, self.settings, progress, show_bars)
        self.on_fetched(Tier.REPOSITORY, report)
        return Tier.REPOSITORY, report

    async def _fetch_from(self, cid: str, source: str, origin: str, settings: FetchSettings,
                          progress: Progress | None = None, show_bars: bool = False) -> FetchReport:
        """Entry `cid` (of `source`) fetched from `origin`: `source` itself or a peer's copy of it. A peer's
        fingerprint is its v1 manifest's, so a later refresh of an HF-directory source fetches it again."""
        info = await describe(origin, settings)
        need = info.num_bytes
        await self._make_room(need, for_id=cid)
        self._reserved[cid] = need
        try:
            report = await fetch(origin, self.path_of(cid), work_dir=self.root / f".{cid}.partial", settings=settings,
                                 progress=progress, show_bars=show_bars)
        finally:
            del self._reserved[cid]
        self._entries[cid] = StoreEntry(cid, source, report.num_bytes, time.time(), info.fingerprint)
        self._save_index()
        if self.used_bytes > self.budget_bytes:  # the estimate was short (padding, side files)
            await self._make_room(0, for_id=cid)
        return report

    def limit_bytes(self) -> int:
        """What the store may hold now: its budget, or less where its disk is smaller: the entries' bytes plus
        the disk's free space, less a reserve (5% of the disk, at most DISK_RESERVE_BYTES) for everything else."""
        disk = shutil.disk_usage(self.root)
        on_disk = sum(e.num_bytes for e in self._entries.values())
        return max(0, min(self.budget_bytes, on_disk + disk.free - min(DISK_RESERVE_BYTES, disk.total // 20)))

    async def _make_room(self, need: int, *, for_id: str) -> None:
        """Evict unpinned entries, least valuable first, until `need` more bytes fit `limit_bytes`."""
        limit = self.limit_bytes()
        if need > limit:
            raise StoreFull(f"checkpoint needs {human_bytes(need)}, more than this node's store can hold "
                            f"({human_bytes(limit)}: store.ssd_budget_gb is {human_bytes(self.budget_bytes)}, "
                            "less where the disk is smaller)")
        while self.used_bytes + need > limit:
            candidates = [e for e in self.entries() if not self.is_pinned(e.id) and e.id != for_id]
            if not candidates:
                pinned = sum(e.num_bytes for e in self._entries.values() if self.is_pinned(e.id))
                fetching = sum(self._reserved.values())
                raise StoreFull(f"checkpoint needs {human_bytes(need)}; the store can hold {human_bytes(limit)}, "
                                f"{human_bytes(pinned)} of it pinned by running instances and "
                                f"{human_bytes(fetching)} being fetched")
            victim = min(candidates, key=lambda e: (self.eviction_cost(e.id, e.num_bytes) / max(1, e.num_bytes),
                                                    e.last_used, e.id))
            log.info("evicting checkpoint from the store", extra={"checkpoint": victim.id, "bytes": victim.num_bytes,
                                                                   "for": for_id})
            await self._delete(victim.id)
            limit = self.limit_bytes()  # the disk may hold more now

    async def _delete(self, cid: str) -> None:
        """Forget the entry at once (so nothing new uses it), then move it aside and delete it."""
        del self._entries[cid]
        self._save_index()
        path = self.path_of(cid)
        doomed = self.root / f".{cid}.deleting-{time.monotonic_ns()}"
        try:
            os.rename(path, doomed)  # the id's path is free at once, even while the delete runs
        except FileNotFoundError:
            return
        await asyncio.to_thread(shutil.rmtree, doomed, True)

    # -- persistence ---------------------------------------------------------------------------

    def _open(self) -> dict[str, StoreEntry]:
        num_leftovers = 0
        for child in self.root.iterdir():
            if child.name.startswith("."):
                num_leftovers += 1
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        if num_leftovers:
            log.info("removed unfinished fetches of a previous run", extra={"count": num_leftovers})
        recorded = self._load_index()
        entries: dict[str, StoreEntry] = {}
        for child in self.root.iterdir():
            if child.name == INDEX_FILE:
                continue
            if not child.is_dir() or child.is_symlink() or not (child / MANIFEST_FILE).is_file():
                log.warning("removing a store entry that is not a checkpoint", extra={"path": str(child)})
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
                continue
            num_bytes = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
            entry = recorded.get(child.name) or StoreEntry(child.name, "", 0, child.stat().st_mtime)
            entry.num_bytes = num_bytes
            entries[child.name] = entry
        return entries

    def _load_index(self) -> dict[str, StoreEntry]:
        try:
            raw = json.loads((self.root / INDEX_FILE).read_bytes())
            return {e["id"]: StoreEntry(e["id"], str(e["source"]), int(e["num_bytes"]), float(e["last_used"]),
                                        str(e.get("fingerprint", ""))) for e in raw["entries"]}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("store index unreadable; rebuilding it from the directories", extra={"error": repr(exc)})
            return {}

    def _save_index(self) -> None:
        """Write-and-rename without fsync: the index only orders eviction and detects changed sources,
        and after a crash it is rebuilt from the directories (entries themselves are fsynced)."""
        data = json.dumps({"version": 1, "entries": [asdict(e) for e in self.entries()]}, indent=1).encode()
        tmp = self.root / f".{INDEX_FILE}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / INDEX_FILE)


def peer_url(http_address: str, id: str) -> str:
    """The base URL under which the node at `http_address` serves its store entry `id` (a v1 checkpoint)."""
    return f"http://{http_address}{PEER_PATH}/{id}"


def open_store(data_dir: Path, config: StoreConfig, *, api_key: str | None = None,
               peer_sources: Callable[[str], Sequence[str]] = lambda checkpoint_id: (),
               on_fetched: Callable[[Tier, FetchReport], None] = lambda tier, report: None,
               eviction_cost: Callable[[str, int], float] = lambda checkpoint_id, num_bytes: 0.0) -> CheckpointStore:
    """The node's store at `<data_dir>/store`, with the configured budget and fetch settings; `api_key`
    authenticates its fetches from peers (`peer_sources`, `on_fetched`, `eviction_cost`: see
    `CheckpointStore`)."""
    settings = FetchSettings(connections=config.fetch_connections, request_bytes=config.fetch_request_mb << 20,
                             timeout_s=config.fetch_timeout_s, retries=config.fetch_retries,
                             hub_endpoint=config.hub_endpoint or None)
    return CheckpointStore(Path(data_dir) / "store", int(config.ssd_budget_gb * 2**30), settings,
                           # One retry: a peer that fails is skipped for the repository, not waited for.
                           dataclasses.replace(settings, bearer_token=api_key, retries=1),
                           peer_sources=peer_sources, on_fetched=on_fetched, eviction_cost=eviction_cost)

