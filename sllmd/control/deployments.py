"""Deploy, update and remove models: validate against the checkpoint and this node, fetch the
checkpoint into the local store, then commit to the state machine (which adopts it into every node's worker).

A deployment's `checkpoint` is its source in the model repository, kept as given (normalised): an
absolute path of a Hugging Face model directory or of an sllmd v1 checkpoint, or the http(s) base URL
of a v1 checkpoint. Engines and tokenizers read the store's copy (`CheckpointStore`), found again
from the source alone, so a node that evicted or never had the copy fetches it the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmd.checkpoint.errors import CheckpointError, as_store_full
from sllmd.checkpoint.fetch import WEIGHT_SUFFIXES, SourceInfo, SourceKind, describe, normalize_source, source_kind
from sllmd.checkpoint.manifest import DTYPE_SIZES, FLOATING_DTYPES, Manifest, torch_name
from sllmd.checkpoint.reader import read_manifest
from sllmd.checkpoint.store import CheckpointInUse, CheckpointStore, reads_store
from sllmd.checkpoint.url_fetch import RepositoryNotFound, RepositoryUnreachable
from sllmd.engine import check_model
from sllmd.engine.base import AUTO_DTYPE, serving_dtype
from sllmd.errors import Conflict, InvalidRequest, ModelNotFound, Overloaded, SllmdError
from sllmd.scheduler.memory import Pins, kv_bytes_per_token, pins_problem, weights_bytes
from sllmd.serving.tokenizers import Tokenizers
from sllmd.state.machine import LocalStateMachine, Op
from sllmd.state.models import Deployment
from sllmd.types import AutoscalingPolicy, Backend, Tier, model_name_problem
from sllmd.worker.manager import Worker

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class DeploySpec:
    """`checkpoint`: a source as `normalize_source` takes it. `dtype`: a serving dtype or "auto" (the weights'
    own); `max_model_len`: None for the model's own context length, else at most that; `start_mode`: one of
    `engine.base.START_MODES`; `num_gpus`: the devices each instance spans (tensor parallelism)."""

    name: str
    checkpoint: str
    backend: Backend
    autoscaling: AutoscalingPolicy
    dtype: str = AUTO_DTYPE
    max_model_len: int | None = None
    start_mode: str = "compiled"
    num_gpus: int = 1


def inspect_checkpoint(path: Path) -> tuple[dict[str, Any], int]:
    """(config.json, weight bytes) of a Hugging Face model directory (an absolute path, as `normalize_source`
    makes it); InvalidRequest if it is not one."""
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
    num_bytes = sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES) and f.is_file())
    return config, num_bytes


def _context_length(config: dict, where: str) -> int:
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    context_length = (text_config.get("max_position_embeddings") or text_config.get("n_positions")
                      or text_config.get("max_sequence_length") or 2048)
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise InvalidRequest(f"{where} has an invalid context length", param="checkpoint")
    return context_length


def serving_context_length(model_length: int, max_model_len: int | None) -> int:
    """The deployment's context length: the model's, or the shorter `max_model_len` asked for."""
    if max_model_len is None:
        return model_length
    if max_model_len > model_length:
        raise InvalidRequest(f"max_model_len {max_model_len} exceeds the model's context length {model_length}",
                             param="max_model_len")
    return max_model_len


def resolve_dtype(requested: str, config: dict[str, Any], weight_dtypes: list[str]) -> str:
    """The serving dtype: `requested`, or for "auto" the dtype the model is stored in, as transformers'
    `dtype="auto"` finds it: config.json's `dtype` (`torch_dtype` before transformers 5), else the first floating
    weight's, else float32. A stored dtype that is not a serving dtype (float64, fp8) serves as float32."""
    if requested != AUTO_DTYPE:
        return requested
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    declared = text_config.get("dtype") or text_config.get("torch_dtype") or config.get("dtype")
    candidates = [declared] if isinstance(declared, str) else []
    candidates += [torch_name(d) for d in weight_dtypes if d in FLOATING_DTYPES]
    return next((serving_dtype(c) for c in candidates if serving_dtype(c) not in (None, AUTO_DTYPE)), "float32")


def _bad_checkpoint(source: str, exc: BaseException) -> SllmdError:
    """The client's error for a checkpoint that could not be had: a 400 naming what is wrong with it, or a 503
    when its repository (a URL, the Hub) cannot be reached now or this node's store cannot hold it now, which a
    later attempt may get past."""
    if (full := as_store_full(exc)) is not None:
        return full
    if isinstance(exc, RepositoryNotFound):
        return InvalidRequest(f"checkpoint {source}: {exc}", param="checkpoint", code="checkpoint_not_found")
    if isinstance(exc, RepositoryUnreachable):
        return Overloaded(f"checkpoint {source}: {exc}", retry_after_s=10, code="repository_unreachable")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # no path of this node's
    return InvalidRequest(f"checkpoint {source}: {reason}", param="checkpoint")


@dataclass
class DeployProgress:
    """A deployment this node is preparing (fetching, converting), as `GET /admin/models/{name}` shows it
    until it is committed. Written from fetch threads: plain attribute stores, read on the event loop."""

    name: str
    checkpoint: str
    started_at: float
    phase: str = "inspect"  # inspect, then download and/or convert (see `fetch.Progress`), then register
    bytes_done: int = 0
    bytes_total: int = 0

    def advance(self, phase: str, bytes_done: int, bytes_total: int) -> None:
        self.phase, self.bytes_done, self.bytes_total = phase, bytes_done, bytes_total

    def to_wire(self) -> dict[str, Any]:
        fraction = self.bytes_done / self.bytes_total if self.bytes_total else 0.0
        return {"name": self.name, "checkpoint": self.checkpoint, "status": "deploying",
                "progress": {"phase": self.phase, "bytes_done": self.bytes_done, "bytes_total": self.bytes_total,
                             "fraction": round(min(fraction, 1.0), 4),
                             "elapsed_s": round(time.time() - self.started_at, 3)}}


class DeploymentService:
    def __init__(self, state: LocalStateMachine, worker: Worker, tokenizers: Tokenizers,
                 store: CheckpointStore, *, cluster_budgets: Callable[[], list[tuple[int, ...]]] | None = None) -> None:
        """`cluster_budgets()`: the device memory budgets of every node of the cluster that serves models, this
        one's included (default: this node's alone)."""
        self.state = state
        self.worker = worker
        self.tokenizers = tokenizers
        self.store = store
        self.cluster_budgets = cluster_budgets or (lambda: [tuple(d.budget_bytes for d in worker.devices.devices)])
        self.preparing: dict[str, DeployProgress] = {}  # name -> a deploy of this node not yet committed

    async def deploy(self, spec: DeploySpec, *, show_progress: bool = False) -> Deployment:
        """Validate, fetch and convert the checkpoint into the store (so the first cold start reads local SSD),
        load its tokenizer, then commit. Every problem with the checkpoint is an InvalidRequest, raised before
        anything is registered. While it runs, `preparing[spec.name]` tells how far it got; `show_progress`
        also draws download and conversion bars on stderr (the CLI's `--deploy`)."""
        if (problem := model_name_problem(spec.name)) is not None:
            raise InvalidRequest(f"name {problem}", param="name", code="invalid_model_name")
        if self.state.deployment(spec.name) is not None:  # before any fetch; the commit checks again
            raise Conflict(f"model '{spec.name}' is already deployed", param="name", code="model_exists")
        if spec.name in self.preparing:
            raise Conflict(f"model '{spec.name}' is being deployed", param="name", code="model_exists")
        progress = self.preparing[spec.name] = DeployProgress(spec.name, spec.checkpoint, time.time())
        try:
            return await self._deploy(spec, progress, show_progress)
        finally:
            del self.preparing[spec.name]

    async def _deploy(self, spec: DeploySpec, progress: DeployProgress, show_progress: bool) -> Deployment:
        source, config, num_bytes = await self._inspect(spec)
        progress.checkpoint = source
        if config is not None:  # refuse before fetching anything; a GGUF's config is known once converted
            await self._check_model(spec, config, source)
        if spec.backend is not Backend.DUMMY and num_bytes == 0:
            raise InvalidRequest(f"{source} holds no weight files", param="checkpoint")
        if spec.backend is not Backend.DUMMY:  # before fetching: its weights alone must fit the devices
            self._check_fits(spec.name, -(-num_bytes // spec.num_gpus), "its checkpoint", num_devices=spec.num_gpus)
        manifest: Manifest | None = None
        if reads_store(spec.backend, source):
            path, manifest = await self._fetch(source, progress, show_progress)
            num_bytes = manifest.total_bytes
            if config is None:
                config, _ = inspect_checkpoint(path)
                await self._check_model(spec, config, source)
        assert config is not None
        dtype = resolve_dtype(spec.dtype, config, [t.dtype for t in manifest.tensors] if manifest else [])
        progress.advance("register", progress.bytes_done, progress.bytes_total)
        try:
            await self.tokenizers.get(source)
        except Exception as exc:  # any tokenizer load failure means a bad checkpoint
            raise InvalidRequest(f"cannot load the tokenizer from {source}: {exc}", param="checkpoint") from None
        deployment = Deployment(
            name=spec.name,
            checkpoint=source,
            backend=spec.backend,
            autoscaling=spec.autoscaling,
            context_length=serving_context_length(_context_length(config, f"{source}/config.json"),
                                                  spec.max_model_len),
            checkpoint_bytes=0 if spec.backend is Backend.DUMMY else num_bytes,
            created_at=time.time(),
            dtype=dtype,
            origin_node=self.worker.node_id if reads_store(spec.backend, source) else "",
            start_mode=spec.start_mode,
            weights_bytes=0 if manifest is None or spec.backend is Backend.DUMMY else weights_bytes(
                [(t.shape, t.dtype in FLOATING_DTYPES, DTYPE_SIZES[t.dtype]) for t in manifest.tensors], dtype),
            kv_bytes_per_token=kv_bytes_per_token(config, dtype),
            num_gpus=spec.num_gpus,
        )
        self._check_fits(spec.name, self.worker.estimates.memory_need(deployment).total_bytes, "an instance",
                         num_devices=spec.num_gpus)
        self._check_pins(deployment)
        # Committing adopts it into every node's worker, this one's before propose returns (Node._adopt).
        await self.state.propose({"op": Op.DEPLOY, "deployment": deployment.to_wire()})
        return deployment

    @staticmethod
    async def _check_model(spec: DeploySpec, config: dict[str, Any], source: str) -> None:
        """The context length and max_model_len, then whether the backend serves this architecture."""
        serving_context_length(_context_length(config, f"{source}/config.json"), spec.max_model_len)
        await asyncio.to_thread(check_model, spec.backend, config)

    async def _inspect(self, spec: DeploySpec) -> tuple[str, dict[str, Any] | None, int]:
        """(normalised source, config.json or None for a GGUF, checkpoint bytes), reading only small files. A Hub
        id comes back pinned to the commit its revision names now."""
        try:
            source = normalize_source(str(spec.checkpoint))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="checkpoint") from None
        kind = source_kind(source)
        if kind is SourceKind.HF_DIR:  # the Hugging Face checks and messages, as before
            config, num_bytes = inspect_checkpoint(Path(source))
            return source, config, num_bytes
        try:
            info: SourceInfo = await describe(source, self.store.settings)
        except CheckpointError as exc:
            raise _bad_checkpoint(source, exc) from None
        return info.source, info.config, info.num_bytes

    async def _fetch(self, source: str, progress: DeployProgress, show_progress: bool) -> tuple[Path, Manifest]:
        """Fetch (or refresh) the store's copy; returns its path and manifest."""
        try:
            path, tier = await self.store.ensure(source, refresh=True, progress=progress.advance,
                                                 show_bars=show_progress)
        except CheckpointInUse as exc:
            raise Conflict(str(exc), param="checkpoint", code="checkpoint_in_use") from None
        except (CheckpointError, OSError) as exc:
            raise _bad_checkpoint(source, exc) from None
        if tier != Tier.SSD:  # a new copy: a tokenizer loaded from an older one is stale
            self.tokenizers.forget(source)
        manifest = read_manifest(path)
        log.info("checkpoint in store", extra={"source": source, "path": str(path), "tier": tier,
                                               "bytes": manifest.total_bytes})
        return path, manifest

    def _check_fits(self, name: str, num_bytes: int, what: str, *, num_devices: int = 1) -> None:
        """InvalidRequest unless some node of the cluster has `num_devices` devices whose memory budget holds
        `num_bytes` each."""
        budgets = self.cluster_budgets()
        most_devices = max((len(node) for node in budgets), default=0)
        if most_devices < num_devices:
            raise InvalidRequest(f"model '{name}' cannot be served: num_gpus is {num_devices}, and no node of the "
                                 f"cluster has that many devices (the most is {most_devices})",
                                 param="num_gpus", code="not_enough_devices")
        # What the k-th largest device of the best node offers: each of the k must hold its share.
        largest = max((sorted(node, reverse=True)[num_devices - 1] for node in budgets if len(node) >= num_devices),
                      default=0)
        if num_bytes > largest:
            on = f" on each of {num_devices} devices" if num_devices > 1 else ""
            raise InvalidRequest(
                f"model '{name}' cannot be served: {what} needs {num_bytes / 2**30:.2f} GiB of device memory{on}, "
                f"more than the cluster's devices have ({largest / 2**30:.2f} GiB; devices.cpu_slot_memory_gb on "
                "CPU nodes, a larger num_gpus, less max_model_len or serving.max_batch_kv_gb make it fit)",
                param="checkpoint", code="model_too_large")

    def _check_pins(self, deployment: Deployment) -> None:
        """InvalidRequest unless the min_instances of every deployment, `deployment` as given, fit the cluster's
        pinned share of memory (`scheduler.memory.pins_problem`)."""
        deployments = {**self.state.deployments(), deployment.name: deployment}
        pins = {name: Pins(d.autoscaling.min_instances, self.worker.estimates.memory_need(d).total_bytes, d.num_gpus)
                for name, d in deployments.items()}
        problem = pins_problem(pins, self.cluster_budgets(), self.worker.serving.pinned_memory_share)
        if problem is not None:
            raise InvalidRequest(problem, param="autoscaling.min_instances", code="pins_exceed_share")

    async def update_autoscaling(self, name: str, policy: AutoscalingPolicy) -> Deployment:
        current = self.state.deployment(name)
        if current is None:
            raise ModelNotFound(name)
        updated = current.with_autoscaling(policy)
        self._check_pins(updated)
        await self.state.propose({"op": Op.UPDATE_DEPLOYMENT, "deployment": updated.to_wire()})
        return updated

    async def remove(self, name: str) -> None:
        """Undeploy `name`. Its store copy stays (another deployment may share it) until LRU eviction."""
        deployment = self.state.deployment(name)
        if deployment is None:
            raise ModelNotFound(name)
        await self.state.propose({"op": Op.UNDEPLOY, "name": name})
        self.tokenizers.forget(deployment.checkpoint)
