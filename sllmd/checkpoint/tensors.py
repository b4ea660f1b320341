"""Torch tensors of a checkpoint's bytes: the format's dtypes as torch dtypes, and zero-copy views of a
loaded buffer as the manifest's named tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sllmd.checkpoint.manifest import Manifest, dtype_of_torch_name, torch_name


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of the format's dtype `dtype`."""
    return getattr(torch, torch_name(dtype))


def dtype_name(dtype: torch.dtype) -> str:
    """The format's name for a torch dtype; `ValueError` if the format cannot store it."""
    return dtype_of_torch_name(str(dtype).removeprefix("torch."))


def tensor_views(manifest: Manifest, buffer: torch.Tensor, partition_offsets: Sequence[int] | None = None
                 ) -> dict[str, torch.Tensor]:
    """Views into `buffer` (1-D uint8, any device) holding `manifest`'s partitions at `partition_offsets`
    (default: back to back). No copy; aliases map to the very same view as their target."""
    if buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError("buffer must be a 1-D uint8 tensor")
    bases = manifest.partition_offsets() if partition_offsets is None else list(partition_offsets)
    for p, base in zip(manifest.partitions, bases, strict=False):
        if base + p.nbytes > buffer.numel():
            raise ValueError(f"{p.file} at offset {base} does not fit a buffer of {buffer.numel()} bytes")
    views: dict[str, torch.Tensor] = {}
    for t, start in manifest.placements(bases):
        views[t.name] = buffer[start : start + t.nbytes].view(torch_dtype(t.dtype)).view(t.shape)
    for alias, target in manifest.aliases.items():
        views[alias] = views[target]
    return views
