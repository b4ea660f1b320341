"""Parked vLLM engines: started once, handed from one instance to the next.

A vLLM engine takes tens of seconds to start (processes, imports, torch.compile, KV-cache sizing, warm-up:
~40 s on a 2-core CPU) while its weights load in about a second. What an engine's start depends on is the model's
shape, not its weights: its config.json, dtype, max_model_len, device, start mode and KV-cache size, which
`engine_key` hashes. So an instance that stops leaves its engine here ("parked") instead of shutting it down, and
the next instance of any model with the same key takes it: as it is when it still holds that model's weights,
else after swapping the new weights in (`SllmdWorkerExtension.sllmd_swap_weights`, in place, through sllmd's
loader). Fine-tunes of one base model share one key.

At most `capacity` engines are parked; parking one more shuts the least recently parked down. A parked engine
keeps what it holds (on CPU its weights and KV cache in host memory; on a GPU its device memory, so a GPU node
parks only where the operator allows it: `serving.vllm_parked_engines`). Not thread-safe: use from the event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

# config.json fields that name or date a checkpoint without changing the network an engine builds.
_NOT_SHAPE = frozenset({"_name_or_path", "name_or_path", "_commit_hash", "transformers_version"})


def engine_key(config: Mapping[str, Any], **settings: Any) -> str:
    """An engine's identity besides its weights: the model's config.json (less the fields that only name it)
    and the engine `settings` (dtype, max_model_len, device, start mode, KV cache...), hashed."""
    shape = {k: v for k, v in config.items() if k not in _NOT_SHAPE}
    text = json.dumps({"config": shape, "settings": settings}, sort_keys=True, default=str)
    return xxhash.xxh3_64_hexdigest(text.encode())


def engine_key_of(checkpoint_dir: Path, *, dtype: str, max_model_len: int | None, device: str, start_mode: str,
                  kv_cache_bytes: int | None = None, tensor_parallel_size: int = 1) -> str:
    """`engine_key` of an engine serving the checkpoint directory `checkpoint_dir` (its config.json) so."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    # One rank adds nothing to the key, so single-device keys (and their compile caches) stay what they were.
    ranks = {"tensor_parallel_size": tensor_parallel_size} if tensor_parallel_size > 1 else {}
    return engine_key(config, dtype=dtype, max_model_len=max_model_len, device=device, start_mode=start_mode,
                      kv_cache_bytes=kv_cache_bytes, **ranks)


@dataclass(eq=False)
class ParkedEngine:
    """A running engine no instance uses: its key, the checkpoint whose weights it holds, and the host memory it
    holds while parked (its weights and KV cache on CPU; its weights, offloaded, on a sleeping GPU engine)."""

    llm: AsyncLLM
    key: str
    checkpoint: str
    host_bytes: int = 0
    parked_at: float = 0.0


class EnginePool:
    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._parked: list[ParkedEngine] = []  # least recently parked first

    def __len__(self) -> int:
        return len(self._parked)

    def has(self, key: str) -> bool:
        return any(engine.key == key for engine in self._parked)

    @property
    def host_bytes(self) -> int:
        """Host memory the parked engines hold."""
        return sum(engine.host_bytes for engine in self._parked)

    def take(self, key: str, checkpoint: str) -> ParkedEngine | None:
        """A parked engine of `key`, out of the pool: the one holding `checkpoint` if any, else the most recently
        parked. Engines found dead meanwhile are dropped (their processes are gone already)."""
        self._parked = [engine for engine in self._parked if not engine.llm.errored]
        matching = [engine for engine in self._parked if engine.key == key]
        if not matching:
            return None
        engine = next((e for e in matching if e.checkpoint == checkpoint), matching[-1])
        self._parked.remove(engine)
        return engine

    async def park(self, engine: ParkedEngine) -> None:
        """Keep `engine` for a later instance; shuts the oldest down beyond capacity (or `engine` itself when the
        capacity is 0)."""
        engine.parked_at = time.monotonic()
        self._parked.append(engine)
        while len(self._parked) > self.capacity:
            await shut_down(self._parked.pop(0).llm)

    async def close(self) -> None:
        """Shut every parked engine down."""
        parked, self._parked = self._parked, []
        await asyncio.gather(*(shut_down(engine.llm) for engine in parked), return_exceptions=True)


async def shut_down(llm: AsyncLLM) -> None:
    """Stop an engine's processes, off the event loop (it joins them)."""
    if llm.output_handler is not None:
        llm.output_handler.cancel()  # nobody to fail: spare the log a "handler failed" traceback
    await asyncio.to_thread(llm.shutdown)
