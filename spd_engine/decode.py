"""Decoders: prefill and the vanilla token-by-token loop. The SPD driver lives in :mod:`spd_engine.spd`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable

import torch

from .kv_cache import KVCache
from .model import Model
from .sampling import SamplingParams, next_token

TokenCallback = Callable[[list[int]], None]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    stats: dict = field(default_factory=dict)
    trace: list[bool] = field(default_factory=list)  # SPD: one entry per verification, True = accepted


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


def stop_reached(token_ids: list[int], eos_ids: Collection[int], max_new_tokens: int) -> bool:
    """Called once per token: ``eos_ids`` is the caller's set, built once per generation."""
    return len(token_ids) >= max_new_tokens or (bool(token_ids) and token_ids[-1] in eos_ids)


def generate_vanilla(model: Model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                     eos_ids: Iterable[int], on_tokens: TokenCallback | None = None) -> GenerationResult:
    """Prefill, then one full forward per token. Stops at an EOS id (kept in the output) or the limit."""
    eos_ids = set(eos_ids)
    cache = model.new_cache(cache_capacity(len(prompt_ids), max_new_tokens))
    cache.check_room(len(prompt_ids) + max_new_tokens)
    generator = params.generator(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        logits = prefill(model, cache, prompt_ids)
        prefill_seconds = time.perf_counter() - start
        tokens: list[int] = []
        while True:
            token = next_token(logits, params, generator)  # (1,)
            tokens.append(int(token))
            if on_tokens:
                on_tokens(tokens[-1:])
            if stop_reached(tokens, eos_ids, max_new_tokens):
                break
            hidden = model.forward_layers(model.embed(token[:, None]), 0, model.config.num_layers, cache)
            logits = model.logits(hidden[:, -1])
    seconds = time.perf_counter() - start
    decode_seconds = seconds - prefill_seconds
    return GenerationResult(prompt_ids, tokens, {
        "mode": "vanilla",
        "new_tokens": len(tokens),
        "seconds": seconds,
        "tokens_per_s": len(tokens) / seconds if seconds > 0 else 0.0,
        "prefill_seconds": prefill_seconds,
        "decode_tokens_per_s": (len(tokens) - 1) / decode_seconds if decode_seconds > 0 and len(tokens) > 1 else 0.0,
    })


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
