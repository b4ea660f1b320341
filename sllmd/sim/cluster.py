"""The simulated cluster of `sllmd simulate`: hardware figures, the model catalogue, and per-server caches.

Every figure is the simulation's ground truth, chosen from public hardware numbers (each says where it
comes from). The estimators start from `Calibration.defaults()`, which are deliberately below these, and
learn the truth from completed simulated loads, as a real node would.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from sllmd.scheduler.estimate import BYTES_PER_GB
from sllmd.types import EngineKind, Tier


@dataclass(frozen=True, slots=True)
class Hardware:
    """One server's figures; all servers are alike. Bandwidths in GB/s, sizes in bytes."""

    num_servers: int = 4
    gpus_per_server: int = 4  # the ServerlessLLM paper's test bed: 4 servers × 4 GPUs
    gpu_bytes: int = 80 * 10**9  # A100/H100 80 GB; every catalogue model fits one GPU
    pcie_gbps: float = 25.0  # PCIe 4.0 x16 moves ~25 GB/s from pinned host memory
    ssd_gbps: float = 6.0  # one PCIe 4.0 NVMe drive: 3–7 GB/s sequential read
    network_gbps: float = 1.25  # 10 Gbps Ethernet between servers (the low end of 10–25 Gbps)
    repository_gbps: float = 0.2  # a model hub / object store to one client: ~0.1–1 GB/s
    dram_cache_bytes: int = 160 * 10**9  # of a 512 GB host, the part left for checkpoints: 2–12 models
    # The part of the NVMe given to checkpoints. What matters is its ratio to the catalogue: a serverless
    # fleet hosts far more models than one server stores, so a server holds under half of them (the
    # simulated catalogue is 1.1 TB) and a checkpoint missing locally comes from a peer.
    ssd_cache_bytes: int = 500 * 10**9
    # Every model runs on this kind of engine (GPU transformers; see the per-token costs below), whose init
    # (CUDA context, allocation, binding tensors) takes ~1.5 s plus a little per GB.
    engine_kind: EngineKind = EngineKind.TRANSFORMERS
    init_base_s: float = 1.5
    init_s_per_gb: float = 0.03
    # Effective GPU throughput: prefill is compute bound (A100: 312 TFLOPS fp16, ~50% used); decode
    # (batch 1, batching is not modelled) reads every weight once per token from HBM (A100 80 GB: 2 TB/s,
    # ~75% used) and pays a fixed per-token cost of the serving loop (kernel launches, sampling, Python:
    # ~15 ms in an eager, un-graphed HuggingFace generate loop). Together: 24 ms/token for a 7B model,
    # 32 ms for 13B, 55 ms for 30B, within the 20–60 ms that batch-1 serving of such models measures.
    prefill_flops: float = 150e12
    hbm_gbps: float = 1500.0
    decode_overhead_s: float = 0.015
    migration_base_s: float = 0.05  # cut-over: stop, send the last tokens, switch the stream

    def load_s(self, num_bytes: int, source: Tier) -> float:
        """True seconds to move `num_bytes` onto a GPU from DRAM or SSD (reads overlap copies, so an SSD
        load runs at the slower of the two links)."""
        gbps = self.pcie_gbps if source is Tier.DRAM else min(self.ssd_gbps, self.pcie_gbps)
        return num_bytes / BYTES_PER_GB / gbps

    def fetch_s(self, num_bytes: int, source: Tier) -> float:
        """True seconds to copy `num_bytes` into a server's SSD from a PEER or the REPOSITORY."""
        gbps = min(self.network_gbps, self.ssd_gbps) if source is Tier.PEER else self.repository_gbps
        return num_bytes / BYTES_PER_GB / gbps

    def init_s(self, num_bytes: int) -> float:
        return self.init_base_s + self.init_s_per_gb * num_bytes / BYTES_PER_GB


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One deployed checkpoint (fp16: 2 bytes per parameter)."""

    name: str
    num_params: float

    @property
    def num_bytes(self) -> int:
        return int(2 * self.num_params)

    def prefill_s(self, num_tokens: int, hardware: Hardware) -> float:
        return 2 * self.num_params * num_tokens / hardware.prefill_flops

    def decode_s_per_token(self, hardware: Hardware) -> float:
        return hardware.decode_overhead_s + self.num_bytes / BYTES_PER_GB / hardware.hbm_gbps


# Real model sizes. OPT-66B (132 GB) and Llama-2-70B (138 GB) need two 80 GB GPUs; sllmd's slots are
# one GPU each, so they are left out rather than modelled wrongly.
BASE_MODELS = (
    ("opt-6.7b", 6.7e9),
    ("llama-2-7b", 6.74e9),
    ("opt-13b", 12.9e9),
    ("llama-2-13b", 13.0e9),
    ("opt-30b", 30.0e9),
)


def catalogue(num_copies: int) -> list[ModelSpec]:
    """`num_copies` deployments of each base model ("opt-13b-02"): many models contending for few GPUs,
    as serverless fleets host many fine-tunes of a few architectures."""
    return [ModelSpec(f"{name}-{i:02d}", params) for i in range(num_copies) for name, params in BASE_MODELS]


class LruCache:
    """Checkpoints cached in one tier of one server, least recently used evicted first. `pinned` models
    (checkpoint homes) are never evicted. Sizes in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.pinned: set[str] = set()
        self._models: OrderedDict[str, int] = OrderedDict()

    def __contains__(self, model: str) -> bool:
        return model in self._models

    def models(self) -> frozenset[str]:
        return frozenset(self._models)

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - sum(self._models.values())

    def touch(self, model: str) -> None:
        if model in self._models:
            self._models.move_to_end(model)

    def add(self, model: str, num_bytes: int, *, pin: bool = False) -> bool:
        """Cache `model`, evicting unpinned models as needed; False (and nothing changed) if it cannot fit."""
        if model not in self._models and not self._make_room(num_bytes):
            return False
        self._models[model] = num_bytes
        self._models.move_to_end(model)
        if pin:
            self.pinned.add(model)
        return True

    def _make_room(self, num_bytes: int) -> bool:
        evictable = sum(size for name, size in self._models.items() if name not in self.pinned)
        if num_bytes > self.free_bytes + evictable:
            return False
        for name in [n for n in self._models if n not in self.pinned]:
            if self.free_bytes >= num_bytes:
                break
            del self._models[name]
        return True
