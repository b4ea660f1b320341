"""Convert a Hugging Face model directory to the sllmd v1 checkpoint format (reading back: `reader.py`).

`convert` streams one tensor at a time from the source files (`hf_source` reads them: safetensors bytes are
copied raw through one reusable buffer, `.bin` files are memory-mapped) into data files it hashes as it writes,
so the model is never held twice in RAM. The result appears atomically: everything is written and fsynced in a
hidden sibling directory that is renamed into place, so a crash leaves no `dst` (only a hidden `.NAME.tmp-*`
directory on SIGKILL). `sllmd convert` is `sllmd.tools.convert`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from sllmd.checkpoint.errors import ConversionError, StoreFull
from sllmd.checkpoint.hf_source import is_weight_file, read_model
from sllmd.checkpoint.layout import PartitionHasher, plan_layout
from sllmd.checkpoint.manifest import (
    CHUNK_BYTES,
    MANIFEST_FILE,
    PARTITION_MAX_BYTES,
    Manifest,
    PartitionEntry,
    TensorEntry,
    partition_file,
)
from sllmd.checkpoint.progress import ProgressBar, human_bytes
from sllmd.fsutil import publish_dir

_IO_BLOCK_BYTES = 16 << 20  # one reusable buffer for source copies


class _PartitionWriter:
    """Writes the planned tensors into data-NNNNN.bin files in order, zero padding, hashing as it goes."""

    def __init__(self, root: Path, sizes: list[int], chunk_bytes: int, progress: ProgressBar) -> None:
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


def _copy_non_weights(src: Path, dst: Path) -> None:
    """Copy every regular top-level file that is not weights (config, tokenizer, chat template...).
    Sub-directories (e.g. original/ weights) and hidden files are not part of the model."""
    for path in sorted(src.iterdir()):
        if path.name.startswith(".") or not path.is_file() or is_weight_file(path.name):
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
    buffer = memoryview(bytearray(_IO_BLOCK_BYTES))
    model = read_model(src, buffer)
    stored, aliases = model.stored, model.aliases
    entries, sizes = plan_layout(((s.name, s.dtype, s.shape) for s in stored), partition_max_bytes=partition_max_bytes)
    metadata = {"source_format": model.source_format, "order": model.order}
    # Check names, limits and aliases now, with placeholder digests, rather than after writing every byte.
    placeholder = "0" * 32
    Manifest(entries, [PartitionEntry(partition_file(i), size, placeholder, (placeholder,) * -(-size // chunk_bytes))
                       for i, size in enumerate(sizes)], aliases, chunk_bytes, metadata)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(dst.parent).free < sum(sizes):  # no path in the message: it may reach an API client
        raise StoreFull(f"converting the checkpoint needs {human_bytes(sum(sizes))} of disk, "
                        f"{human_bytes(shutil.disk_usage(dst.parent).free)} free")
    stream = progress_stream if progress_stream is not None else (
        sys.stderr if progress and sys.stderr.isatty() else None)
    bar = ProgressBar(sum(e.nbytes for e in entries), stream, callback=on_progress)
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
