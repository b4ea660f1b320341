"""Deploy, update and remove models: validate against the checkpoint and this node, fetch the
checkpoint into the local store, then commit to the state machine (which adopts it into every node's worker).

A deployment's `checkpoint` is its source in the model repository, kept as given (normalised): an
absolute path of a Hugging Face model directory or of an sllmd v1 checkpoint, or the http(s) base URL
of a v1 checkpoint. Engines and tokenizers read the store's copy (`CheckpointStore`), found again
from the source alone, so a node that evicted or never had the copy fetches it the same way.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sllmd.checkpoint.fetch import (
    WEIGHT_SUFFIXES,
    RepositoryNotFound,
    SourceInfo,
    SourceKind,
    describe,
    is_url,
    normalize_source,
    source_kind,
)
from sllmd.checkpoint.format import CheckpointError, ConversionError
from sllmd.checkpoint.reader import read_manifest
from sllmd.checkpoint.store import CheckpointInUse, CheckpointStore, checkpoint_id, reads_store
from sllmd.engine.base import Backend
from sllmd.errors import Conflict, InvalidRequest, ModelNotFound
from sllmd.router import TokenizerCache
from sllmd.scheduler.autoscale import AutoscalingPolicy
from sllmd.scheduler.estimate import Tier
from sllmd.state.machine import LocalStateMachine, Op
from sllmd.state.models import Deployment
from sllmd.textgen import Tokenizer
from sllmd.worker.manager import Worker

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 128

@dataclass(frozen=True, slots=True)
class DeploySpec:
    """`checkpoint`: an absolute path (Hugging Face or sllmd v1 directory) or an http(s):// base URL."""

    name: str
    checkpoint: str
    backend: Backend
    autoscaling: AutoscalingPolicy


def inspect_checkpoint(path: Path) -> tuple[int, int]:
    """(context length, weight bytes) of a Hugging Face model directory (an absolute path, as
    `normalize_source` makes it); InvalidRequest if it is not one."""
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
    context_length = _context_length(config, f"{path}/config.json")
    num_bytes = sum(f.stat().st_size for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES) and f.is_file())
    return context_length, num_bytes


def _context_length(config: dict, where: str) -> int:
    context_length = config.get("max_position_embeddings") or config.get("n_positions") or 2048
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise InvalidRequest(f"{where} has an invalid context length", param="checkpoint")
    return context_length


def _bad_checkpoint(source: str, exc: BaseException) -> InvalidRequest:
    if isinstance(exc, RepositoryNotFound) and is_url(source):
        return InvalidRequest(f"checkpoint {source}: {exc}", param="checkpoint", code="checkpoint_not_found")
    return InvalidRequest(f"checkpoint {source}: {exc}", param="checkpoint")


class CheckpointTokenizers(TokenizerCache):
    """The tokenizer of each deployed checkpoint, keyed by source, loaded from the store's copy of it
    (v1 checkpoints carry the tokenizer files) and kept in memory even if that copy is evicted later.
    A local source the store lacks serves its own files; a URL (or a local source that is gone) the store lacks
    is fetched first, from a peer if one has it."""

    def __init__(self, store: CheckpointStore) -> None:
        super().__init__()
        self.store = store
        self._dirs: dict[str, str] = {}  # source -> the directory its tokenizer was loaded from

    async def get(self, checkpoint: str) -> Tokenizer:
        directory = self._dirs.get(checkpoint)
        if directory is None:
            cid = checkpoint_id(checkpoint)
            if self.store.contains(cid):
                directory = str(self.store.path_of(cid))
            elif not is_url(checkpoint) and Path(checkpoint).is_dir():
                directory = checkpoint
            else:
                directory = str((await self.store.ensure(checkpoint))[0])
        try:
            tokenizer = await super().get(directory)
        except Exception:
            self._dirs.pop(checkpoint, None)
            raise
        self._dirs[checkpoint] = directory
        return tokenizer

    def forget(self, checkpoint: str) -> None:
        super().forget(self._dirs.pop(checkpoint, checkpoint))


class DeploymentService:
    def __init__(self, state: LocalStateMachine, worker: Worker, tokenizers: TokenizerCache,
                 store: CheckpointStore) -> None:
        self.state = state
        self.worker = worker
        self.tokenizers = tokenizers
        self.store = store

    async def deploy(self, spec: DeploySpec) -> Deployment:
        """Validate, fetch the checkpoint into the store (so the first cold start reads local SSD),
        load its tokenizer, then commit. Every problem with the checkpoint is an InvalidRequest."""
        if not spec.name or len(spec.name) > MAX_NAME_LENGTH or spec.name != spec.name.strip() or "/" in spec.name:
            raise InvalidRequest(f"name must be 1-{MAX_NAME_LENGTH} characters, no slash or surrounding spaces",
                                 param="name")
        if self.state.deployment(spec.name) is not None:  # before any fetch; the commit checks again
            raise Conflict(f"model '{spec.name}' is already deployed", param="name", code="model_exists")
        source, context_length, num_bytes = await self._inspect(spec)
        if spec.backend is not Backend.DUMMY and num_bytes == 0:
            raise InvalidRequest(f"{source} holds no weight files", param="checkpoint")
        largest = self.worker.slots.largest_slot_bytes
        if spec.backend is not Backend.DUMMY and num_bytes > largest:
            raise InvalidRequest(
                f"checkpoint needs {num_bytes / 2**30:.2f} GiB, more than any device slot here "
                f"({largest / 2**30:.2f} GiB)", param="checkpoint")
        if reads_store(spec.backend, source):
            num_bytes = await self._fetch(source, num_bytes)
        try:
            await self.tokenizers.get(source)
        except Exception as exc:  # any tokenizer load failure means a bad checkpoint
            raise InvalidRequest(f"cannot load the tokenizer from {source}: {exc}", param="checkpoint") from None
        deployment = Deployment(
            name=spec.name,
            checkpoint=source,
            backend=spec.backend,
            autoscaling=spec.autoscaling,
            context_length=context_length,
            checkpoint_bytes=0 if spec.backend is Backend.DUMMY else num_bytes,
            created_at=time.time(),
        )
        # Committing adopts it into every node's worker, this one's before propose returns (Node._adopt).
        await self.state.propose({"op": Op.DEPLOY, "deployment": deployment.to_wire()})
        return deployment

    async def _inspect(self, spec: DeploySpec) -> tuple[str, int, int]:
        """(normalised source, context length, checkpoint bytes), reading only small files."""
        try:
            source = normalize_source(str(spec.checkpoint))
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="checkpoint") from None
        kind = source_kind(source)
        if kind is SourceKind.HF_DIR:  # the Hugging Face checks and messages, as before
            context_length, num_bytes = inspect_checkpoint(Path(source))
            return source, context_length, num_bytes
        try:
            info: SourceInfo = await describe(source, self.store.settings)
        except CheckpointError as exc:
            raise _bad_checkpoint(source, exc) from None
        where = f"{source}/config.json"
        return source, _context_length(info.config, where), info.num_bytes

    async def _fetch(self, source: str, num_bytes: int) -> int:
        """Fetch (or refresh) the store's copy; returns its checkpoint bytes. A Hugging Face directory
        whose weights cannot be converted is still deployed (its instances will fail to start with the
        reason), as before conversion happened at deploy."""
        try:
            path, tier = await self.store.ensure(source, refresh=True)
        except CheckpointInUse as exc:
            raise Conflict(str(exc), param="checkpoint", code="checkpoint_in_use") from None
        except ConversionError as exc:
            log.warning("checkpoint cannot be converted; deploying anyway", extra={"source": source,
                                                                                    "error": str(exc)})
            return num_bytes
        except (CheckpointError, OSError) as exc:
            raise _bad_checkpoint(source, exc) from None
        if tier != Tier.SSD:  # a new copy: a tokenizer loaded from an older one is stale
            self.tokenizers.forget(source)
        manifest = read_manifest(path)
        log.info("checkpoint in store", extra={"source": source, "path": str(path), "tier": tier,
                                               "bytes": manifest.total_bytes})
        return manifest.total_bytes

    async def update_autoscaling(self, name: str, policy: AutoscalingPolicy) -> Deployment:
        current = self.state.deployment(name)
        if current is None:
            raise ModelNotFound(name)
        updated = current.with_autoscaling(policy)
        await self.state.propose({"op": Op.UPDATE_DEPLOYMENT, "deployment": updated.to_wire()})
        return updated

    async def remove(self, name: str) -> None:
        """Undeploy `name`. Its store copy stays (another deployment may share it) until LRU eviction."""
        deployment = self.state.deployment(name)
        if deployment is None:
            raise ModelNotFound(name)
        await self.state.propose({"op": Op.UNDEPLOY, "name": name})
        self.tokenizers.forget(deployment.checkpoint)
