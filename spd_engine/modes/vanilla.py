"""Vanilla decoding: one full forward pass of the target per token, the reference every other mode is checked
against (at temperature 0 they must produce the same tokens)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decode import cache_capacity, prefill
from ..kv_cache import KVCache
from ..model import LayerPlans, Model
from ..sampling import Noise, SamplingParams, draw, target_probs
from .base import DecodeStats, DecodingMode


@dataclass
class VanillaStats(DecodeStats):
    """Nothing beyond the common fields: no drafts, one target pass per token."""


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
        # One token per step: every op's outputs and workspaces, planned once for all the layers.
        self.plans = LayerPlans.for_step(model, cache, 0, 0)

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        return prefill(self.model, self.cache, prompt_ids)

    def start(self, first_token: torch.Tensor, prompt_len: int) -> None:
        """The first generated token (from prefill) is the next step's input; the cache knows the position."""
        self.token.copy_(first_token.view(1))

    def step(self) -> None:
        model = self.model
        hidden = model.forward_layers(model.embed(self.token.view(1, 1)), 0, model.config.num_layers, self.cache,
                                      plans=self.plans)
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

    def graphed(self):
        from ..runtime.graph import graphed_step

        return graphed_step(self)

    def finish(self, common: dict, kept: int) -> tuple[VanillaStats, list[bool]]:
        return VanillaStats(**common, acceptance_rate=None, tokens_per_target_pass=1.0, theoretical_speedup=1.0), []


def vanilla_decoder(model: Model, prompt_len: int, max_new_tokens: int, params: SamplingParams,
                    readback: int) -> VanillaStep:
    # Steps run in batches of `readback`: room for the ones that run past the last token.
    cache = model.new_cache(cache_capacity(prompt_len, max_new_tokens, extra=readback))
    cache.check_room(prompt_len + max_new_tokens)
    return VanillaStep(model, cache, params)


class VanillaMode(DecodingMode):
    name = "vanilla"
    summary = "one full forward pass of the target per token (the reference)"
    capturable = True

    def decoder(self, prompt_len: int, max_new_tokens: int, params: SamplingParams, readback: int) -> VanillaStep:
        return vanilla_decoder(self.engine.model, prompt_len, max_new_tokens, params, readback)

    @classmethod
    def predict(cls, settings: dict, per_prompt: list[dict], times, link) -> dict:
        tokens_per_s = 1e3 / times.vanilla_token_ms()
        return {"devices": 1, "tokens_per_s": tokens_per_s, "vanilla_tokens_per_s": tokens_per_s, "speedup": 1.0}
