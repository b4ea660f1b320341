"""The decode batch of the transformers backend: requests that decode together, their KV caches merged into
one left-padded `DynamicCache`, one forward pass per step for all of them.

Layout. Row r's cache holds its own tokens at the right end of a common physical length L; the columns to
their left are padding, zero in the cache and 0 in the attention mask (`mask`, [B, L]), so attention gives
them exactly zero weight. Each step feeds every row's last token at physical column L with its own logical
position (the number of its real tokens so far), which is what `generate()` does for a left-padded batch:
the model's positions (RoPE, learned, ALiBi) and sliding windows see each row as if it were alone. The
logits equal a lone row's up to floating-point rounding (the reductions run over a longer, padded axis).

Joining pads the shorter side on the left and stacks the rows; leaving selects the remaining rows and drops
the leading columns that became padding in every row. Both copy the KV once, at step boundaries; a step in
between only appends, as a lone row's does. A sliding-window layer keeps the last `sliding_window - 1`
physical columns of every row and counts the physical length in `cumulative_length`, kept equal to L.

Only caches made of full (`DynamicLayer`) and sliding-window (`DynamicSlidingWindowLayer`) layers can be
merged (`can_batch`); a model with any other kind of layer decodes each request on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

Row = TypeVar("Row")


def can_batch(cache: DynamicCache) -> bool:
    """Whether every layer of `cache` is one `DecodeBatch` knows how to merge and split."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes the keys and values of `cache` hold."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def _pad_left(states: torch.Tensor, num_columns: int) -> torch.Tensor:
    if num_columns == 0:
        return states
    batch, heads, _, dim = states.shape
    return torch.cat([states.new_zeros(batch, heads, num_columns, dim), states], dim=2)


class DecodeBatch(Generic[Row]):
    """Rows (any object; the engine's requests) decoding together over one merged cache. Not thread-safe:
    the engine's worker thread owns it."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] int64: 1 where a row has a real token

    @property
    def length(self) -> int:
        """L: the physical length of every row's cache."""
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, row: Row, cache: DynamicCache) -> None:
        """Take `row` into the batch with its own single-row `cache` (of its prompt and the tokens generated so
        far, all but the last, which the next step feeds); the batch owns that cache object from now on."""
        num_tokens = cache.get_seq_length()
        mask = torch.ones((1, num_tokens), dtype=torch.long, device=_device(cache))
        if self.cache is None or self.mask is None:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        length = max(self.length, num_tokens)
        for ours, theirs in zip(self.cache.layers, cache.layers, strict=True):
            width = max(ours.keys.shape[2], theirs.keys.shape[2])  # a sliding layer's is at most window - 1
            ours.keys = torch.cat([_pad_left(ours.keys, width - ours.keys.shape[2]),
                                   _pad_left(theirs.keys, width - theirs.keys.shape[2])])
            ours.values = torch.cat([_pad_left(ours.values, width - ours.values.shape[2]),
                                     _pad_left(theirs.values, width - theirs.values.shape[2])])
            if isinstance(ours, DynamicSlidingWindowLayer):
                ours.cumulative_length = length
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (length - self.length, 0)),
                               torch.nn.functional.pad(mask, (length - num_tokens, 0))])
        self.rows.append(row)

    def remove(self, leaving: Sequence[Row]) -> None:
        """Drop `leaving` (rows of this batch) and the leading columns no remaining row uses."""
        gone = {id(row) for row in leaving}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        unused = int(self.mask.any(dim=0).int().argmax())  # leading all-padding columns (a row ends in a token)
        old_length = self.length
        self.mask = self.mask[:, unused:]
        for layer in self.cache.layers:
            # The layer holds the last `width` of the `old_length` physical columns.
            width = layer.keys.shape[2]
            drop = max(0, unused - (old_length - width))
            layer.keys = layer.keys[index, :, drop:]
            layer.values = layer.values[index, :, drop:]
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = old_length - unused

    def step_inputs(self, last_ids: Sequence[int]) -> dict[str, object]:
        """The forward pass's arguments that feed row i's `last_ids[i]`; the mask grows by the new column."""
        assert self.cache is not None and self.mask is not None
        device = self.mask.device
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's real tokens so far: the new one's position
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        return {"input_ids": torch.tensor([[token] for token in last_ids], dtype=torch.long, device=device),
                "attention_mask": self.mask, "position_ids": positions,
                "cache_position": torch.tensor([self.length - 1], dtype=torch.long, device=device),
                "past_key_values": self.cache, "use_cache": True}


def _device(cache: DynamicCache) -> torch.device:
    return next(layer.keys.device for layer in cache.layers if layer.is_initialized)
