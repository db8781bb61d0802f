"""The running batch's KV cache: one row per sequence, left-padded to a common length.

    python -m pytest -q tests/unit/test_generation_engine.py

Rows join (their prefilled KV is left-padded to the batch length, or the batch is left-padded
to theirs) and leave (rows are dropped, then all-padding columns are trimmed) between decode
steps. A 2D attention mask hides the padding and explicit position ids keep each row's rotary
positions its own, so a row computes what it would compute alone; this is the padding scheme
`generate` uses for batched prompts, applied to a batch whose members change every step.
The tensors have spare room at the end: a decode step writes its token's keys and values in
place instead of concatenating (and so copying) the whole cache, which on CPU cost more than
the attention itself.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
HEADROOM = 64  # tokens of spare room allocated whenever the batch is rebuilt


def left_pad(tensor: torch.Tensor, num: int, dim: int) -> torch.Tensor:
    if num == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = num
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def with_room(tensor: torch.Tensor, capacity: int, dim: int) -> torch.Tensor:
    """`tensor` copied into a zero buffer of `capacity` along `dim`."""
    shape = list(tensor.shape)
    shape[dim] = capacity
    buffer = tensor.new_zeros(shape)
    buffer.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return buffer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with spare room."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        capacity = keys.shape[2] + HEADROOM
        self.key_buffer = with_room(keys, capacity, 2)
        self.value_buffer = with_room(values, capacity, 2)
        self.length = keys.shape[2]
        self.device, self.is_initialized = keys.device, True
        self._set_views()

    def _set_views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + key_states.shape[2]
        if end > self.key_buffer.shape[2]:  # out of room: double it (amortised O(1) per token)
            capacity = max(end, 2 * self.key_buffer.shape[2])
            self.key_buffer = with_room(self.key_buffer, capacity, 2)
            self.value_buffer = with_room(self.value_buffer, capacity, 2)
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values


class BatchKV:
    """KV per layer [B, heads, L, head_dim], padding mask [B, L], next position per row."""

    def __init__(self, device: torch.device, mask_4d: bool = False) -> None:
        self.device = device
        self.mask_4d = mask_4d
        """Hand the model a ready boolean [B, 1, 1, L] mask (sdpa) instead of a 2D one."""
        self.cache = DynamicCache()
        self.mask = torch.zeros(0, HEADROOM, dtype=torch.bool, device=device)
        self.padded = False
        """Some row has padding columns; without any, no mask is needed (the fast kernels)."""
        self.length = 0
        self.positions = torch.zeros(0, dtype=torch.long, device=device)

    @property
    def num_rows(self) -> int:
        return int(self.positions.shape[0])

    def layers(self) -> LayerKV:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def append(self, rows: list[LayerKV]) -> None:
        """Add sequences whose (unpadded, batch-1) KV came out of prefill; they go last."""
        if not rows:
            return
        lengths = [row[0][0].shape[2] for row in rows]
        target = max([self.length, *lengths])
        pieces = [self._padded(self.layers(), target - self.length)] if self.num_rows else []
        pieces += [self._padded(row, target - n) for row, n in zip(rows, lengths, strict=True)]
        layers = [
            (torch.cat([p[i][0] for p in pieces]), torch.cat([p[i][1] for p in pieces]))
            for i in range(len(pieces[0]))
        ]
        new_mask = torch.zeros(len(rows), target, dtype=torch.bool, device=self.device)
        for i, n in enumerate(lengths):
            new_mask[i, target - n :] = True
        old_mask = left_pad(self.mask[:, : self.length], target - self.length, 1)
        new_positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self._rebuild(layers, torch.cat([old_mask, new_mask]))
        self.positions = torch.cat([self.positions, new_positions])

    @staticmethod
    def _padded(layers: LayerKV, pad: int) -> LayerKV:
        return [(left_pad(k, pad, 2), left_pad(v, pad, 2)) for k, v in layers]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in this order) and trim columns that are padding for all of them."""
        if not rows:
            self.__init__(self.device, self.mask_4d)  # type: ignore[misc]
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        mask = self.mask[:, : self.length].index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])
        layers = [
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v in self.layers()
        ]
        self._rebuild(layers, mask[:, first:])
        self.positions = self.positions.index_select(0, index)

    def _rebuild(self, layers: LayerKV, mask: torch.Tensor) -> None:
        self.cache = DynamicCache()
        self.cache.layers = [GrowingLayer(k, v) for k, v in layers]
        self.length = mask.shape[1]
        self.mask = with_room(mask, self.length + HEADROOM, 1)
        self.padded = not bool(mask.all())

    def decode_inputs(self) -> tuple[DynamicCache, torch.Tensor | None, torch.Tensor]:
        """Cache, attention mask (with the new token's column; None when no row is padded) and
        position ids for one step."""
        if self.length + 1 > self.mask.shape[1]:
            self.mask = with_room(self.mask, 2 * self.mask.shape[1], 1)
        self.mask[:, self.length] = True
        if not self.padded:
            return self.cache, None, self.positions[:, None]
        mask = self.mask[:, : self.length + 1]
        mask = mask[:, None, None, :] if self.mask_4d else mask.long()
        return self.cache, mask, self.positions[:, None]

    def advance(self) -> None:
        """After a decode step appended one token (in place) to every row."""
        self.length += 1
        self.positions = self.positions + 1
