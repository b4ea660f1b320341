"""The `sllmd` load format for vLLM: an engine's weights read by sllmd's loader, through vLLM's public
model-loader registry (`register_model_loader`), with no patching of vLLM.

vLLM builds and loads the model in its worker process, which it spawns (or forks) itself; a loader
registered only in the daemon would not exist there. So `register` is sllmd's `vllm.general_plugins`
entry point (pyproject.toml): vLLM calls it in every one of its processes before any model loads.
This module imports vllm at the top, so only vLLM's processes and `sllmd.engine.vllm` (after it has
imported vllm) import it.

What the loader reads, by the model directory vLLM was given:
* an sllmd v1 checkpoint (it has manifest.json): `load_checkpoint` onto the device of the model's
  parameters (the staged, pinned-pool pipeline on CUDA; straight into one host buffer on CPU), then the
  tensors go to the model's own `load_weights` (which fuses q/k/v and gate/up as vLLM's layers want);
* anything else (a Hugging Face directory): vLLM's own `DefaultModelLoader` with the `auto` format,
  timed the same way, so both paths report alike.

Tiers: this process cannot see the daemon's DRAM cache, so a vLLM engine's DRAM tier is the kernel's page
cache over the store's files (shared by every process; `sllmd.worker.warming` fills it for vLLM
deployments). A v1 checkpoint load reports tier "dram" when every page of its data files was resident as
the load began (`resident_fraction`; the loader then copies from the page cache), else "ssd" (the loader
reads what is not resident with O_DIRECT). The simplest correct rule: a partly resident checkpoint counts
as "ssd", and pages the kernel evicts mid-load make a "dram" load slower, which the estimators absorb.
A Hugging Face directory always reports "ssd".

The worker cannot hand a Python object back to the engine, so the load's `LoadReport` is written as
JSON to the file named by `model_loader_extra_config["report_path"]` (see `read_report`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import BaseModelLoader, DefaultModelLoader, register_model_loader

from sllmd.checkpoint.fetch import WEIGHT_SUFFIXES
from sllmd.checkpoint.format import MANIFEST_FILE
from sllmd.checkpoint.loader import load_checkpoint
from sllmd.checkpoint.reader import resident_fraction
from sllmd.engine.base import LoadReport

LOAD_FORMAT = "sllmd"
REPORT_PATH_KEY = "report_path"


class WeightsMissing(RuntimeError):
    """The checkpoint lacks tensors the model needs (the model would run on uninitialised memory)."""


def register() -> None:
    """vLLM plugin entry point: make `load_format="sllmd"` known in this process (vLLM calls its general
    plugins once per process)."""
    register_model_loader(LOAD_FORMAT)(SllmdModelLoader)


def read_report(path: Path) -> LoadReport:
    """The `LoadReport` the loader wrote to `path` (`load_s` covers checkpoint bytes to the model's
    parameters; `init_s` is 0, the engine adds what else its start took)."""
    return LoadReport(**json.loads(Path(path).read_text()))


class SllmdModelLoader(BaseModelLoader):
    """`BaseModelLoader.load_model` builds the model on the target device, then calls `load_weights`."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = set(extra) - {REPORT_PATH_KEY}
        if unknown:
            raise ValueError(f"load format {LOAD_FORMAT!r} takes only {REPORT_PATH_KEY!r}, not {sorted(unknown)}")
        self.report_path = extra.get(REPORT_PATH_KEY)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: sllmd's store has already put the checkpoint on local disk."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        path = Path(model_config.model)
        t0 = time.perf_counter()
        if (path / MANIFEST_FILE).is_file():
            device = next(model.parameters()).device
            tier = "dram" if resident_fraction(path) == 1.0 else "ssd"
            loaded = load_checkpoint(path, device)
            try:
                # Every name of the original checkpoint, tied aliases too: the model decides what it keeps.
                loaded_names = model.load_weights(iter(loaded.tensors.items()))
            finally:
                loaded.release()
            _check_all_loaded(model, loaded_names, path)
            num_bytes = loaded.report.num_bytes
        else:
            own = dataclasses.replace(self.load_config, load_format="auto", model_loader_extra_config={})
            DefaultModelLoader(own).load_weights(model, model_config)
            tier = "ssd"
            num_bytes = sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        if next(model.parameters()).device.type == "cuda":
            torch.cuda.synchronize()  # asynchronous copies count as loading
        report = LoadReport(tier, num_bytes, load_s=time.perf_counter() - t0, init_s=0.0)
        if self.report_path is not None:
            Path(self.report_path).write_text(json.dumps(dataclasses.asdict(report)))


def _check_all_loaded(model: nn.Module, loaded_names: set[str] | None, path: Path) -> None:
    """Like vLLM's own loader: a model whose `load_weights` reports what it loaded must have loaded every
    parameter."""
    if loaded_names is None:
        return
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded_names))
    if missing:
        raise WeightsMissing(f"{path}: no tensor for {', '.join(missing[:5])}"
                             f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}")
