"""DRAM warming: bring popular models' checkpoints from this node's SSD store into DRAM ahead of their next
cold start, so that start is a DRAM hit instead of an SSD read.

Which DRAM depends on where the backend loads its weights:
* in the daemon (transformers): the daemon's DRAM cache (`DramCache`). A copy is the loader's own CPU load
  with the cache, released at once.
* in a process of its own (vLLM's worker; `PAGE_CACHE_BACKENDS`): the kernel's page cache over the store's
  files, the only memory that process shares with the daemon. A copy reads the files once, buffered
  (`read_into_page_cache`); the engine's load then copies from the page cache and reports tier "dram".

Budget: both share `store.dram_budget_gb`. Warming brings page-cache bytes in only within the budget less
the DRAM cache's used bytes less the page-cache bytes it brought in earlier that are still resident
(`free_bytes`). This bounds what warming adds, not the page cache: the kernel may evict those clean pages
at any moment (under memory pressure; they never cause an out-of-memory kill), after which the model is on
SSD again (a start's residency check reports "ssd"; warming may bring it back); other reads (a fetch
writing the files) can leave files resident outside the budget; and the DRAM cache, which does not see
page-cache bytes, may still fill its whole budget, so DRAM held for checkpoints stays below twice the budget.

Popularity is each model's request rate as this node sees it (requests it receives, served here or relayed
elsewhere), an exponentially decaying count (time constant RATE_TAU_S).
Which models to warm is `scheduler.placement.plan_dram_warming`'s decision (most requested first, within
the free bytes, never a model already in its DRAM); this module only feeds it and does the copies.
Warming is event-driven: it is considered when an instance stops (its model just left the device, a
start may come soon) and when a checkpoint arrives in the store; never on a timer. One copy at a time,
off the event loop.

`DramWarmer` is not thread-safe: call it from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from sllmd.checkpoint.dram import DramCache
from sllmd.checkpoint.errors import CheckpointError
from sllmd.checkpoint.loader import load_checkpoint
from sllmd.checkpoint.reader import read_manifest, read_partition, resident_fraction
from sllmd.checkpoint.store import CheckpointStore, checkpoint_id, reads_store
from sllmd.errors import SllmdError
from sllmd.scheduler.estimate import Calibration
from sllmd.scheduler.placement import NodeState, plan_dram_warming
from sllmd.state.models import Deployment
from sllmd.types import Backend

log = logging.getLogger(__name__)

RATE_TAU_S = 300.0  # popularity forgets over ~5 minutes
# Backends whose engines load in a process of their own, which cannot see the daemon's DRAM cache.
PAGE_CACHE_BACKENDS = frozenset({Backend.VLLM})
_READ_BYTES = 16 << 20  # one reusable buffer for warming reads
# Pages asked per residency check on the event loop (NODE_STATUS asks every STATUS_INTERVAL_S): ~1 ms whatever
# the size, where asking every page costs ~14 ms per GiB. A checkpoint missing 2% of its pages is caught 99% of
# the time; the start itself counts every page (`sllmd.engine.vllm_loader`).
RESIDENCY_SAMPLES = 256


def is_page_cache_tier(deployment: Deployment) -> bool:
    """Whether `deployment`'s DRAM tier is the page cache over its store files (not the DRAM cache)."""
    return deployment.backend in PAGE_CACHE_BACKENDS


def is_page_cached(store: CheckpointStore, cid: str) -> bool:
    """Whether store entry `cid` is there and its data files are in the page cache now, judged by
    RESIDENCY_SAMPLES pages (False too when its files cannot be read: a start would find out)."""
    if not store.contains(cid):
        return False
    try:
        return resident_fraction(store.path_of(cid), num_samples=RESIDENCY_SAMPLES) == 1.0
    except (CheckpointError, OSError):
        return False


def dram_cache_ids(dram_cache: DramCache | None) -> list[str]:
    """Store ids of the checkpoints in the daemon's DRAM cache (its keys are store paths), least recent first."""
    return [Path(path).name for path, _ in dram_cache.lru_keys()] if dram_cache is not None else []


def is_in_dram(deployment: Deployment, store: CheckpointStore, dram_cache: DramCache | None) -> bool:
    """Whether a start of `deployment` here would load from DRAM: its store files in the page cache for a
    page-cache backend, its entry in the daemon's DRAM cache for the others."""
    cid = checkpoint_id(deployment.checkpoint)
    if is_page_cache_tier(deployment):
        return is_page_cached(store, cid)
    return cid in dram_cache_ids(dram_cache)


def page_cached_checkpoints(store: CheckpointStore, deployments: Iterable[Deployment]) -> set[str]:
    """Store ids of the page-cache-tier `deployments`' checkpoints that are wholly resident now."""
    ids = {checkpoint_id(d.checkpoint) for d in deployments if is_page_cache_tier(d)}
    return {cid for cid in ids if is_page_cached(store, cid)}


def read_into_page_cache(path: Path) -> int:
    """Read every data file of checkpoint directory `path` once, buffered and sequentially, so the page
    cache holds it (until the kernel evicts it); returns the bytes read. Blocking: run it in a thread."""
    manifest = read_manifest(path)
    buffer = memoryview(bytearray(_READ_BYTES))
    for index in range(len(manifest.partitions)):
        for _ in read_partition(path, manifest, index, buffer):
            pass
    return manifest.total_bytes


class DramWarmer:
    def __init__(self, store: CheckpointStore, dram_cache: DramCache,
                 deployments: Callable[[], dict[str, Deployment]]) -> None:
        """`deployments()`: the models warming may consider now (by name)."""
        self.store = store
        self.dram_cache = dram_cache
        self.deployments = deployments
        self._rates: dict[str, tuple[float, float]] = {}  # model -> (rate per second, at time.monotonic())
        self._warming: asyncio.Task | None = None
        self._page_cached: dict[str, int] = {}  # store id -> bytes warming read into the page cache

    def note_request(self, model: str) -> None:
        now = time.monotonic()
        rate, at = self._rates.get(model, (0.0, now))
        self._rates[model] = (rate * math.exp(-(now - at) / RATE_TAU_S) + 1.0 / RATE_TAU_S, now)

    def rates(self) -> dict[str, float]:
        now = time.monotonic()
        return {m: rate * math.exp(-(now - at) / RATE_TAU_S) for m, (rate, at) in self._rates.items()}

    def consider(self) -> None:
        """Start warming the most deserving model, unless a copy is under way (it considers again when done)."""
        if self._warming is not None and not self._warming.done():
            return
        chosen = self.plan()
        if chosen:
            self._warming = asyncio.get_running_loop().create_task(self._warm(chosen[0]))

    def free_bytes(self) -> int:
        """Bytes of the DRAM budget left for warming: the DRAM cache's free bytes less the page-cache bytes
        warming brought in that are still resident (those evicted meanwhile are forgotten here)."""
        self._page_cached = {cid: n for cid, n in self._page_cached.items() if is_page_cached(self.store, cid)}
        return max(0, self.dram_cache.budget_bytes - self.dram_cache.used_bytes - sum(self._page_cached.values()))

    def plan(self) -> list[str]:
        deployments = self.deployments()
        stored = {name: d for name, d in deployments.items()
                  if reads_store(d.backend, d.checkpoint) and self.store.contains(checkpoint_id(d.checkpoint))}
        cached = frozenset(name for name, d in stored.items() if is_in_dram(d, self.store, self.dram_cache))
        node = NodeState("self", True, 0, Calibration.defaults(), dram_models=cached,
                         ssd_models=frozenset(stored), free_dram_bytes=self.free_bytes())
        return plan_dram_warming(self.rates(), {n: d.checkpoint_bytes for n, d in stored.items()}, node)

    async def _warm(self, model: str) -> None:
        deployment = self.deployments().get(model)
        if deployment is None:
            return
        cid = checkpoint_id(deployment.checkpoint)
        into = "page cache" if is_page_cache_tier(deployment) else "DRAM cache"
        try:
            with self.store.pinned(cid) as path:
                began = time.monotonic()
                if is_page_cache_tier(deployment):
                    num_bytes = self._page_cached[cid] = await asyncio.to_thread(read_into_page_cache, path)
                else:
                    loaded = await asyncio.to_thread(load_checkpoint, path, "cpu", dram_cache=self.dram_cache)
                    loaded.release()
                    num_bytes = loaded.report.num_bytes
        except (KeyError, OSError, ValueError, SllmdError) as exc:  # evicted meanwhile, or unreadable: a start reads it
            log.warning("could not warm a checkpoint into DRAM", extra={"model": model, "into": into,
                                                                         "error": repr(exc)})
            return
        seconds = round(time.monotonic() - began, 3)
        if is_page_cache_tier(deployment) and not is_page_cached(self.store, cid):
            # The kernel dropped pages as they were read (memory pressure): warming again now would only repeat that.
            log.warning("a warmed checkpoint left the page cache at once", extra={"model": model, "seconds": seconds})
            return
        log.info("warmed a checkpoint into DRAM", extra={"model": model, "into": into, "bytes": num_bytes,
                                                          "seconds": seconds})
        self.consider()

    async def close(self) -> None:
        """Wait for a copy under way (a thread cannot be interrupted mid-read)."""
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)
