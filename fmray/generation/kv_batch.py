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

A row that finishes is only marked dead at first: it rides along (its position frozen, its
output ignored) until a quarter of the rows are dead, and then one copy compacts them all.
Compacting at every finish copied the whole cache once per finishing step, which cost RL
rollouts (rows that stop one by one) more than the dead rows' share of a forward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]
HEADROOM = 64  # tokens of spare room allocated whenever the batch is rebuilt
DEAD_FRACTION = 0.25  # compact once this share of the rows is dead


def with_room(tensor: torch.Tensor, capacity: int, dim: int) -> torch.Tensor:
    """`tensor` copied into a zero buffer of `capacity` along `dim`."""
    shape = list(tensor.shape)
    shape[dim] = capacity
    buffer = tensor.new_zeros(shape)
    buffer.narrow(dim, 0, tensor.shape[dim]).copy_(tensor)
    return buffer


def right_aligned(
    rows: torch.Tensor, select: torch.Tensor, lengths: torch.Tensor, target: int, capacity: int
) -> torch.Tensor:
    """A new [n, heads, capacity, head_dim] tensor whose row i holds the first lengths[i] columns
    of rows[select[i]] ([N, heads, width, head_dim]) in columns target - lengths[i] .. target - 1
    (one index_select of head_dim-long runs). The other columns repeat the row's own first or
    last column: finite values, which the mask hides (padding) or decode steps overwrite (room)."""
    num_rows, heads, width, dim = rows.shape
    columns = torch.arange(capacity, device=rows.device)
    source = columns[None, :] - (target - lengths)[:, None]
    source = torch.minimum(source.clamp_(min=0), (lengths - 1)[:, None])
    head_rows = select[:, None] * heads + torch.arange(heads, device=rows.device)[None, :]
    flat = (head_rows[:, :, None] * width + source[:, None, :]).view(-1)
    picked = rows.reshape(num_rows * heads * width, dim).index_select(0, flat)
    return picked.view(len(select), heads, capacity, dim)


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are the first `length` columns of buffers with room."""

    def __init__(self, key_buffer: torch.Tensor, value_buffer: torch.Tensor, length: int) -> None:
        super().__init__()
        self.key_buffer = key_buffer
        self.value_buffer = value_buffer
        self.length = length
        self.device, self.is_initialized = key_buffer.device, True
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
    """KV per layer [B, heads, L, head_dim], padding mask [B, L], next position and input token
    per row, and which rows are still live."""

    def __init__(self, device: torch.device, mask_4d: bool = False) -> None:
        self.device = device
        self.mask_4d = mask_4d
        """Hand the model a ready additive [B, 1, 1, L] mask (sdpa) instead of a 2D one."""
        self.cache = DynamicCache()
        self.mask = torch.zeros(0, HEADROOM, dtype=torch.bool, device=device)
        self.bias: torch.Tensor | None = None
        """The mask as sdpa adds it (0 or -inf, the cache's dtype), kept beside it so each step
        hands over one contiguous copy; a strided boolean view slowed sdpa down by a fifth."""
        self.padded = False
        """Some row has padding columns; without any, no mask is needed (the fast kernels)."""
        self.length = 0
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.next_ids = torch.zeros(0, dtype=torch.long, device=device)
        self.live = torch.zeros(0, dtype=torch.bool, device=device)
        self.live_rows: torch.Tensor | None = None
        """Indices of the live rows, in order; None while every row is live."""
        self.num_dead = 0

    @property
    def num_rows(self) -> int:
        return int(self.positions.shape[0])

    def append(
        self, layers: LayerKV, sources: list[int], lengths: list[int], first_ids: torch.Tensor
    ) -> None:
        """Add sequences whose KV is row sources[i] of the prefilled, right-padded layers
        ([N, heads, T, head_dim]; equal prompts share a row), lengths[i] tokens long, with
        first_ids[i] sampled; they go last. Dead rows go now."""
        if self.num_dead:
            self.compact()
        num_old = self.num_rows
        target = max([self.length, *lengths])
        capacity = target + HEADROOM
        select = torch.tensor(sources, dtype=torch.long, device=self.device)
        new_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        old_lengths = torch.full((num_old,), self.length, dtype=torch.long, device=self.device)
        old_select = torch.arange(num_old, device=self.device)
        rebuilt = []
        for i, (keys, values) in enumerate(layers):
            pair = []
            for j, new in enumerate((keys, values)):
                rows = right_aligned(new, select, new_lengths, target, capacity)
                if num_old:
                    old = self.cache.layers[i]
                    old_buffer = old.key_buffer if j == 0 else old.value_buffer
                    old_rows = right_aligned(old_buffer, old_select, old_lengths, target, capacity)
                    rows = torch.cat([old_rows, rows])
                pair.append(rows)
            rebuilt.append(pair)
        columns = torch.arange(capacity, device=self.device)
        mask = columns[None, :] >= (target - torch.cat([old_lengths, new_lengths]))[:, None]
        if num_old:  # the old rows' own padding stays padding
            mask[:num_old, target - self.length : target] = self.mask[:, : self.length]
        self._rebuild(rebuilt, mask, target)
        self.positions = torch.cat([self.positions, new_lengths])
        self.next_ids = torch.cat([self.next_ids, first_ids.to(self.device)])
        self.live = torch.ones(self.num_rows, dtype=torch.bool, device=self.device)

    def drop(self, rows: list[int]) -> None:
        """Mark live rows (indices among the live rows, as the engine orders its running
        sequences) finished; compact once enough of the batch is dead."""
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.live[index if self.live_rows is None else self.live_rows[index]] = False
        self.num_dead += len(rows)
        if self.num_dead == self.num_rows:
            self.__init__(self.device, self.mask_4d)  # type: ignore[misc]
        elif self.num_dead >= DEAD_FRACTION * self.num_rows:
            self.compact()
        else:
            self.live_rows = self.live.nonzero().squeeze(1)

    def compact(self) -> None:
        """Keep only the live rows and trim columns that are padding for all of them."""
        index = self.live.nonzero().squeeze(1)
        mask = self.mask.index_select(0, index)
        first = int(mask[:, : self.length].any(dim=0).nonzero()[0])
        # one copy each, spare room included (the buffers' room is past `length`)
        layers = [
            [
                layer.key_buffer[:, :, first:].index_select(0, index),
                layer.value_buffer[:, :, first:].index_select(0, index),
            ]
            for layer in self.cache.layers
        ]
        self._rebuild(layers, mask[:, first:].contiguous(), self.length - first)
        self.positions = self.positions.index_select(0, index)
        self.next_ids = self.next_ids.index_select(0, index)
        self.live = torch.ones(len(index), dtype=torch.bool, device=self.device)

    def _rebuild(self, layers: list[list[torch.Tensor]], mask: torch.Tensor, length: int) -> None:
        """Buffers [B, heads, capacity, head_dim] and mask [B, capacity] holding `length`
        columns; the mask's room columns become True (decode steps fill them)."""
        self.cache = DynamicCache()
        self.cache.layers = [GrowingLayer(k, v, length) for k, v in layers]
        self.length = length
        self.padded = not bool(mask[:, :length].all())
        mask[:, length:] = True  # the columns decode steps will write
        self.mask = mask
        self.bias = None
        if self.mask_4d and self.padded:
            dtype = layers[0][0].dtype
            self.bias = torch.zeros(mask.shape, dtype=dtype, device=self.device)
            self.bias.masked_fill_(~mask, float("-inf"))
        self.live_rows = None
        self.num_dead = 0

    def decode_inputs(
        self,
    ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor | None, torch.Tensor]:
        """Input ids, cache, attention mask (with the new token's column; None when no row is
        padded) and position ids for one step."""
        end = self.length + 1
        if end > self.mask.shape[1]:
            self.mask = with_room(self.mask, 2 * self.mask.shape[1], 1)
            self.mask[:, end - 1 :] = True
            if self.bias is not None:
                self.bias = with_room(self.bias, 2 * self.bias.shape[1], 1)
        ids, positions = self.next_ids[:, None], self.positions[:, None]
        if not self.padded:
            return ids, self.cache, None, positions
        if self.bias is not None:
            return ids, self.cache, self.bias[:, None, None, :end].contiguous(), positions
        return ids, self.cache, self.mask[:, :end].long(), positions

    def advance(self, tokens: torch.Tensor) -> None:
        """After a decode step appended one column (in place) to every row: the live rows'
        next tokens, in live order. Dead rows keep their position (their output is ignored)."""
        self.length += 1
        if self.live_rows is None:
            self.positions = self.positions + 1
            self.next_ids = tokens
        else:
            self.positions = self.positions + self.live
            self.next_ids = self.next_ids.index_put((self.live_rows,), tokens)
