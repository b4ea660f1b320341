"""This node's start-time estimates: its calibration, where a deployment's checkpoint is, and learning.

`NodeEstimates` owns the node's `Calibration` (probed at start, see `probe.py`, then corrected by every
completed load, store fetch and outgoing migration), shows it in `/metrics`, and answers the two questions
the worker and the leader's placement ask: from which tier would a start of this deployment here read its
checkpoint, and how long would that take. The policy itself (`scheduler/estimate.py`) is pure; this is
its edge on the node. Not thread-safe: use from the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sllmd.checkpoint.fetch import FetchReport
from sllmd.checkpoint.store import CheckpointStore, checkpoint_id, reads_store
from sllmd.metrics import Metrics
from sllmd.scheduler.estimate import LOAD_TIERS, Calibration, load_time_s, transfer_time_s
from sllmd.state.models import Deployment
from sllmd.types import EngineKind, LoadReport, Tier
from sllmd.worker.warming import is_in_dram

if TYPE_CHECKING:
    from sllmd.checkpoint.dram import DramCache


class NodeEstimates:
    def __init__(self, store: CheckpointStore, dram_cache: DramCache | None, metrics: Metrics,
                 calibration: Calibration) -> None:
        self.store = store
        self.dram_cache = dram_cache
        self.metrics = metrics
        self.calibration = calibration
        metrics.show_calibration(calibration)

    def set_calibration(self, calibration: Calibration) -> None:
        self.calibration = calibration
        self.metrics.show_calibration(calibration)

    def checkpoint_tier(self, deployment: Deployment) -> Tier:
        """Where the next start of `deployment` on this node would find its checkpoint."""
        if not reads_store(deployment.backend, deployment.checkpoint):
            return Tier.SSD  # a local directory read in place
        if is_in_dram(deployment, self.store, self.dram_cache):
            return Tier.DRAM
        cid = checkpoint_id(deployment.checkpoint)
        if self.store.contains(cid):
            return Tier.SSD
        return Tier.PEER if self.store.peer_sources(cid) else Tier.REPOSITORY

    def estimate(self, deployment: Deployment, *, parked: bool = False) -> tuple[float, float]:
        """(seconds from now until a start of `deployment` here serves, seconds of it that keep the SSD or
        network busy), queued loads aside. `parked`: the start will take a parked engine of its shape."""
        tier, num_bytes = self.checkpoint_tier(deployment), deployment.checkpoint_bytes
        busy_s = 0.0 if tier is Tier.DRAM else transfer_time_s(num_bytes, tier, self.calibration)
        kind = EngineKind.VLLM_PARKED if parked else deployment.engine_kind
        return load_time_s(kind, num_bytes, tier, self.calibration), busy_s

    def observe_load(self, deployment: Deployment, report: LoadReport) -> None:
        """A start of `deployment` here completed: learn its load bandwidth and its engine kind's init (a start on a
        parked engine teaches the parked kind, not what a new engine costs)."""
        if report.source_tier in LOAD_TIERS:  # the loader's own tier; a dummy engine loads nothing
            kind = EngineKind.VLLM_PARKED if report.reused_engine else deployment.engine_kind
            self.set_calibration(self.calibration.observe_load(
                kind, Tier(report.source_tier), report.num_bytes or deployment.checkpoint_bytes, report.load_s,
                report.init_s))

    def observe_fetch(self, tier: Tier, report: FetchReport) -> None:
        """The store copied a checkpoint in (from a peer or the repository): count it, learn its bandwidth."""
        self.metrics.fetches.labels(tier).inc()
        self.metrics.fetch_bytes.labels(tier).inc(report.num_bytes)
        self.set_calibration(self.calibration.observe_fetch(tier, report.num_bytes, report.seconds))

    def observe_migration(self, num_tokens: int, seconds: float) -> None:
        """A migration from this node moved requests holding `num_tokens`: learn its a·tokens + b."""
        self.set_calibration(self.calibration.observe_migration(num_tokens, seconds))
