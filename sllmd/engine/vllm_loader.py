"""The `sllmd` load format for vLLM: an engine's weights read by sllmd's loader, through vLLM's public
model-loader registry (`register_model_loader`), with no patching of vLLM; and the methods sllmd calls on vLLM's
worker through `collective_rpc` (`SllmdWorkerExtension`, vLLM's `worker_extension_cls`).

vLLM builds and loads the model in its worker process, which it spawns (or forks) itself; a loader
registered only in the daemon would not exist there. So `register` is sllmd's `vllm.general_plugins`
entry point (pyproject.toml): vLLM calls it in every one of its processes before any model loads.
This module imports vllm at the top, so only vLLM's processes and `sllmd.engine.vllm` (after it has
imported vllm) import it.

What the loader reads: the directory `model_loader_extra_config["checkpoint"]` names, else vLLM's model
directory (sllmd gives vLLM a *shape directory* holding only config.json, so that vLLM's compile cache, keyed by
the model path among the rest, is shared by every model of one shape; see `sllmd.engine.vllm`):
* an sllmd v1 checkpoint (it has manifest.json), on one rank: `load_checkpoint` onto the device of the
  model's parameters (the staged, pinned-pool pipeline on CUDA; straight into one host buffer on CPU), then
  the tensors go to the model's own `load_weights` (which fuses q/k/v and gate/up as vLLM's layers want);
* the same with tensor parallelism (world size over 1): each rank's `load_weights` gets views of the data files
  mapped (`mapped.map_tensors`) instead. vLLM's weight loaders narrow each full tensor to the rank's shard and
  copy that to the device, so a rank reads only the pages of its shard (`sllmd.checkpoint.shards`: one range
  for a dim-0 split, one per row for a dim-1 split) and its device holds only its shard, where loading the
  whole checkpoint onto every device would need k times the model's memory. The ranks of a node share the page
  cache, so the node reads each page from the disk once however the shards interleave;
* anything else (a Hugging Face directory): vLLM's own `DefaultModelLoader` with the `auto` format,
  timed the same way, so both paths report alike.

Tiers: this process cannot see the daemon's DRAM cache, so a vLLM engine's DRAM tier is the kernel's page
cache over the store's files (shared by every process; `sllmd.worker.warming` fills it for vLLM
deployments). A v1 checkpoint load reports tier "dram" when every page of its data files was resident as
the load began (`resident_fraction`; the loader then copies from the page cache), else "ssd" (the loader
reads what is not resident with O_DIRECT). The simplest correct rule: a partly resident checkpoint counts
as "ssd", and pages the kernel evicts mid-load make a "dram" load slower, which the estimators absorb.
A Hugging Face directory always reports "ssd".

The worker cannot hand a Python object back to the engine, so the load's report is written as JSON (by rank 0
only) to the file named by `model_loader_extra_config["report_path"]` (see `read_report`), with the wall-clock
times (`time.time()`) the engine needs to split its start into phases: when this worker process started, when it
had imported vLLM (the plugin registered), and when the load began and ended.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.model_loader import BaseModelLoader, DefaultModelLoader, register_model_loader

from sllmd.checkpoint.fetch import WEIGHT_SUFFIXES
from sllmd.checkpoint.loader import load_checkpoint
from sllmd.checkpoint.manifest import MANIFEST_FILE
from sllmd.checkpoint.mapped import map_tensors
from sllmd.checkpoint.reader import read_manifest, resident_fraction
from sllmd.types import LoadReport

LOAD_FORMAT = "sllmd"
REPORT_PATH_KEY = "report_path"
CHECKPOINT_KEY = "checkpoint"
_registered_at = 0.0  # time.time() when this process registered the load format: vLLM is imported by then


class WeightsMissing(RuntimeError):
    """The checkpoint lacks tensors the model needs (the model would run on uninitialised memory)."""


def register() -> None:
    """vLLM plugin entry point: make `load_format="sllmd"` known in this process (vLLM calls its general
    plugins once per process)."""
    global _registered_at
    _registered_at = time.time()
    register_model_loader(LOAD_FORMAT)(SllmdModelLoader)


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What the worker's load wrote to the report file: the `LoadReport` (`load_s` covers checkpoint bytes to the
    model's parameters; `init_s` is 0, the engine adds what else its start took) and wall-clock times."""

    report: LoadReport
    process_started_at: float  # the worker process's start
    registered_at: float  # vLLM imported in it
    load_started_at: float
    load_ended_at: float


def read_report(path: Path) -> WorkerLoad:
    fields = json.loads(Path(path).read_text())
    return WorkerLoad(LoadReport(**fields.pop("report")), **fields)


def _process_started_at() -> float:
    """time.time() at which this process started (from /proc: its start in clock ticks since boot)."""
    with open("/proc/self/stat") as f:
        ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime_s = float(f.read().split()[0])
    return time.time() - uptime_s + ticks / os.sysconf("SC_CLK_TCK")


def load_from(path: Path, model: nn.Module, consume: Callable[[Iterator[tuple[str, torch.Tensor]]], Any]
              ) -> tuple[LoadReport, Any]:
    """Pass the (name, tensor) pairs of the v1 checkpoint `path` (tied aliases too: the model decides what it
    keeps) to `consume`: on one rank loaded by sllmd's loader onto the device of `model`'s parameters, under
    tensor parallelism as views of the mapped files, which `consume` narrows to this rank's shard (see the
    module docstring). Returns the load's report (`num_bytes`: the whole checkpoint's, which the ranks read
    between them) and what `consume` returned."""
    t0 = time.perf_counter()
    tier = "dram" if resident_fraction(path) == 1.0 else "ssd"
    device = next(model.parameters()).device
    if get_tensor_model_parallel_world_size() > 1:
        manifest = read_manifest(path)
        result = consume(iter(map_tensors(path, manifest).items()))
        num_bytes = manifest.total_bytes
    else:
        loaded = load_checkpoint(path, device)
        try:
            result = consume(iter(loaded.tensors.items()))
        finally:
            loaded.release()
        num_bytes = loaded.report.num_bytes
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # asynchronous copies count as loading
    return LoadReport(tier, num_bytes, load_s=time.perf_counter() - t0, init_s=0.0), result


class SllmdModelLoader(BaseModelLoader):
    """`BaseModelLoader.load_model` builds the model on the target device, then calls `load_weights`."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = set(extra) - {REPORT_PATH_KEY, CHECKPOINT_KEY}
        if unknown:
            raise ValueError(f"load format {LOAD_FORMAT!r} takes only {REPORT_PATH_KEY!r} and {CHECKPOINT_KEY!r}, "
                             f"not {sorted(unknown)}")
        self.report_path = extra.get(REPORT_PATH_KEY)
        self.checkpoint = extra.get(CHECKPOINT_KEY)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: sllmd's store has already put the checkpoint on local disk."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        path = Path(self.checkpoint or model_config.model)
        started_at, t0 = time.time(), time.perf_counter()
        if (path / MANIFEST_FILE).is_file():
            report, loaded_names = load_from(path, model, model.load_weights)
            _check_all_loaded(model, loaded_names, path)
        else:
            own = dataclasses.replace(self.load_config, load_format="auto", model_loader_extra_config={})
            DefaultModelLoader(own).load_weights(model, model_config)
            if next(model.parameters()).device.type == "cuda":
                torch.cuda.synchronize()
            num_bytes = sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
            report = LoadReport("ssd", num_bytes, load_s=time.perf_counter() - t0, init_s=0.0)
        # Every rank loads; one report, written by one writer (ranks' concurrent writes could interleave).
        if self.report_path is not None and get_tensor_model_parallel_rank() == 0:
            load = WorkerLoad(report, _process_started_at(), _registered_at or started_at, started_at, time.time())
            Path(self.report_path).write_text(json.dumps(dataclasses.asdict(load)))


class SllmdWorkerExtension:
    """Methods vLLM mixes into its worker class (`worker_extension_cls`), which the engine calls with
    `AsyncLLM.collective_rpc`. Names are sllmd's own: vLLM refuses an extension that shadows a worker method."""

    def sllmd_swap_weights(self, checkpoint_dir: str) -> dict:
        """Put the weights of the v1 checkpoint `checkpoint_dir` (a model of the running one's shape) in place of
        the running model's, through vLLM's in-place reload (which redoes the weights' post-processing);
        returns the load's `LoadReport` as a dict. The caller resets the prefix cache: its blocks were computed
        with the old weights."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        report, _ = load_from(Path(checkpoint_dir), model,
                              lambda weights: self.reload_weights(weights_iterator=weights))  # type: ignore[attr-defined]
        return dataclasses.asdict(report)

    def sllmd_compile_seconds(self) -> float:
        """Seconds this worker spent in torch.compile at start (0 in eager mode, or when its cache had it)."""
        return float(self.vllm_config.compilation_config.compilation_time)  # type: ignore[attr-defined]


def _check_all_loaded(model: nn.Module, loaded_names: set[str] | None, path: Path) -> None:
    """Like vLLM's own loader: a model whose `load_weights` reports what it loaded must have loaded every
    parameter."""
    if loaded_names is None:
        return
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded_names))
    if missing:
        raise WeightsMissing(f"{path}: no tensor for {', '.join(missing[:5])}"
                             f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
