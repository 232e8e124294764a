"""Split-KV planning for decode attention, shared by the Triton and CUDA backends (no Triton import here).

A decode step has few query rows, so one CTA per (sequence, KV head) leaves most SMs idle; splitting the key
range across CTAs and merging the partial softmaxes fixes that (flash-decoding). The plan depends only on
the cache *capacity*, the grid and the device, never on the live length: a CUDA graph captured once replays
the same grid at every length, and splits past the live length finish at once with an empty partial.
"""
from __future__ import annotations

from functools import lru_cache

import torch

MAX_SPLITS = 64
MIN_BLOCKS_PER_SPLIT = 2  # a split shorter than this spends more on the combine than it saves
CTAS_PER_SM = 2  # aim for about two resident CTAs per SM


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device; 1 elsewhere (CPU interpreter runs need no parallelism)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(ctas_per_split: int, capacity: int, block_keys: int, device: torch.device) -> tuple[int, int]:
    """Return (num_splits, split_len): split i covers keys [i * split_len, min((i + 1) * split_len, capacity)).

    ``ctas_per_split`` is the grid without splitting (batch * kv heads * row tiles); ``block_keys`` is the
    kernel's key block, so every split starts on a block boundary.
    """
    blocks = cdiv(max(capacity, 1), block_keys)
    wanted = cdiv(CTAS_PER_SM * multiprocessor_count(device), max(ctas_per_split, 1))
    num_splits = max(1, min(MAX_SPLITS, blocks // MIN_BLOCKS_PER_SPLIT, wanted))
    split_len = cdiv(blocks, num_splits) * block_keys
    return cdiv(max(capacity, 1), split_len), split_len
