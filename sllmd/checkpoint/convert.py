"""Convert a Hugging Face model directory to the sllmd v1 checkpoint format (reading back: `reader.py`).

`convert` streams one tensor at a time from the source files (safetensors bytes are copied raw through
one reusable buffer; `.bin` files are memory-mapped with `torch.load(weights_only=True, mmap=True)`,
never unpickled otherwise) into data files it hashes as it writes, so the model is never held twice in
RAM. The result appears atomically: everything is written and fsynced in a hidden sibling directory that
is renamed into place, so a crash leaves no `dst` (only a hidden `.NAME.tmp-*` directory on SIGKILL).
Torch and transformers are imported only by the functions that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from sllmd.checkpoint.format import (
    CHUNK_BYTES,
    DTYPE_SIZES,
    MANIFEST_FILE,
    PARTITION_MAX_BYTES,
    ConversionError,
    Manifest,
    PartitionEntry,
    PartitionHasher,
    TensorEntry,
    dtype_name,
    partition_file,
    plan_layout,
)
from sllmd.checkpoint.reader import human_bytes as _human
from sllmd.checkpoint.reader import report_failure as _report_failure
from sllmd.fsutil import publish_dir

if TYPE_CHECKING:
    import torch

_IO_BLOCK_BYTES = 16 << 20  # one reusable buffer for source copies
_WRITE_SLICE_BYTES = 64 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20  # safetensors' own limit
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".npz",
                    ".pkl", ".pickle", ".tflite", ".ot"}


@dataclass
class _Source:
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


def _safetensors_sources(path: Path) -> list[_Source]:
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
        sources.append(_Source(name, dtype, shape, end - begin, path=path, start=data_start + begin))
    sources.sort(key=lambda s: s.start)
    return sources


def _torch_sources(path: Path) -> list[_Source]:
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
        sources.append(_Source(name, dtype, shape, tensor.numel() * DTYPE_SIZES[dtype], tensor=tensor))
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


def _model_order(sources: list[_Source], model_names: list[str]) -> list[_Source]:
    """Sort by the model's own state-dict order; a name the model lacks stays right after the known
    name that precedes it in natural order, so a partial match still keeps layers together."""
    rank = {name: i for i, name in enumerate(model_names)}
    keys, last = {}, -1
    for pos, source in enumerate(sorted(sources, key=lambda s: _natural_key(s.name))):
        known = rank.get(source.name)
        last = known if known is not None else last
        keys[source.name] = (last, known is None, pos)
    return sorted(sources, key=lambda s: keys[s.name])


def _content_digest(source: _Source, buffer: memoryview) -> str:
    hasher = PartitionHasher()
    for view in source.chunks(buffer):
        hasher.update(view)
    return hasher.finish()[0]


def _find_aliases(sources: list[_Source], tie_groups: list[list[str]], buffer: memoryview) -> dict[str, str]:
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


class _Progress:
    """One line on `stream`: a bar, bytes done / total and the rate; redrawn at most 10 times a second.
    `callback(done, total)` hears the same, as often."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "converting",
                 callback: Callable[[int, int], None] | None = None) -> None:
        self._total, self._stream, self._label, self._callback = max(total, 1), stream, label, callback
        self._done, self._start, self._drawn = 0, time.monotonic(), 0.0

    def advance(self, nbytes: int) -> None:
        self._done += nbytes
        if time.monotonic() - self._drawn >= 0.1:
            self._draw()

    def _draw(self) -> None:
        self._drawn = time.monotonic()
        if self._callback is not None:
            self._callback(self._done, self._total)
        if self._stream is not None:
            self._draw_bar()

    def _draw_bar(self) -> None:
        assert self._stream is not None
        fraction = min(self._done / self._total, 1.0)
        bar = "#" * int(fraction * 30)
        rate = self._done / max(self._drawn - self._start, 1e-9)
        self._stream.write(f"\r{self._label} [{bar:<30}] {fraction:6.1%} {_human(self._done)} / "
                           f"{_human(self._total)}  {_human(rate)}/s ")
        self._stream.flush()

    def close(self) -> None:
        self._draw()
        if self._stream is not None:
            self._stream.write("\n")
            self._stream.flush()


class _PartitionWriter:
    """Writes the planned tensors into data-NNNNN.bin files in order, zero padding, hashing as it goes."""

    def __init__(self, root: Path, sizes: list[int], chunk_bytes: int, progress: _Progress) -> None:
        self._root, self._sizes, self._chunk_bytes, self._progress = root, sizes, chunk_bytes, progress
        self._fd, self._pos, self._hasher = -1, 0, PartitionHasher(chunk_bytes)
        self.partitions: list[PartitionEntry] = []

    def write_tensor(self, entry: TensorEntry, chunks: Iterator[memoryview]) -> None:
        while len(self.partitions) + (self._fd >= 0) <= entry.partition:
            self._next_partition()
        self._write(bytes(entry.offset - self._pos))
        written = 0
        for view in chunks:
            written += len(view)
            if written > entry.nbytes:
                break
            self._write(view)
            self._progress.advance(len(view))
        if written != entry.nbytes:
            raise ConversionError(f"tensor {entry.name!r}: source gave {written} bytes, expected {entry.nbytes}")

    def finish(self) -> list[PartitionEntry]:
        self._close_partition()
        assert len(self.partitions) == len(self._sizes), "every planned partition holds a tensor"
        return self.partitions

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _next_partition(self) -> None:
        self._close_partition()
        path = self._root / partition_file(len(self.partitions))
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._pos, self._hasher = 0, PartitionHasher(self._chunk_bytes)

    def _close_partition(self) -> None:
        if self._fd < 0:
            return
        size = self._sizes[len(self.partitions)]
        self._write(bytes(size - self._pos))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        digest, chunk_digests = self._hasher.finish()
        self.partitions.append(PartitionEntry(partition_file(len(self.partitions)), size, digest, chunk_digests))

    def _write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self._pos += len(data)


def _is_weight_file(name: str) -> bool:
    if name.endswith(".index.json"):
        name = name[: -len(".index.json")]
    return Path(name).suffix in _WEIGHT_SUFFIXES


def _copy_non_weights(src: Path, dst: Path) -> None:
    """Copy every regular top-level file that is not weights (config, tokenizer, chat template...).
    Sub-directories (e.g. original/ weights) and hidden files are not part of the model."""
    for path in sorted(src.iterdir()):
        if path.name.startswith(".") or not path.is_file() or _is_weight_file(path.name):
            continue
        if path.name == MANIFEST_FILE:
            raise ConversionError(f"{src} has a {MANIFEST_FILE}, a name the checkpoint format reserves")
        shutil.copyfile(path, dst / path.name)  # publish_dir fsyncs it




def convert(src: Path, dst: Path, *, progress: bool = False, progress_stream: TextIO | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            partition_max_bytes: int = PARTITION_MAX_BYTES, chunk_bytes: int = CHUNK_BYTES) -> Manifest:
    """Convert the Hugging Face model directory `src` into a new checkpoint directory `dst`.

    Tensor order is the source state dict's for .bin files; for safetensors (which sort names) the
    order of the model class config.json names, else natural name order. `progress` draws a bar on
    stderr when it is a terminal; `progress_stream` forces one there. `ConversionError` if `dst`
    exists or the source is unusable; on any failure nothing is left at `dst`.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if os.path.lexists(dst):
        raise ConversionError(f"{dst} already exists")
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
    buffer = memoryview(bytearray(_IO_BLOCK_BYTES))
    aliases = _find_aliases(sources, tie_groups, buffer)
    stored = [s for s in sources if s.name not in aliases]
    entries, sizes = plan_layout(((s.name, s.dtype, s.shape) for s in stored), partition_max_bytes=partition_max_bytes)
    metadata = {"source_format": source_format, "order": order}
    # Check names, limits and aliases now, with placeholder digests, rather than after writing every byte.
    placeholder = "0" * 32
    Manifest(entries, [PartitionEntry(partition_file(i), size, placeholder, (placeholder,) * -(-size // chunk_bytes))
                       for i, size in enumerate(sizes)], aliases, chunk_bytes, metadata)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(dst.parent).free < sum(sizes):
        raise ConversionError(f"{dst.parent}: {_human(sum(sizes))} needed, "
                              f"{_human(shutil.disk_usage(dst.parent).free)} free")
    stream = progress_stream if progress_stream is not None else (
        sys.stderr if progress and sys.stderr.isatty() else None)
    bar = _Progress(sum(e.nbytes for e in entries), stream, callback=on_progress)
    tmp = dst.parent / f".{dst.name}.tmp-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    writer = _PartitionWriter(tmp, sizes, chunk_bytes, bar)
    try:
        for entry, source in zip(entries, stored, strict=True):
            writer.write_tensor(entry, source.chunks(buffer))
        manifest = Manifest(entries, writer.finish(), aliases, chunk_bytes, metadata)
        _copy_non_weights(src, tmp)
        (tmp / MANIFEST_FILE).write_bytes(manifest.to_json())
        try:
            publish_dir(tmp, dst)
        except FileExistsError as exc:
            raise ConversionError(str(exc)) from None
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return manifest


def main(argv: list[str] | None = None) -> int:
    """`sllmd convert SRC DST [--no-progress] [--dtype D]`: exit 0, or 1 with one `sllmd: ...` line on stderr.
    A SRC file ending in .gguf is dequantised to D (`sllmd.checkpoint.gguf.convert_gguf`)."""
    parser = argparse.ArgumentParser(prog="sllmd convert", description="Convert a Hugging Face model directory "
                                     "or a GGUF file to the sllmd v1 format.")
    parser.add_argument("src", type=Path, help="Hugging Face model directory (safetensors or pytorch_model.bin), "
                                               "or a .gguf file")
    parser.add_argument("dst", type=Path, help="checkpoint directory to create (must not exist)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="GGUF only: the dtype weights are dequantised to (default float32)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        if args.src.suffix.lower() == ".gguf" and not args.src.is_dir():
            from sllmd.checkpoint.gguf import convert_gguf

            manifest = convert_gguf(args.src, args.dst, dtype=args.dtype, progress=not args.no_progress)
        else:
            manifest = convert(args.src, args.dst, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("sllmd: convert interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return _report_failure(exc)
    seconds = time.monotonic() - start
    print(f"{args.dst}: {len(manifest.tensors)} tensors, {len(manifest.aliases)} aliases, "
          f"{len(manifest.partitions)} partitions, {_human(manifest.total_bytes)} in {seconds:.1f} s "
          f"({_human(manifest.total_bytes / max(seconds, 1e-9))}/s)")
    return 0
