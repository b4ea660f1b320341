"""The shared vocabulary: small value types that many layers name.

A leaf module: it imports only the standard library, so any layer (config, state, scheduler, checkpoint,
engine, worker) may use these types without importing another layer. Each type here is a plain value;
the behaviour that uses it stays in its own layer (`sllmd.engine` samples with `SamplingParams`,
`sllmd.scheduler.autoscale` decides with `AutoscalingPolicy`, `sllmd.scheduler.estimate` learns from
`LoadReport`s and ranks `Tier`s).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Backend(enum.StrEnum):
    """The engine implementation a deployment runs on."""

    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    DUMMY = "dummy"


class Tier(enum.StrEnum):
    """Where a checkpoint's bytes are, fastest first."""

    DEVICE = "device"
    DRAM = "dram"
    SSD = "ssd"
    PEER = "peer"
    REPOSITORY = "repository"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token.

    `temperature == 0` is greedy. With `seed` set, the token at position p is drawn from a uniform
    keyed by (seed, p) alone, so a seeded request gives the same tokens on any instance, batch or
    restart point (this is what lets migration resume sampled output exactly).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a cold start cost; the scheduler's estimators learn from these."""

    source_tier: str  # "none" | "ssd" | "dram" | ...
    num_bytes: int
    load_s: float  # checkpoint bytes to device memory
    init_s: float  # everything else the engine did before it could serve
    phases: dict[str, float] = field(default_factory=dict)  # seconds by phase of the start, where the engine tells
    reused_engine: bool = False  # the start took a running (parked) engine: only its weights were loaded


@dataclass(frozen=True, slots=True)
class AutoscalingPolicy:
    """A deployment's scaling bounds and target; `sllmd.scheduler.autoscale` holds the decisions."""

    min_instances: int = 0
    max_instances: int = 1
    target_concurrency: int = 4
    keep_alive_s: float = 60.0

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every violated bound; empty when valid."""
        found = []
        if self.min_instances < 0:
            found.append(("min_instances", "must be >= 0"))
        if self.max_instances < 1:
            found.append(("max_instances", "must be >= 1"))
        if self.min_instances > self.max_instances:
            found.append(("min_instances", "must be <= max_instances"))
        if self.target_concurrency < 1:
            found.append(("target_concurrency", "must be >= 1"))
        if self.keep_alive_s < 0:
            found.append(("keep_alive_s", "must be >= 0"))
        return found


class EngineKind(enum.StrEnum):
    """What an instance's engine init is timed as (`Deployment.engine_kind`): its backend, and for vLLM its
    start mode ("vllm" compiles with torch.compile and, on GPUs, captures CUDA graphs; "vllm-eager" does not)."""

    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    VLLM_EAGER = "vllm-eager"
    VLLM_PARKED = "vllm-parked"  # a vLLM start that takes a parked engine of its shape (see the vLLM engine pool)
    DUMMY = "dummy"
