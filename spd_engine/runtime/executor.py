"""Stage executors: how one pipeline stage's layers run inside the SPD cycle, and where the cycle's pieces run.

A :class:`StageExecutor` owns one stage (0-based ``stage`` s runs the in-flight token at depth s) and exposes
the two things the cycle needs:

* ``prefill(hidden)`` -> (output, anchors): the stage's layers on the whole prompt (1, P, H);
* ``step(stage_in, fill, cut)`` -> (output, anchors): first apply the previous cycle's flush (cut every one of
  its layers back to ``cut`` entries; capacity means no flush), then run its layers on ``stage_in`` (1, 1, H).
  The stage is idle when ``fill <= stage``: it computes anyway (fixed shapes) but advances no length, so its
  writes are never read.

``anchors`` are the hidden states after the anchor layers this stage produces, (T, k, H) in anchor order. The
outputs of ``step`` live in buffers the executor allocated once, so a captured cycle writes in place and
nothing allocated on a side stream outlives it.

:class:`Lanes` says where the cycle's independent pieces run: lane 0 is the draft module, lane s + 1 stage s.
The eager lanes run them one after another on the current stream; ``runtime.graph.StreamLanes`` gives each
its own CUDA stream, forked from and joined back to the capturing stream. The cycle is one piece of code
for both.
"""
from __future__ import annotations

import torch

from ..kv_cache import KVCache
from ..model import AnchorCapture, LayerPlans, Model


class StageExecutor:
    """The interface; see the module docstring."""

    stage: int

    def prefill(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def step(self, stage_in: torch.Tensor, fill: torch.Tensor, cut: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class LocalStage(StageExecutor):
    """A stage whose layers run in this process, on ``cache`` (all layers, or only this stage's when
    ``cache_offset`` = the stage's first layer, as on a pipeline rank)."""

    def __init__(self, target: Model, stage: int, bounds: tuple[int, int], anchor_layers, cache: KVCache,
                 cache_offset: int = 0):
        self.target, self.stage, self.cache, self.cache_offset = target, stage, cache, cache_offset
        self.start, self.end = bounds
        self.layers_done = tuple(done for _, done in anchor_layers)  # anchor_layers: [(anchor j, layers b_j)]
        hidden_size = target.config.hidden_size
        self.out = torch.zeros(1, 1, hidden_size, dtype=target.dtype, device=target.device)
        self.anchors = torch.zeros(1, len(self.layers_done), hidden_size, dtype=target.dtype, device=target.device)
        # One token per step: the ops' outputs and workspaces (attention's split plan too) and, on the cuda
        # backend, their argument structs, made once for all of this stage's layers.
        self.plans = LayerPlans.for_step(target, cache, self.start - cache_offset, self.start)

    def prefill(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = torch.zeros(hidden.shape[1], len(self.layers_done), hidden.shape[-1], dtype=hidden.dtype,
                              device=hidden.device)
        out = self.target.forward_layers(hidden, self.start, self.end, self.cache,
                                         anchors=AnchorCapture(self.layers_done, anchors),
                                         cache_offset=self.cache_offset)
        return out, anchors

    def step(self, stage_in: torch.Tensor, fill: torch.Tensor, cut: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        first, last = self.start - self.cache_offset, self.end - self.cache_offset
        self.cache.rollback(cut, first, last)
        active = (fill > self.stage).to(torch.int32)
        self.out.copy_(self.target.forward_layers(stage_in, self.start, self.end, self.cache,
                                                  anchors=AnchorCapture(self.layers_done, self.anchors),
                                                  cache_offset=self.cache_offset, advance=active,
                                                  plans=self.plans))
        return self.out, self.anchors


class Lanes:
    """Eager lanes: every piece runs at once on the current stream (see the module docstring)."""

    def fork(self) -> None:
        pass

    def run(self, lane: int, fn, *args):
        return fn(*args)

    def join(self) -> None:
        pass
