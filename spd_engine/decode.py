"""Prefill, batched generation, and :func:`generate_vanilla`. The decoding modes and their one driver live in
:mod:`spd_engine.modes`."""
from __future__ import annotations

from typing import Iterable

import torch

from .kv_cache import KVCache
from .model import Model
from .modes.base import GenerationResult, TokenCallback, run_decoder, stop_reached
from .sampling import SamplingParams, next_token


def cache_capacity(prompt_len: int, max_new_tokens: int, extra: int = 0) -> int:
    """Room for the prompt, the answer and ``extra`` in-flight slots, rounded up to a multiple of 64."""
    need = prompt_len + max_new_tokens + extra
    return -(-need // 64) * 64


def prefill(model: Model, cache: KVCache, prompt_ids: list[int]) -> torch.Tensor:
    """Run the whole prompt through every layer; returns the last position's logits (1, V)."""
    cache.check_room(len(prompt_ids))
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
    hidden = model.forward_layers(model.embed(ids), 0, model.config.num_layers, cache)
    return model.logits(hidden[:, -1])


def generate_vanilla(model: Model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                     eos_ids: Iterable[int], on_tokens: TokenCallback | None = None,
                     graph: str = "off") -> GenerationResult:
    """Vanilla decoding of one prompt without an :class:`~spd_engine.engine.Engine` (tests, benchmarks).
    Stops at an EOS id (kept in the output) or the limit. ``graph`` (auto | on | off) replays the step as a
    CUDA graph and reads tokens back every few steps."""
    from .modes.vanilla import vanilla_decoder  # modes.vanilla builds on this module's prefill
    from .runtime.graph import readback_every, use_graphs

    graphed = use_graphs(graph, model.device)
    readback = readback_every(graphed)
    decoder = vanilla_decoder(model, len(prompt_ids), max_new_tokens, params, readback)
    return run_decoder(decoder, "vanilla", prompt_ids, max_new_tokens, params, eos_ids, on_tokens, graphed=graphed,
                       readback=readback)


def generate_batch(model: Model, prompts: list[list[int]], max_new_tokens: int, eos_ids: Iterable[int],
                   params: SamplingParams = SamplingParams(), generator: torch.Generator | None = None
                   ) -> list[list[int]]:
    """Answers for many prompts at once (self-distillation data, teacher-forced evaluation).

    Each prompt is prefilled into its own cache row, then all rows decode together, so every weight is read
    once per step for the whole batch (a GEMM instead of B GEMVs). Rows that finished keep computing but
    their tokens are dropped. Greedy tokens equal :func:`generate_vanilla`'s up to the rounding of batched
    matmuls; sampled rows are independent draws from the same distribution as its.
    """
    eos_ids = set(eos_ids)
    L = model.config.num_layers
    cache = model.new_cache(cache_capacity(max(map(len, prompts)), max_new_tokens), batch=len(prompts))
    answers: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode():
        logits = torch.cat([prefill(model, cache.row(b), ids) for b, ids in enumerate(prompts)])
        finished = [False] * len(prompts)
        while True:
            tokens = next_token(logits, params, generator)  # (B,)
            for row, token in enumerate(tokens.tolist()):
                if not finished[row]:
                    answers[row].append(token)
                    finished[row] = stop_reached(answers[row], eos_ids, max_new_tokens)
            if all(finished):
                return answers
            hidden = model.forward_layers(model.embed(tokens[:, None]), 0, L, cache)
            logits = model.logits(hidden[:, -1])
