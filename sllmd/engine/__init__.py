"""Inference backends behind one contract (`base.Engine`)."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmd.engine.base import Engine
from sllmd.types import Backend

if TYPE_CHECKING:
    from sllmd.checkpoint.dram import DramCache
    from sllmd.engine.vllm_pool import EnginePool

_MODULES = {
    Backend.DUMMY: ("sllmd.engine.dummy", "DummyEngine"),
    Backend.TRANSFORMERS: ("sllmd.engine.transformers", "TransformersEngine"),
    Backend.VLLM: ("sllmd.engine.vllm", "VllmEngine"),
}
# Imported by `preload_backends` where installed: `sllmd.engine.vllm` itself imports vllm only when used.
_VLLM_CLIENT_MODULE = "vllm.v1.engine.async_llm"


def import_backend(backend: Backend) -> type[Engine]:
    module_name, class_name = _MODULES[backend]
    return getattr(importlib.import_module(module_name), class_name)


def preload_backends() -> None:
    """Import every backend and the tokenizer library now, from one thread.

    The daemon calls this once before it reports ready: a cold start then pays no import time
    (torch + transformers take seconds; vllm, where installed, more; see `hf_model.preload` for what a first
    model build would add), and no two threads ever run
    transformers' lazy imports at once, which is not thread-safe (an `ImportError` for a name that exists).
    """
    from transformers import AutoTokenizer  # noqa: F401 - imported for its side effect

    for backend in _MODULES:
        import_backend(backend)
    from sllmd.engine.hf_model import preload

    preload()
    if importlib.util.find_spec("vllm") is not None:  # optional: the `vllm` extra
        importlib.import_module(_VLLM_CLIENT_MODULE)


def check_model(backend: Backend, config: dict[str, Any]) -> None:
    """`UnsupportedArchitecture` unless `backend` serves the model of `config` (a config.json) correctly.
    Blocking (the vLLM check may inspect its model registry in a subprocess the first time)."""
    import_backend(backend).check_model(config)


@dataclass(frozen=True)
class EngineResources:
    """What a node lends the engines it creates: its DRAM cache of checkpoints, its decode-batch limits (the
    transformers backend reads through the one and batches within the others) and the instance's KV-cache
    budget (`max_batch_kv_bytes`: the transformers batch's cap, a vLLM engine's KV-cache size), and for vLLM
    engines the pool of parked engines and the directory of shape directories and compile cache (see
    `sllmd.engine.vllm`)."""

    dram_cache: DramCache | None = None
    max_batch_size: int = 32
    max_batch_kv_bytes: int = 2 << 30
    vllm_pool: EnginePool | None = None
    vllm_dir: Path | None = None


NO_RESOURCES = EngineResources()  # engines on their own: no DRAM cache, no parked engines, vLLM's default cache


def create_engine(backend: Backend, checkpoint_dir: Path, device: str, *, dtype: str = "float32",
                  max_model_len: int | None = None, start_mode: str = "compiled",
                  resources: EngineResources = NO_RESOURCES, tensor_parallel_size: int = 1) -> Engine:
    """A new, not yet started engine for the local checkpoint directory `checkpoint_dir` (an sllmd v1
    checkpoint from the store, or a Hugging Face directory), computing in `dtype` (a serving dtype) with at
    most `max_model_len` tokens of prompt + completion (None: the model's own), started in `start_mode`
    (vLLM's; the others always start eagerly), over `tensor_parallel_size` devices (vLLM's; `device` then names
    them all, "cuda:N,M", or is "cpu")."""
    engine_class = import_backend(backend)
    if backend is Backend.DUMMY:
        return engine_class(checkpoint_dir, max_model_len=max_model_len)
    if backend is Backend.VLLM:
        return engine_class(checkpoint_dir, device, dtype=dtype, max_model_len=max_model_len, start_mode=start_mode,
                            pool=resources.vllm_pool, vllm_dir=resources.vllm_dir,
                            kv_cache_bytes=resources.max_batch_kv_bytes, tensor_parallel_size=tensor_parallel_size)
    return engine_class(checkpoint_dir, device, dtype=dtype, max_model_len=max_model_len,
                        dram_cache=resources.dram_cache, max_batch_size=resources.max_batch_size,
                        max_batch_kv_bytes=resources.max_batch_kv_bytes)
