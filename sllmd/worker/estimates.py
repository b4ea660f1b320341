"""This node's start-time and memory estimates: its calibration, where a deployment's checkpoint is, what an
instance of it asks of a device, and learning.

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
from sllmd.scheduler.memory import MemoryNeed, instance_memory
from sllmd.state.models import Deployment
from sllmd.types import EngineKind, LoadReport, Tier
from sllmd.worker.warming import is_in_dram

if TYPE_CHECKING:
    from sllmd.checkpoint.dram import DramCache


class NodeEstimates:
    def __init__(self, store: CheckpointStore, dram_cache: DramCache | None, metrics: Metrics,
                 calibration: Calibration, *, max_batch_size: int = 32, max_kv_bytes: int = 2 << 30,
                 on_gpu: bool = False) -> None:
        """`max_batch_size`, `max_kv_bytes`: the serving settings an instance's KV budget follows; `on_gpu`:
        whether this node's devices are GPUs (engine overheads differ)."""
        self.store = store
        self.dram_cache = dram_cache
        self.metrics = metrics
        self.calibration = calibration
        self.max_batch_size = max_batch_size
        self.max_kv_bytes = max_kv_bytes
        self.on_gpu = on_gpu
        # (checkpoint, dtype, backend) -> bytes of weights an engine of it held here
        self._measured_weights: dict[tuple[str, str, str], int] = {}
        metrics.show_calibration(calibration)

    def memory_need(self, deployment: Deployment) -> MemoryNeed:
        """What an instance of `deployment` asks of a device here: its weights as measured by an earlier start
        of its checkpoint and dtype here, else as estimated at deploy, plus its KV budget and engine overhead."""
        weights = (self._measured_weights.get(_weights_key(deployment))
                   or deployment.weights_bytes or deployment.checkpoint_bytes)
        return instance_memory(deployment.backend, weights_bytes=weights,
                               kv_bytes_per_token=deployment.kv_bytes_per_token,
                               context_length=deployment.context_length, max_batch_size=self.max_batch_size,
                               max_kv_bytes=self.max_kv_bytes, on_gpu=self.on_gpu, num_devices=deployment.num_gpus)

    def observe_memory(self, deployment: Deployment, report: LoadReport) -> None:
        """A start of `deployment` here completed: remember the weights its engine really holds, when it says."""
        if report.weights_bytes > 0:
            self._measured_weights[_weights_key(deployment)] = report.weights_bytes

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
            tier = Tier(report.source_tier)
            # A DRAM load onto k devices ran k streams (`transfer_time_s`): what one link did took k times as long.
            load_s = report.load_s * deployment.num_gpus if tier is Tier.DRAM else report.load_s
            self.set_calibration(self.calibration.observe_load(
                kind, tier, report.num_bytes or deployment.checkpoint_bytes, load_s, report.init_s))

    def observe_fetch(self, tier: Tier, report: FetchReport) -> None:
        """The store copied a checkpoint in (from a peer or the repository): count it, learn its bandwidth."""
        self.metrics.fetches.labels(tier).inc()
        self.metrics.fetch_bytes.labels(tier).inc(report.num_bytes)
        self.set_calibration(self.calibration.observe_fetch(tier, report.num_bytes, report.seconds))

    def observe_migration(self, num_tokens: int, seconds: float) -> None:
        """A migration from this node moved requests holding `num_tokens`: learn its a·tokens + b."""
        self.set_calibration(self.calibration.observe_migration(num_tokens, seconds))


def _weights_key(deployment: Deployment) -> tuple[str, str, str]:
    return deployment.checkpoint, deployment.dtype, deployment.backend.value
