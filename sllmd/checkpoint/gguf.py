"""Import a GGUF file (llama.cpp's single-file format) as an sllmd v1 checkpoint.

Contract of `convert_gguf(src, dst, *, dtype="float32", progress=False) -> Manifest`:

* `src` is one GGUF file (not a split `-00001-of-0000N` set). It is read with transformers' own GGUF support
  (`AutoConfig` / `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`), which
  dequantises every tensor, whatever its ggml type (F32, F16, BF16, Q8_0, Q4_K...), into `dtype`
  ("float32", "float16" or "bfloat16"), rebuilds the tokenizer from the tokenizer.ggml.* metadata (with the
  chat template the file carries in tokenizer.chat_template) and a generation config from the special ids.
  Only architectures transformers maps from GGUF can be read (llama, mistral, qwen2, qwen3, phi3, gemma...).
* They are saved as a Hugging Face directory (safetensors) in a hidden sibling of `dst`
  (`.NAME.gguf-XXXXXXXX`), which `sllmd.checkpoint.convert.convert` turns into `dst`; the hidden directory is
  deleted whether that succeeds or not. `dst` appears atomically, complete, or not at all (`convert`'s rule).
* Failures are `ConversionError`s with one readable line: `src` is not a GGUF file; the `gguf` (or
  `accelerate`) package is missing ("pip install 'sllmd[gguf]'"); transformers cannot read the file's
  architecture (named from its `general.architecture`); transformers leaves model weights unset; `dst` exists.
* Cost: the dequantised model is held in RAM (once as a model, briefly twice while transformers builds it),
  and the disk beside `dst` needs twice its size until the hidden directory is deleted.

Transformers and torch are imported only when a conversion runs. `sllmd convert MODEL.gguf DST [--dtype]`
(`sllmd.tools.convert`) calls this for a source ending in `.gguf`.
"""

from __future__ import annotations

import functools
import gc
import mmap
import os
import secrets
import shutil
import struct
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sllmd.checkpoint.errors import ConversionError
from sllmd.checkpoint.manifest import Manifest

GGUF_MAGIC = b"GGUF"
DTYPES = ("float32", "float16", "bfloat16")
INSTALL_HINT = "pip install 'sllmd[gguf]'"

# GGUF metadata value types: fixed-size scalars (struct format), 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_MAX_REASON_CHARS = 240


def is_gguf_file(path: Path) -> bool:
    """Whether `path` is a regular file starting with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return Path(path).is_file() and f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file (arrays are given as their length), without reading
    any tensor. `ConversionError` if it is not a (little-endian, v2/v3) GGUF file or its header is cut short."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ConversionError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                return _parse_metadata(blob, path)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def _parse_metadata(blob: mmap.mmap, path: Path) -> dict[str, Any]:
    def read_string(pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", blob, pos)
        if pos + 8 + length > len(blob):
            raise struct.error("string past the end of the file")
        return blob[pos + 8 : pos + 8 + length].decode("utf-8", errors="replace"), pos + 8 + length

    def read_value(pos: int, value_type: int) -> tuple[Any, int]:
        if value_type in _SCALARS:
            (value,) = struct.unpack_from(_SCALARS[value_type], blob, pos)
            return value, pos + struct.calcsize(_SCALARS[value_type])
        if value_type == _STRING:
            return read_string(pos)
        if value_type == _ARRAY:
            element_type, count = struct.unpack_from("<IQ", blob, pos)
            pos += 12
            if element_type in _SCALARS:
                end = pos + count * struct.calcsize(_SCALARS[element_type])
                if end > len(blob):
                    raise struct.error("array past the end of the file")
                return count, end
            for _ in range(count):
                _, pos = read_value(pos, element_type)
            return count, pos
        raise ValueError(f"unknown metadata value type {value_type}")

    try:
        version, _tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ConversionError(f"{path}: GGUF version {version} is not supported (only little-endian v2 and v3)")
        metadata: dict[str, Any] = {}
        pos = 24
        for _ in range(kv_count):
            key, pos = read_string(pos)
            (value_type,) = struct.unpack_from("<I", blob, pos)
            metadata[key], pos = read_value(pos + 4, value_type)
    except (struct.error, ValueError, RecursionError) as exc:
        raise ConversionError(f"{path}: not a valid GGUF file (bad metadata: {exc})") from None
    return metadata


def convert_gguf(src: Path, dst: Path, *, dtype: str = "float32", progress: bool = False,
                 on_progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Convert the GGUF file `src` into a new sllmd v1 checkpoint directory `dst` (see the module docstring).

    `progress` shows transformers' dequantisation bars and `convert`'s bar on stderr when it is a terminal;
    `on_progress(bytes written, bytes total)` hears how the writing of `dst` advances (`convert`'s).
    """
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not src.is_file():
        raise ConversionError(f"{src}: not a file")
    metadata = read_gguf_metadata(src)
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise ConversionError(f"{src}: the GGUF metadata names no general.architecture")
    if int(metadata.get("split.count", 1) or 1) > 1:
        raise ConversionError(f"{src}: one part of a split GGUF ({metadata['split.count']} parts); merge them "
                              "first (llama-gguf-split --merge)")
    if os.path.lexists(dst):
        raise ConversionError(f"{dst} already exists")
    _check_packages()
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.gguf-{secrets.token_hex(4)}"
    os.mkdir(work)
    try:
        source = work / "gguf"
        source.mkdir()
        # Alone in a directory of its own: from_pretrained(dir, gguf_file=...) also reads tokenizer and config
        # files it finds in `dir`, and those beside the user's file may belong to some other model.
        os.symlink(src.resolve(), source / "model.gguf")
        hf_dir = work / "hf"
        _write_hf_dir(source, "model.gguf", hf_dir, src=src, architecture=architecture, dtype=dtype,
                      show_bars=progress and sys.stderr.isatty())
        gc.collect()  # the dequantised model, before convert reads its files back
        from sllmd.checkpoint.convert import convert  # torch: only when a conversion runs

        return convert(hf_dir, dst, progress=progress, on_progress=on_progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_packages() -> None:
    from transformers.utils import is_accelerate_available, is_gguf_available

    if not is_gguf_available():
        raise ConversionError(f"GGUF import needs the gguf package: {INSTALL_HINT}")
    if not is_accelerate_available():
        # transformers' from_pretrained refuses a gguf_file without it
        raise ConversionError(f"GGUF import needs the accelerate package: {INSTALL_HINT}")


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."


def _write_hf_dir(source: Path, gguf_name: str, hf_dir: Path, *, src: Path, architecture: str, dtype: str,
                  show_bars: bool) -> None:
    """Dequantise `source/gguf_name` with transformers and save model, tokenizer and generation config."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    version = transformers.__version__
    with _quiet_transformers(show_bars):
        try:
            config = AutoConfig.from_pretrained(source, gguf_file=gguf_name, local_files_only=True)
        except Exception as exc:
            raise ConversionError(f"{src}: transformers {version} cannot read GGUF architecture {architecture!r}: "
                                  f"{_reason(exc)}") from None
        kwargs: dict[str, Any] = {"gguf_file": gguf_name, "config": config, "dtype": getattr(torch, dtype),
                                  "local_files_only": True, "output_loading_info": True}
        gguf_config = getattr(transformers, "GgufConfig", None)
        if gguf_config is not None:  # transformers >= 5.2x may keep quantised weights packed unless told not to
            kwargs["quantization_config"] = gguf_config(dequantize=True)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except ImportError as exc:  # a missing dependency, not the file's fault
            raise ConversionError(f"GGUF import needs a package transformers cannot import ({_reason(exc)}): "
                                  f"{INSTALL_HINT}") from None
        except Exception as exc:
            raise ConversionError(f"{src}: transformers {version} cannot load GGUF architecture {architecture!r} "
                                  f"as a causal LM: {_reason(exc)}") from None
        # mismatched_keys may hold (name, shape in file, shape in model) tuples
        unset = sorted({key if isinstance(key, str) else str(key[0])
                        for key in (*(info.get("missing_keys") or ()), *(info.get("mismatched_keys") or ()))})
        if unset:
            raise ConversionError(f"{src}: transformers {version} left {len(unset)} weights of this "
                                  f"{architecture!r} model unset (e.g. {unset[0]}): the GGUF names them in a way "
                                  "it does not map")
        packed = [name for name, p in model.named_parameters() if not p.is_floating_point()]
        if packed:
            raise ConversionError(f"{src}: transformers {version} kept {packed[0]} quantised instead of "
                                  "dequantising it")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name, local_files_only=True)
        except Exception as exc:
            raise ConversionError(f"{src}: transformers {version} cannot build a tokenizer from this GGUF: "
                                  f"{_reason(exc)}") from None
        model.save_pretrained(hf_dir)
        del model
        tokenizer.save_pretrained(hf_dir)


@contextmanager
def _quiet_transformers(show_bars: bool) -> Iterator[None]:
    """transformers at error verbosity, and without its progress bars unless `show_bars`."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not show_bars:
        hf_logging.disable_progress_bar()
    # The GGUF dequantiser draws its bar with tqdm itself, not through transformers' switch.
    legacy = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if legacy is None:
        try:
            import transformers.modeling_gguf_pytorch_utils as legacy
        except ImportError:
            legacy = None
    tqdm = getattr(legacy, "tqdm", None)
    if tqdm is not None and not show_bars:
        legacy.tqdm = functools.partial(tqdm, disable=True)  # type: ignore[union-attr]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if tqdm is not None:
            legacy.tqdm = tqdm  # type: ignore[union-attr]
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

