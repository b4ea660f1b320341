"""DRAM warming: copy popular models' checkpoints from this node's SSD store into its DRAM cache ahead of
their next cold start, so that start is a DRAM hit (copy-only) instead of an SSD read.

Popularity is each model's request rate as this node sees it (requests it receives, served here or relayed
elsewhere), an exponentially decaying count (time constant RATE_TAU_S).
Which models to warm is `scheduler.placement.plan_dram_warming`'s decision (most requested first, within
the cache's free bytes, never a model already cached); this module only feeds it and does the copies.
Warming is event-driven: it is considered when an instance stops (its model just left the device, a
start may come soon) and when a checkpoint arrives in the store; never on a timer. One copy at a time,
off the event loop; a copy is the loader's own CPU load with the DRAM cache, released at once.

Not thread-safe: call from the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from sllmd.checkpoint.dram import DramCache
from sllmd.checkpoint.loader import load_checkpoint
from sllmd.checkpoint.store import CheckpointStore, checkpoint_id, reads_store
from sllmd.errors import SllmdError
from sllmd.scheduler.estimate import Calibration
from sllmd.scheduler.placement import NodeState, plan_dram_warming
from sllmd.state.models import Deployment

log = logging.getLogger(__name__)

RATE_TAU_S = 300.0  # popularity forgets over ~5 minutes


class DramWarmer:
    def __init__(self, store: CheckpointStore, dram_cache: DramCache,
                 deployments: Callable[[], dict[str, Deployment]]) -> None:
        """`deployments()`: the models warming may consider now (by name)."""
        self.store = store
        self.dram_cache = dram_cache
        self.deployments = deployments
        self._rates: dict[str, tuple[float, float]] = {}  # model -> (rate per second, at time.monotonic())
        self._warming: asyncio.Task | None = None

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

    def plan(self) -> list[str]:
        deployments = self.deployments()
        stored = {name: d for name, d in deployments.items()
                  if reads_store(d.backend, d.checkpoint) and self.store.contains(checkpoint_id(d.checkpoint))}
        cached_ids = {Path(path).name for path, _ in self.dram_cache.lru_keys()}
        cached = frozenset(n for n, d in stored.items() if checkpoint_id(d.checkpoint) in cached_ids)
        node = NodeState("self", True, 0, Calibration.defaults(), dram_models=cached,
                         ssd_models=frozenset(stored),
                         free_dram_bytes=self.dram_cache.budget_bytes - self.dram_cache.used_bytes)
        return plan_dram_warming(self.rates(), {n: d.checkpoint_bytes for n, d in stored.items()}, node)

    async def _warm(self, model: str) -> None:
        deployment = self.deployments().get(model)
        if deployment is None:
            return
        cid = checkpoint_id(deployment.checkpoint)
        try:
            with self.store.pinned(cid) as path:
                began = time.monotonic()
                loaded = await asyncio.to_thread(load_checkpoint, path, "cpu", dram_cache=self.dram_cache)
                loaded.release()
        except (KeyError, OSError, ValueError, SllmdError) as exc:  # evicted meanwhile, or unreadable: a start reads it
            log.warning("could not warm a checkpoint into DRAM", extra={"model": model, "error": repr(exc)})
            return
        log.info("warmed a checkpoint into DRAM", extra={"model": model, "bytes": loaded.report.num_bytes,
                                                          "seconds": round(time.monotonic() - began, 3)})
        self.consider()

    async def close(self) -> None:
        """Wait for a copy under way (a thread cannot be interrupted mid-read)."""
        if self._warming is not None:
            await asyncio.gather(self._warming, return_exceptions=True)
