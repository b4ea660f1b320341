"""Reading the weights of a Hugging Face model directory, for `sllmd.checkpoint.convert`.

`read_model(src, buffer)` finds the weight files (safetensors wins over pytorch_model.bin; an index file names
the shards), lists every tensor without loading it (safetensors: byte ranges copied raw; `.bin`: memory-mapped
with `torch.load(weights_only=True, mmap=True)`, never unpickled otherwise), puts them in the order the model
uses them and finds tied tensors (aliases). `SourceTensor.chunks` streams one tensor's bytes, through the
caller's reusable buffer for safetensors. `is_weight_file` names what a checkpoint does not copy. Failures
are `ConversionError`s. Torch and transformers are imported only by the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmd.checkpoint.errors import ConversionError
from sllmd.checkpoint.layout import PartitionHasher
from sllmd.checkpoint.manifest import DTYPE_SIZES
from sllmd.checkpoint.tensors import dtype_name

if TYPE_CHECKING:
    import torch

_WRITE_SLICE_BYTES = 64 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz",
                    ".pkl", ".pickle", ".tflite", ".ot"}


@dataclass(frozen=True)
class SourceModel:
    """A source directory's tensors in write order, with `aliases` (alias -> the tensor it shares, which is in
    `tensors`) among them, and how it was read: `source_format` "safetensors" | "pytorch", `order` "file"
    (a .bin state dict's own) | "model" (the order of the model class config.json names) | "natural"."""

    tensors: list[SourceTensor]
    aliases: dict[str, str]
    source_format: str
    order: str

    @property
    def stored(self) -> list[SourceTensor]:
        """The tensors a checkpoint stores: every one that is not an alias."""
        return [s for s in self.tensors if s.name not in self.aliases]


def read_model(src: Path, buffer: memoryview) -> SourceModel:
    """The tensors of the Hugging Face model directory `src` (`buffer`: scratch for comparing tied tensors).
    For safetensors (which sort names) the order is the model class's, else natural name order."""
    source_format, shards = _find_weights(src)
    model_names, tie_groups = _model_hints(src)
    sources = [s for shard in shards
               for s in (_safetensors_sources(shard) if source_format == "safetensors" else _torch_sources(shard))]
    if not sources:
        raise ConversionError(f"no tensors in {src}")
    if len({s.name for s in sources}) != len(sources):
        raise ConversionError(f"{src}: a tensor name appears in more than one shard")
    order = "file"
    if source_format == "safetensors":
        sources = _model_order(sources, model_names or [])
        order = "model" if model_names else "natural"
    return SourceModel(sources, _find_aliases(sources, tie_groups, buffer), source_format, order)


@dataclass
class SourceTensor:
    """One source tensor: raw bytes at [start, start+nbytes) of a safetensors file, or a torch tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    path: Path | None = None
    start: int = 0
    tensor: torch.Tensor | None = None

    def chunks(self, buffer: memoryview) -> Iterator[memoryview]:
        """The bytes in order, as views valid until the next one is requested."""
        if self.tensor is not None:
            flat = self.tensor.detach().contiguous().reshape(-1).view(_uint8()).numpy()
            data = memoryview(flat).cast("B")
            for start in range(0, len(data), _WRITE_SLICE_BYTES):
                yield data[start : start + _WRITE_SLICE_BYTES]
            return
        assert self.path is not None
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < self.nbytes:
                view = buffer[: min(len(buffer), self.nbytes - done)]
                got = os.preadv(f.fileno(), [view], self.start + done)
                if got == 0:
                    raise ConversionError(f"{self.path.name}: unexpected end of file in tensor {self.name!r}")
                done += got
                yield view[:got]


def _uint8() -> torch.dtype:
    import torch

    return torch.uint8


def _find_weights(src: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'pytorch', shard files in order). Safetensors wins when both are present."""
    for kind, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                                ("pytorch", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (src / index).is_file():
            return kind, _index_shards(src, src / index)
        if (src / single).is_file():
            return kind, [src / single]
    raise ConversionError(f"no weights in {src} (expected model.safetensors[.index.json] or "
                          "pytorch_model.bin[.index.json])")


def _index_shards(src: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConversionError(f"{index.name}: not a valid weight index ({exc})") from None
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise ConversionError(f"{index.name}: shard {name!r} is not a plain file name in {src}")
        if not (src / name).is_file():
            raise ConversionError(f"{index.name}: shard {name} is missing")
    return [src / name for name in files]


def _safetensors_sources(path: Path) -> list[SourceTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < header_len <= min(_MAX_SAFETENSORS_HEADER, size - 8):
            raise ConversionError(f"{path.name}: not a safetensors file")
        try:
            header = json.loads(f.read(header_len))
            assert isinstance(header, dict)
        except (ValueError, AssertionError):
            raise ConversionError(f"{path.name}: safetensors header is not a JSON object") from None
    data_start = 8 + header_len
    sources = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            numel = 1
            for dim in shape:
                assert type(dim) is int and dim >= 0
                numel *= dim
            assert type(begin) is int and type(end) is int and 0 <= begin <= end <= size - data_start
        except (KeyError, TypeError, ValueError, AssertionError):
            raise ConversionError(f"{path.name}: bad safetensors entry for {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise ConversionError(f"{path.name}: tensor {name!r} has dtype {dtype}, unsupported by the format")
        if end - begin != numel * DTYPE_SIZES[dtype]:
            raise ConversionError(f"{path.name}: tensor {name!r} spans {end - begin} bytes, its shape needs "
                                  f"{numel * DTYPE_SIZES[dtype]}")
        sources.append(SourceTensor(name, dtype, shape, end - begin, path=path, start=data_start + begin))
    sources.sort(key=lambda s: s.start)
    return sources


def _torch_sources(path: Path) -> list[SourceTensor]:
    import pickle

    import torch

    if sys.byteorder != "little":
        raise ConversionError("converting .bin checkpoints needs a little-endian host")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise ConversionError(f"{path.name}: cannot load ({exc})") from None
        # Pre-1.6 (non-zip) files cannot be mapped; weights_only still refuses arbitrary pickles.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConversionError(f"{path.name}: holds objects other than tensors; refusing to unpickle it") from None
    if not isinstance(state, dict):
        raise ConversionError(f"{path.name}: expected a state dict, found {type(state).__name__}")
    sources = []
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"{path.name}: entry {name!r} is not a named tensor")
        try:
            dtype = dtype_name(tensor.dtype)
        except ValueError as exc:
            raise ConversionError(f"{path.name}: tensor {name!r}: {exc}") from None
        shape = tuple(tensor.shape)
        sources.append(SourceTensor(name, dtype, shape, tensor.numel() * DTYPE_SIZES[dtype], tensor=tensor))
    return sources


def _model_hints(src: Path) -> tuple[list[str] | None, list[list[str]]]:
    """The state-dict names of the model class config.json declares, built on the meta device (no
    memory, no remote code), and its groups of tied parameter names; (None, []) if it cannot be built."""
    if not (src / "config.json").is_file():
        return None, []
    try:
        import torch
        import transformers
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = transformers.AutoConfig.from_pretrained(src, trust_remote_code=False)
                archs = getattr(config, "architectures", None) or [""]
                cls = getattr(transformers, str(archs[0]), None)
                with torch.device("meta"):
                    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                        model = cls(config)
                    else:
                        model = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception:  # any model transformers cannot build: use name order and no declared ties
        return None, []
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return list(model.state_dict()), [names for names in groups.values() if len(names) > 1]


def _natural_key(name: str) -> list[tuple[int, Any]]:
    """'layers.10' after 'layers.9': digit runs compare as numbers."""
    return [(1, int(part)) if part.isdigit() else (0, part) for part in re.split(r"(\d+)", name)]


def _model_order(sources: list[SourceTensor], model_names: list[str]) -> list[SourceTensor]:
    """Sort by the model's own state-dict order; a name the model lacks stays right after the known
    name that precedes it in natural order, so a partial match still keeps layers together."""
    rank = {name: i for i, name in enumerate(model_names)}
    keys, last = {}, -1
    for pos, source in enumerate(sorted(sources, key=lambda s: _natural_key(s.name))):
        known = rank.get(source.name)
        last = known if known is not None else last
        keys[source.name] = (last, known is None, pos)
    return sorted(sources, key=lambda s: keys[s.name])


def _content_digest(source: SourceTensor, buffer: memoryview) -> str:
    hasher = PartitionHasher()
    for view in source.chunks(buffer):
        hasher.update(view)
    return hasher.finish()[0]


def _find_aliases(sources: list[SourceTensor], tie_groups: list[list[str]], buffer: memoryview) -> dict[str, str]:
    """alias -> canonical (the first in write order). Tensors sharing storage and view (ties in .bin
    files) always alias; names the model declares tied alias only when both are present with equal bytes."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for source in sources:
        t = source.tensor
        if t is None or source.nbytes == 0:  # empty storages share a null pointer
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[source.name] = seen[key]
        else:
            seen[key] = source.name
    position = {s.name: i for i, s in enumerate(sources)}
    by_name = {s.name: s for s in sources}
    for group in tie_groups:
        present = sorted((n for n in group if n in by_name and n not in aliases), key=position.__getitem__)
        for name in present[1:]:
            first, other = by_name[present[0]], by_name[name]
            if (first.dtype, first.shape) == (other.dtype, other.shape) and (
                _content_digest(first, buffer) == _content_digest(other, buffer)
            ):
                aliases[name] = first.name
    return aliases


def is_weight_file(name: str) -> bool:
    """Whether a file of a model directory holds (or indexes) weights, in any framework's format."""
    if name.endswith(".index.json"):
        name = name[: -len(".index.json")]
    return Path(name).suffix in _WEIGHT_SUFFIXES
