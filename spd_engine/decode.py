"""Decoders: prefill and the vanilla token-by-token loop. The SPD driver lives in :mod:`spd_engine.spd`."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable

import torch

from . import ops
from .kv_cache import KVCache
from .model import Model
from .sampling import Noise, SamplingParams, draw, next_token, target_probs

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


class VanillaStep:
    """One decode step over buffers allocated once: the model on ``token`` at the cache's position, then the
    next token (greedy, or drawn with this step's uniforms) into ``token`` and ``out_tokens``. No host sync and
    no generator inside :meth:`step`, so it compiles whole and replays as a CUDA graph."""

    def __init__(self, model: Model, cache: KVCache, params: SamplingParams):
        dev = model.device
        self.model, self.cache, self.params = model, cache, params
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.out_tokens = torch.zeros(cache.capacity, dtype=torch.long, device=dev)
        self.num_out = torch.zeros(1, dtype=torch.long, device=dev)
        self.noise = None if params.greedy else Noise(params, dev, model.config.vocab_size)
        self.generator = self.noise.generator if self.noise else None
        cfg = model.config
        self.attention_plan = ops.plan_attention((1, 1, cfg.num_heads, cfg.head_dim), *cache.layer(0)[:2],
                                                 backend=model.backend)

    def start(self, token: torch.Tensor) -> None:
        """The first generated token (from prefill) is the next step's input."""
        self.token.copy_(token.view(1))

    def step(self) -> None:
        model = self.model
        hidden = model.forward_layers(model.embed(self.token.view(1, 1)), 0, model.config.num_layers, self.cache,
                                      attention_plan=self.attention_plan)
        logits = model.logits(hidden[:, -1])  # (1, V)
        if self.params.greedy:
            chosen = logits.argmax(-1)
        else:
            probs = target_probs(logits, self.params)[0]
            chosen = draw(probs, self.noise.take(0, probs.shape[0])).view(1)
        self.token.copy_(chosen)
        self.out_tokens.index_copy_(0, self.num_out.clamp(max=self.cache.capacity - 1), chosen)
        self.num_out += 1

    def cycle(self) -> None:
        """This step's uniforms (sampling only), then :meth:`step`."""
        if self.noise is not None:
            self.noise.refill()
        self.step()


def drain(step, steps_per_readback: int, device, tokens: list[int], eos_ids: Collection[int], max_new_tokens: int,
          on_tokens: TokenCallback | None) -> None:
    """The decoding loop of every mode: run ``step`` in batches of ``steps_per_readback``, then read back, with
    one host sync, how many tokens the device has committed (``device.num_out``) and append them from
    ``device.out_tokens`` to ``tokens`` (which holds the first one already), streaming each, until EOS or the
    limit. Steps past the last kept token are wasted work, never output."""
    while not stop_reached(tokens, eos_ids, max_new_tokens):
        for _ in range(steps_per_readback):
            step()
        produced = int(device.num_out)  # the one host sync per batch of steps
        for token in device.out_tokens[len(tokens) - 1: produced].tolist():
            tokens.append(token)
            if on_tokens:
                on_tokens([token])
            if stop_reached(tokens, eos_ids, max_new_tokens):
                break


def generate_vanilla(model: Model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                     eos_ids: Iterable[int], on_tokens: TokenCallback | None = None,
                     graph: str = "off") -> GenerationResult:
    """Prefill, then one full forward per token. Stops at an EOS id (kept in the output) or the limit.
    ``graph`` (auto | on | off) replays the step as a CUDA graph and reads tokens back every few steps."""
    from .runtime.graph import READBACK_EVERY, graphed_step, use_graphs

    eos_ids = set(eos_ids)
    graphed = use_graphs(graph, model.device)
    readback = READBACK_EVERY if graphed else 1
    # Steps run in batches of `readback`: room for the ones that run past the last token.
    cache = model.new_cache(cache_capacity(len(prompt_ids), max_new_tokens, extra=readback))
    cache.check_room(len(prompt_ids) + max_new_tokens)
    decoder = VanillaStep(model, cache, params)
    start = time.perf_counter()
    capture_seconds = 0.0
    with torch.inference_mode():
        logits = prefill(model, cache, prompt_ids)
        first = next_token(logits, params, decoder.generator)  # (1,)
        prefill_seconds = time.perf_counter() - start
        tokens = [int(first)]
        if on_tokens:
            on_tokens(tokens[-1:])
        decoder.start(first)
        if not stop_reached(tokens, eos_ids, max_new_tokens):
            if graphed:
                captured = time.perf_counter()
                step = graphed_step(decoder)  # its warm-up steps are real steps of this generation
                capture_seconds = time.perf_counter() - captured
            else:
                step = decoder.cycle
            drain(step, readback, decoder, tokens, eos_ids, max_new_tokens, on_tokens)
    seconds = time.perf_counter() - start
    decode_seconds = seconds - prefill_seconds - capture_seconds
    return GenerationResult(prompt_ids, tokens, {
        "mode": "vanilla",
        "new_tokens": len(tokens),
        "seconds": seconds,
        "tokens_per_s": len(tokens) / seconds if seconds > 0 else 0.0,
        "prefill_seconds": prefill_seconds,
        "decode_tokens_per_s": (len(tokens) - 1) / decode_seconds if decode_seconds > 0 and len(tokens) > 1 else 0.0,
        "graph": graphed,
        "capture_seconds": capture_seconds,
        "readback_every": readback,
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
