"""Sampling parameters, the target distribution they define (temperature, top-k, top-p), and drawing from it.

Every draw is an exponential race over uniforms taken from a preallocated device buffer: the decoding step
itself never touches a ``torch.Generator`` (torch.compile cannot trace one) and never allocates. Only
:meth:`Noise.refill` does, once per step, and a CUDA graph captures that one op with the generator registered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise UserError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device) -> torch.Generator | None:
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed if self.seed is not None else torch.seed())
        return gen


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: softmax(logits / T), then the top-k and top-p cuts, renormalised.

    float32 over the last dim. Speculative sampling must verify against exactly this distribution.
    """
    scaled = logits.float() / params.temperature
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays in).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs`` (any non-negative weights, unnormalised is fine), distributed as probs.

    Exponential race: with E_i = -log(u_i) ~ Exp(1) independent, argmax_i probs_i / E_i picks i with probability
    probs_i / sum(probs). ``uniforms`` in [0, 1) with probs' shape; u = 0 gives E = inf, a weight of 0, so no
    NaN can arise. Shape-static and sync-free, unlike torch.multinomial with a generator.
    """
    return (probs / -torch.log(uniforms)).argmax(-1)


class Noise:
    """The uniforms one decoding step consumes, in a buffer allocated once, and the generator that fills it.

    ``refill()`` is the step's only random op. Everything downstream reads ``take(offset, count)`` views, so the
    step is ordinary tensor code that compiles without graph breaks and replays in a CUDA graph (which
    registers ``generator`` so every replay draws fresh numbers).
    """

    def __init__(self, params: SamplingParams, device, size: int):
        self.generator = params.generator(device)
        self.uniforms = torch.zeros(size, dtype=torch.float32, device=device)

    def refill(self) -> None:
        self.uniforms.uniform_(generator=self.generator)

    def take(self, offset: int, count: int) -> torch.Tensor:
        return self.uniforms.narrow(0, offset, count)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax or one draw from :func:`target_probs`; returns int64 ids with the leading dims of logits."""
    if params.greedy:
        return logits.argmax(-1)
    probs = target_probs(logits, params)
    return draw(probs, torch.rand(probs.shape, generator=generator, device=probs.device))
