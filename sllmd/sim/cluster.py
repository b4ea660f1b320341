"""The simulated cluster of `sllmd simulate`: hardware figures, the model catalogues, what an instance holds
of each of its GPUs' memory (`Capacity`, `ModelSpec.memory_bytes`) and how many GPUs it spans
(`ModelSpec.num_gpus`), and per-server caches.

Every figure is the simulation's ground truth, chosen from public hardware numbers (each says where it
comes from). The estimators start from `Calibration.defaults()`, which are deliberately below these, and
learn the truth from completed simulated loads, as a real node would.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import OrderedDict
from dataclasses import dataclass

from sllmd.scheduler.estimate import BYTES_PER_GB
from sllmd.scheduler.eviction import EvictionRule
from sllmd.scheduler.memory import instance_memory
from sllmd.sim.trace import MAX_CONTEXT_TOKENS
from sllmd.types import Backend, EngineKind, Tier

# An instance's KV-cache budget, sized as the daemon sizes it (`scheduler.memory.instance_memory`): KV_BATCH_SIZE
# requests at the trace's full context, capped at KV_CAP_BYTES but never below one such request. 32 is
# `serving.max_batch_size`'s default; 16 GiB is `serving.max_batch_kv_gb = 16`, a setting for 80 GB GPUs (the
# default, 2, is for small devices). So a 7B model with full multi-head attention (0.5 MiB of KV per token) asks
# 13 + 17 GB, a grouped-query 0.5B one 1 + 1.6 GB.
KV_BATCH_SIZE = 32
KV_CAP_BYTES = 16 << 30


class Capacity(enum.StrEnum):
    """How a server's GPUs hold instances, and which idle ones its worker stops to make room for a new one."""

    PER_DEVICE = "per-device"  # sllmd before memory: an instance takes whole GPUs; the longest idle goes first
    PACK_LRU = "pack-lru"  # GPUs are memory budgets instances share; the longest idle goes first
    PACK_COST = "pack-cost"  # shared, the daemon's rule: the least reload seconds × request rate per byte first
    PACK_KEEPALIVE = "pack-keepalive"  # shared, Ollama's rule: the one whose keep-alive ends soonest first

    @property
    def rule(self) -> EvictionRule:
        return {Capacity.PACK_COST: EvictionRule.COST,
                Capacity.PACK_KEEPALIVE: EvictionRule.SHORTEST_KEEP_ALIVE}.get(self, EvictionRule.LRU)

    def memory_bytes(self, model: ModelSpec, hardware: Hardware) -> int:
        """What an instance of `model` holds on each of its `num_gpus` GPUs: all of it per device, else its
        `memory_bytes`."""
        return hardware.gpu_bytes if self is Capacity.PER_DEVICE else model.memory_bytes


GPU_BYTES = 80 * 10**9  # A100/H100 80 GB


@dataclass(frozen=True, slots=True)
class Hardware:
    """One server's figures; all servers are alike. Bandwidths in GB/s, sizes in bytes."""

    num_servers: int = 4
    gpus_per_server: int = 4  # the ServerlessLLM paper's test bed: 4 servers × 4 GPUs
    gpu_bytes: int = GPU_BYTES  # each GPU's memory budget; every catalogue model fits its `num_gpus` of them
    # Distances between a server's GPUs (`scheduler.topology`), which decide the GPUs a multi-GPU instance
    # takes; (): flat, every pair alike (the sets of lowest indices first).
    topology: tuple[tuple[int, ...], ...] = ()
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
    # (CUDA context, allocation, binding tensors) takes ~1.5 s plus a little per GB. The models spanning several
    # GPUs too: the daemon would serve them on vllm, whose new engine's longer init is left out.
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

    def load_s(self, num_bytes: int, source: Tier, num_gpus: int = 1) -> float:
        """True seconds to move `num_bytes` onto `num_gpus` GPUs (each taking its share) from DRAM or SSD. Each
        GPU has its own PCIe link, so a DRAM load runs `num_gpus` copies at once; an SSD load is one read stream
        (reads overlap copies, so it runs at the slower of the drive and the links)."""
        links_gbps = self.pcie_gbps * num_gpus
        gbps = links_gbps if source is Tier.DRAM else min(self.ssd_gbps, links_gbps)
        return num_bytes / BYTES_PER_GB / gbps

    def fetch_s(self, num_bytes: int, source: Tier) -> float:
        """True seconds to copy `num_bytes` into a server's SSD from a PEER or the REPOSITORY."""
        gbps = min(self.network_gbps, self.ssd_gbps) if source is Tier.PEER else self.repository_gbps
        return num_bytes / BYTES_PER_GB / gbps

    def init_s(self, num_bytes: int) -> float:
        return self.init_base_s + self.init_s_per_gb * num_bytes / BYTES_PER_GB


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One deployed checkpoint (fp16: 2 bytes per parameter). `kv_bytes_per_token`: its architecture's, at fp16
    (2 × layers × KV heads × head size × 2 bytes). `num_gpus`: the GPUs of one server an instance spans (a
    deployment's num_gpus: tensor parallelism), each holding `memory_bytes`."""

    name: str
    num_params: float
    kv_bytes_per_token: int
    num_gpus: int = 1
    keep_alive_s: float | None = None  # its deployment's, where it differs from the workload's

    @property
    def num_bytes(self) -> int:
        return int(2 * self.num_params)

    @property
    def memory_bytes(self) -> int:
        """What an instance holds on each of its GPUs: its share of the weights and of the KV budget (see
        KV_BATCH_SIZE), and a whole engine overhead (`scheduler.memory.instance_memory`)."""
        return _memory_bytes(self.num_bytes, self.kv_bytes_per_token, self.num_gpus)

    # Tensor parallelism splits the compute and the weights read per token over the GPUs; the fixed per-token
    # cost is not split, and the all-reduces between the GPUs (~1 ms per token over NVLink) are left out.
    def prefill_s(self, num_tokens: int, hardware: Hardware) -> float:
        return 2 * self.num_params * num_tokens / (hardware.prefill_flops * self.num_gpus)

    def decode_s_per_token(self, hardware: Hardware) -> float:
        return hardware.decode_overhead_s + self.num_bytes / self.num_gpus / BYTES_PER_GB / hardware.hbm_gbps


def _memory_bytes(num_bytes: int, kv_bytes_per_token: int, num_gpus: int) -> int:
    return instance_memory(Backend.TRANSFORMERS, weights_bytes=num_bytes, kv_bytes_per_token=kv_bytes_per_token,
                           context_length=MAX_CONTEXT_TOKENS, max_batch_size=KV_BATCH_SIZE, max_kv_bytes=KV_CAP_BYTES,
                           on_gpu=True, num_devices=num_gpus).total_bytes


def fitted(name: str, num_params: float, kv_bytes_per_token: int, gpu_bytes: int = GPU_BYTES) -> ModelSpec:
    """A model on the fewest GPUs (1, 2, 4 or 8: the tensor-parallel sizes attention heads divide by) of
    `gpu_bytes` each that hold an instance's share (`ModelSpec.memory_bytes`). ValueError: not even 8 do."""
    for num_gpus in (1, 2, 4, 8):
        if _memory_bytes(int(2 * num_params), kv_bytes_per_token, num_gpus) <= gpu_bytes:
            return ModelSpec(name, num_params, kv_bytes_per_token, num_gpus)
    raise ValueError(f"{name} does not fit 8 GPUs of {gpu_bytes} bytes")


def _kv_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * 2


# Real model sizes and shapes (their Hugging Face configs), the ServerlessLLM paper's models.
BASE_MODELS = (
    ModelSpec("opt-6.7b", 6.7e9, _kv_per_token(32, 32, 128)),
    ModelSpec("llama-2-7b", 6.74e9, _kv_per_token(32, 32, 128)),
    ModelSpec("opt-13b", 12.9e9, _kv_per_token(40, 40, 128)),
    ModelSpec("llama-2-13b", 13.0e9, _kv_per_token(40, 40, 128)),
    ModelSpec("opt-30b", 30.0e9, _kv_per_token(48, 56, 128)),
)
# The paper's largest, 132 and 138 GB at fp16: more than one 80 GB GPU holds. With the KV budget capped at
# 16 GiB, two GPUs hold an instance (~75 and ~78 GB on each), so `fitted` gives both num_gpus 2.
LARGE_BASE_MODELS = (
    fitted("opt-66b", 66.0e9, _kv_per_token(64, 72, 128)),
    fitted("llama-2-70b", 69.0e9, _kv_per_token(80, 8, 128)),
)
# Small models of today, grouped-query attention: 0.5B to 8B (1–16 GB at fp16).
SMALL_BASE_MODELS = (
    ModelSpec("qwen2.5-0.5b", 0.494e9, _kv_per_token(24, 2, 64)),
    ModelSpec("llama-3.2-1b", 1.24e9, _kv_per_token(16, 8, 64)),
    ModelSpec("qwen2.5-1.5b", 1.54e9, _kv_per_token(28, 2, 128)),
    ModelSpec("qwen2.5-3b", 3.09e9, _kv_per_token(36, 2, 128)),
    ModelSpec("llama-3.2-3b", 3.21e9, _kv_per_token(28, 8, 128)),
    ModelSpec("qwen2.5-7b", 7.62e9, _kv_per_token(28, 4, 128)),
    ModelSpec("mistral-7b", 7.25e9, _kv_per_token(32, 8, 128)),
    ModelSpec("llama-3.1-8b", 8.03e9, _kv_per_token(32, 8, 128)),
)


def catalogue(num_copies: int, bases: tuple[ModelSpec, ...] = BASE_MODELS) -> list[ModelSpec]:
    """`num_copies` deployments of each base model ("opt-13b-02"), copy by copy (so a Zipf ranking over the
    list mixes sizes): many models contending for few GPUs, as serverless fleets host many fine-tunes of a
    few architectures."""
    return [dataclasses.replace(base, name=f"{base.name}-{i:02d}") for i in range(num_copies) for base in bases]


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
