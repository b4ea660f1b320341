"""Deploy, update and remove models: validate against the checkpoint and this node, commit to the
state machine, then tell the worker."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sllmd.engine.base import Backend
from sllmd.errors import InvalidRequest, ModelNotFound
from sllmd.router import TokenizerCache
from sllmd.scheduler.autoscale import AutoscalingPolicy
from sllmd.state.machine import LocalStateMachine, Op
from sllmd.state.models import Deployment
from sllmd.worker.manager import Worker

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
MAX_NAME_LENGTH = 128


@dataclass(frozen=True, slots=True)
class DeploySpec:
    name: str
    checkpoint: Path
    backend: Backend
    autoscaling: AutoscalingPolicy


def inspect_checkpoint(path: Path) -> tuple[int, int]:
    """(context length, weight bytes) of a Hugging Face model directory; InvalidRequest if it is not one."""
    if not path.is_absolute():
        raise InvalidRequest("checkpoint must be an absolute path", param="checkpoint")
    if not path.is_dir():
        raise InvalidRequest(f"checkpoint directory {path} does not exist", param="checkpoint")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise InvalidRequest(f"{path} has no config.json (expected a Hugging Face model directory)",
                             param="checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{path}/config.json is not valid JSON: {exc}", param="checkpoint") from None
    if not isinstance(config, dict):
        raise InvalidRequest(f"{path}/config.json must hold a JSON object", param="checkpoint")
    context_length = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    if not isinstance(context_length, int) or context_length < 2:
        raise InvalidRequest(f"{path}/config.json has an invalid context length", param="checkpoint")
    num_bytes = sum(f.stat().st_size for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    return context_length, num_bytes


class DeploymentService:
    def __init__(self, state: LocalStateMachine, worker: Worker, tokenizers: TokenizerCache) -> None:
        self.state = state
        self.worker = worker
        self.tokenizers = tokenizers

    async def deploy(self, spec: DeploySpec) -> Deployment:
        if not spec.name or len(spec.name) > MAX_NAME_LENGTH or spec.name != spec.name.strip() or "/" in spec.name:
            raise InvalidRequest(f"name must be 1-{MAX_NAME_LENGTH} characters, no slash or surrounding spaces",
                                 param="name")
        context_length, num_bytes = inspect_checkpoint(spec.checkpoint)
        if spec.backend is not Backend.DUMMY and num_bytes == 0:
            raise InvalidRequest(f"{spec.checkpoint} holds no weight files", param="checkpoint")
        largest = self.worker.slots.largest_slot_bytes
        if spec.backend is not Backend.DUMMY and num_bytes > largest:
            raise InvalidRequest(
                f"checkpoint needs {num_bytes / 2**30:.2f} GiB, more than any device slot here "
                f"({largest / 2**30:.2f} GiB)", param="checkpoint")
        try:
            await self.tokenizers.get(str(spec.checkpoint))
        except Exception as exc:  # any tokenizer load failure means a bad checkpoint
            raise InvalidRequest(f"cannot load the tokenizer from {spec.checkpoint}: {exc}",
                                 param="checkpoint") from None
        deployment = Deployment(
            name=spec.name,
            checkpoint=str(spec.checkpoint),
            backend=spec.backend,
            autoscaling=spec.autoscaling,
            context_length=context_length,
            checkpoint_bytes=0 if spec.backend is Backend.DUMMY else num_bytes,
            created_at=time.time(),
        )
        await self.state.propose({"op": Op.DEPLOY, "deployment": deployment.to_wire()})
        self.worker.sync_deployment(deployment)
        return deployment

    async def update_autoscaling(self, name: str, policy: AutoscalingPolicy) -> Deployment:
        current = self.state.deployment(name)
        if current is None:
            raise ModelNotFound(name)
        updated = current.with_autoscaling(policy)
        await self.state.propose({"op": Op.UPDATE_DEPLOYMENT, "deployment": updated.to_wire()})
        self.worker.sync_deployment(updated)
        return updated

    async def remove(self, name: str) -> None:
        deployment = self.state.deployment(name)
        if deployment is None:
            raise ModelNotFound(name)
        await self.state.propose({"op": Op.UNDEPLOY, "name": name})
        await self.worker.remove_deployment(name)
        self.tokenizers.forget(deployment.checkpoint)
