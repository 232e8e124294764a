"""Static KV cache: per-layer buffers preallocated to capacity, lengths on the device, O(1) rollback."""
from __future__ import annotations

import torch

from .errors import CapacityError


class KVCache:
    """``k``/``v`` are (layers, batch, capacity, Hkv, D); ``lengths`` is (layers, batch) int32 on the device.

    A layer's length is the position its next K/V entry is written at. Rollback only lowers lengths:
    stale entries past a length are never read and are overwritten by the next append. Decoding uses
    batch 1; batched greedy generation (self-distillation data) gives each sequence its own row and length.
    """

    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, batch: int = 1):
        self.capacity = capacity
        shape = (num_layers, batch, capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_layers, batch, dtype=torch.int32, device=device)

    def row(self, index: int) -> "KVCache":
        """A batch-1 view of one sequence's row, sharing storage (e.g. to prefill prompts of different lengths)."""
        view = object.__new__(KVCache)
        view.capacity = self.capacity
        view.k, view.v = self.k[:, index:index + 1], self.v[:, index:index + 1]
        view.lengths = self.lengths[:, index:index + 1]
        return view

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    def layer(self, index: int):
        """(k_cache, v_cache, cache_seqlens) views for one layer, in attention_with_kvcache's layout."""
        return self.k[index], self.v[index], self.lengths[index]

    def check_room(self, end_position: int) -> None:
        """Host-side guard: appending up to ``end_position`` (exclusive) must fit."""
        if end_position > self.capacity:
            raise CapacityError(f"sequence of {end_position} tokens exceeds the KV cache capacity of "
                                f"{self.capacity}; shorten the prompt or --max-new-tokens")

    def advance(self, start: int, end: int, count) -> None:
        """Layers [start, end) have appended ``count`` entries (an int or a device tensor)."""
        self.lengths[start:end].add_(count)  # in place on the view: one kernel, no copy-back

    def set_lengths(self, length, start: int = 0, end: int | None = None) -> None:
        """Place the next append of layers [start, end) at ``length`` (int or device tensor)."""
        target = self.lengths[start:end]
        if isinstance(length, int):
            target.fill_(length)
        else:
            target.copy_(length.expand_as(target))

    def rollback(self, length, start: int = 0, end: int | None = None) -> None:
        """Cut layers [start, end) (default: all) back to at most ``length`` entries: O(1), no data moves, no
        host sync. ``length`` is an int or a device tensor."""
        target = self.lengths[start:end]
        if isinstance(length, int):
            target.clamp_(max=length)
        else:
            torch.minimum(target, length.to(target.dtype), out=target)

    def reset(self) -> None:
        self.lengths.zero_()
