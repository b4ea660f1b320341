"""Records kept in the replicated state: deployments and instances, with their wire form."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, replace
from typing import Any

from sllmd.types import AutoscalingPolicy, Backend, EngineKind


@dataclass(frozen=True, slots=True)
class Deployment:
    """A model the cluster serves. `checkpoint` is its source in the model repository (see
    `sllmd.checkpoint.fetch.normalize_source`). `context_length` is the longest prompt + completion it serves
    (its max_model_len: the model's own or less); `dtype` the floating dtype its instances compute in."""

    name: str
    checkpoint: str
    backend: Backend
    autoscaling: AutoscalingPolicy
    context_length: int
    checkpoint_bytes: int
    created_at: float
    revision: int = 1  # bumped by every update
    dtype: str = "float32"  # records written before dtypes were a setting were served in float32
    origin_node: str = ""  # the node that deployed it, which held its checkpoint in its store when it did
    start_mode: str = "compiled"  # vLLM: "compiled" (torch.compile, faster decoding) or "eager" (faster start)
    weights_bytes: int = 0  # its weights once loaded in `dtype` (estimated at deploy); 0: as checkpoint_bytes
    kv_bytes_per_token: int = 0  # KV cache one token takes in `dtype`; 0: unknown
    num_gpus: int = 1  # devices each instance spans (tensor parallelism); CPU devices on a CPU node

    @property
    def engine_kind(self) -> EngineKind:
        """What its instances' starts are timed as: the backend, and the start mode where the backend has two."""
        return EngineKind(f"{self.backend.value}-eager" if self.start_mode == "eager" else self.backend.value)

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["backend"] = self.backend.value
        return wire

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Deployment:
        return cls(
            **{**wire, "backend": Backend(wire["backend"]), "autoscaling": AutoscalingPolicy(**wire["autoscaling"])}
        )

    def with_autoscaling(self, policy: AutoscalingPolicy) -> Deployment:
        return replace(self, autoscaling=policy, revision=self.revision + 1)


class InstanceState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    id: str
    model: str
    node_id: str
    device: str
    state: InstanceState
    started_at: float

    @property
    def is_live(self) -> bool:
        """Starting or ready: it holds (or is about to hold) a slot and counts against max_instances."""
        return self.state in (InstanceState.STARTING, InstanceState.READY)

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> InstanceRecord:
        return cls(**{**wire, "state": InstanceState(wire["state"])})
