"""Hugging Face causal LMs: which ones the transformers backend serves, and loading one onto a device (from an
sllmd v1 checkpoint through sllmd's loader, or from a Hugging Face directory).

A checkpoint's tensor names are the names it was saved under, not always the names of the model class
that reads it: a checkpoint saved from the base model lacks the `model.`/`transformer.` prefix (the Hub's
`gpt2` and `facebook/opt-*` are), older ones use legacy names (GPT-NeoX's `embed_out`), and transformers 5
fuses some tensors on load (MoE experts). `from_pretrained` handles all of that through transformers'
weight-conversion mapping. `build_model` runs that same machinery on the tensors sllmd's loader produced, on
their device, without copying them: renames, prefixes, conversions, tied weights, `keep_in_fp32` modules,
non-persistent buffers. A weight the model needs and the checkpoint lacks is an error, never a random init.

`from_pretrained(None, state_dict=...)` would do the same steps but places every tensor with
`device_map={"": "cpu"}` unless `accelerate` is installed, which would copy GPU-loaded weights back to the
host; so this module calls the steps `from_pretrained` is made of (`get_model_conversion_mapping`,
`convert_and_load_state_dict_in_model`, `_finalize_model_loading`), unchanged from transformers 5.19 to 5.25.
The architecture matrix tests (tests/test_architectures.py) hold this to `generate()`'s output.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, get_model_conversion_mapping
from transformers.core_model_loading import convert_and_load_state_dict_in_model
from transformers.modeling_utils import LoadStateDictConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.utils import logging as transformers_logging

from sllmd.checkpoint.fetch import WEIGHT_SUFFIXES
from sllmd.checkpoint.loader import load_checkpoint
from sllmd.checkpoint.manifest import MANIFEST_FILE
from sllmd.errors import UnsupportedArchitecture
from sllmd.types import LoadReport

if TYPE_CHECKING:
    from sllmd.checkpoint.dram import DramCache


def preload() -> None:
    """Pay now what the first model build in this process would pay holding the GIL (stalling the event loop
    meanwhile): importing transformers' generation code (~0.2 s here) and compiling its table of weight
    conversions (~1,400 regular expressions, ~0.25 s). What remains for a new architecture is importing its
    modeling module (~0.05 s)."""
    import transformers.generation.utils  # noqa: F401

    get_checkpoint_conversion_mapping("llama")


def causal_lm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class that serves `config` as a causal LM; `UnsupportedArchitecture` naming it otherwise.

    The class must be the one the checkpoint declares (`architectures[0]`) when it declares one: transformers
    maps some encoder configs to a causal head too (BERT → BertLMHeadModel), and serving a masked-LM
    checkpoint through it would give text with HTTP 200 that the model never learnt to produce."""
    declared = list(getattr(config, "architectures", None) or [])
    name = declared[0] if declared else config.model_type
    if getattr(config, "auto_map", None):
        raise UnsupportedArchitecture(f"{name} needs the model's own Python code (trust_remote_code), which sllmd "
                                      "does not run", backend="transformers")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        raise UnsupportedArchitecture(f"{name} (model_type {config.model_type!r}) is not a causal language model "
                                      "transformers can generate with", backend="transformers")
    if declared and declared[0] != model_class.__name__:
        raise UnsupportedArchitecture(f"{declared[0]} is not a causal language model head (transformers generates "
                                      f"with {model_class.__name__} for model_type {config.model_type!r})",
                                      backend="transformers")
    return model_class


def attention_kwargs(config: PretrainedConfig) -> dict[str, str]:
    """`attn_implementation` for building `config`'s model, where transformers' default would compute it wrong:
    the SDPA path of transformers 5.19 drops attention-logit soft-capping (Gemma 2), which eager attention
    applies (5.25 picks eager for Gemma 2 by itself)."""
    if getattr(config.get_text_config(), "attn_logit_softcapping", None):
        return {"attn_implementation": "eager"}
    return {}


def check_architecture(config: dict[str, Any]) -> None:
    """Deploy-time check of a config.json: `UnsupportedArchitecture` unless transformers serves it."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        archs = config.get("architectures") or [model_type]
        raise UnsupportedArchitecture(f"{archs[0]} (model_type {model_type!r}) is unknown to transformers "
                                      f"{_transformers_version()}", backend="transformers")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        parsed = CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as exc:  # a config transformers cannot read is no model it can build
        raise UnsupportedArchitecture(f"{model_type}: transformers cannot read this config.json ({exc})",
                                      backend="transformers") from None
    causal_lm_class(parsed)


def load_model(checkpoint_dir: Path, device: torch.device, dtype: torch.dtype, dram_cache: DramCache | None
               ) -> tuple[PreTrainedModel, LoadReport]:
    """The model of `checkpoint_dir` on `device`, computing in `dtype`, with `load_s` (bytes to the device) and
    `init_s` (building and binding the model) measured. An sllmd v1 checkpoint (it has a manifest) is read by
    sllmd's loader (through `dram_cache` if given) and bound without a copy (`build_model`); a Hugging Face
    directory by `from_pretrained`. The single place a faster loader plugs in."""
    if (checkpoint_dir / MANIFEST_FILE).is_file():
        loaded = load_checkpoint(checkpoint_dir, device, dram_cache=dram_cache)
        t0 = time.perf_counter()
        try:
            model = build_model(checkpoint_dir, loaded.tensors, device, dtype)
        except BaseException:
            loaded.release()
            raise
        # The model owns the load: when it is collected the DRAM-cache entry it views may be evicted.
        model._sllmd_checkpoint = loaded
        return model, dataclasses.replace(loaded.report, init_s=time.perf_counter() - t0)
    # device_map= would load straight to the device but needs `accelerate`; .to() is a no-op on CPU.
    t0 = time.perf_counter()
    transformers_logging.disable_progress_bar()  # a daemon's log is no terminal
    config = AutoConfig.from_pretrained(checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir, config=config, dtype=dtype,
                                                 **attention_kwargs(config)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # count asynchronous copies as loading, not init
    num_bytes = sum(p.stat().st_size for p in checkpoint_dir.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    return model, LoadReport("ssd", num_bytes, load_s=time.perf_counter() - t0, init_s=0.0)


def build_model(checkpoint_dir: Path, tensors: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> PreTrainedModel:
    """The model of `checkpoint_dir/config.json` in eval mode, its weights bound to `tensors` (on `device`)
    without a copy where a tensor's dtype is the model's. `RuntimeError` naming the missing, mis-shaped or
    unconvertible weights if the checkpoint does not fill the model."""
    config = AutoConfig.from_pretrained(checkpoint_dir)
    model_class = causal_lm_class(config)
    transformers_logging.disable_progress_bar()  # "Loading weights" bars: a daemon's log is no terminal
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention_kwargs(config))
    assert type(model) is model_class
    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=str(checkpoint_dir),
        device_map={"": str(device)},  # tensors already on `device` stay where they are
        dtype=dtype,
        dtype_plan=model._get_dtype_plan(dtype),
        weight_mapping=get_model_conversion_mapping(model),
    )
    info, _ = convert_and_load_state_dict_in_model(model, tensors, load_config)
    info = model_class._finalize_model_loading(model, load_config, info)
    problems = [f"no weights for {_names(info.missing_keys)}" if info.missing_keys else "",
                f"mis-shaped {_names(k for k, *_ in info.mismatched_keys)}" if info.mismatched_keys else "",
                f"unconvertible {_names(info.conversion_errors)}" if info.conversion_errors else ""]
    if any(problems):
        raise RuntimeError(f"{checkpoint_dir} does not fill {model_class.__name__}: "
                           + "; ".join(p for p in problems if p))
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device)  # no-op for the bound weights; moves any buffer transformers made elsewhere


def _names(keys: Any) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes `model`'s parameters and buffers hold, each storage once (tied weights share one)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
