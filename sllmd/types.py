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
    weights_bytes: int = 0  # device memory its weights hold once loaded, where the engine can tell; 0: unknown


MAX_MODEL_NAME_LENGTH = 128


def model_name_problem(name: str) -> str | None:
    """Why `name` cannot name a deployment, or None if it can. The one rule wherever a name enters (the admin
    API, `--deploy`, a config): 1-128 printable characters (no control or separator characters such as NUL,
    newline or tab), no surrounding spaces, no slash (a name is one path segment of the admin API and of
    instance ids), and not `.` or `..`."""
    if not name or len(name) > MAX_MODEL_NAME_LENGTH:
        return f"must be 1-{MAX_MODEL_NAME_LENGTH} characters"
    if not name.isprintable():
        return "must be printable (no control characters)"
    if name != name.strip():
        return "must not begin or end with a space"
    if "/" in name:
        return "must not contain a slash"
    if name in (".", ".."):
        return "must not be . or .."
    return None


# Upper bounds of a deployment's autoscaling fields: finite, and far beyond any real cluster.
MAX_INSTANCES = 4096
MAX_TARGET_CONCURRENCY = 1 << 20
MAX_KEEP_ALIVE_S = 30 * 24 * 3600.0  # 30 days; an instance that should never stop is a pin (min_instances)


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
        if not 0 <= self.min_instances <= MAX_INSTANCES:
            found.append(("min_instances", f"must be in 0..{MAX_INSTANCES}"))
        if not 1 <= self.max_instances <= MAX_INSTANCES:
            found.append(("max_instances", f"must be in 1..{MAX_INSTANCES}"))
        if self.min_instances > self.max_instances:
            found.append(("min_instances", "must be <= max_instances"))
        if not 1 <= self.target_concurrency <= MAX_TARGET_CONCURRENCY:
            found.append(("target_concurrency", f"must be in 1..{MAX_TARGET_CONCURRENCY}"))
        if not 0 <= self.keep_alive_s <= MAX_KEEP_ALIVE_S:  # NaN fails too
            found.append(("keep_alive_s", f"must be in 0..{MAX_KEEP_ALIVE_S:g} seconds"))
        return found


class EngineKind(enum.StrEnum):
    """What an instance's engine init is timed as (`Deployment.engine_kind`): its backend, and for vLLM its
    start mode ("vllm" compiles with torch.compile and, on GPUs, captures CUDA graphs; "vllm-eager" does not)."""

    TRANSFORMERS = "transformers"
    VLLM = "vllm"
    VLLM_EAGER = "vllm-eager"
    VLLM_PARKED = "vllm-parked"  # a vLLM start that takes a parked engine of its shape (see the vLLM engine pool)
    DUMMY = "dummy"
