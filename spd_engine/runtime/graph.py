"""CUDA-graph execution: the SPD cycle and the vanilla decode step, captured once and replayed.

The captured code is the eager code (``SPDState.cycle``, ``modes.vanilla.VanillaStep.cycle``); what changes is
only where it runs:

* :class:`StreamLanes` gives the draft module and every stage a CUDA stream of its own. Each cycle forks them
  from the capturing stream (``lane.wait_stream(current)``) and joins them back (``current.wait_stream(lane)``)
  before verify and resolve, so one graph holds n + 1 concurrent branches.
* Everything a replay touches was allocated before capture, at capacity: caches, cycle state, executor
  output buffers, the uniforms of :class:`~spd_engine.sampling.Noise`. Positions and lengths are device
  tensors, so nothing host-side is frozen into the graph.
* Warm-up cycles run eagerly first (on a side stream, as real cycles of the generation: their results count),
  so compilation, autotuning and first-launch attribute setting happen outside the capture.
* Sampling: the graph registers the noise generator, so every replay draws fresh uniforms.
* If capture fails, generation continues eagerly after a one-line warning.

``--graph auto`` uses graphs on a CUDA device and eager execution elsewhere; ``on`` asks for them (a CPU run is
a usage error); ``off`` never uses them. Everything here imports and its eager parts run on a CPU.
"""
from __future__ import annotations

import sys

import torch

from ..errors import UserError
from .executor import Lanes

GRAPH_MODES = ("auto", "on", "off")
READBACK_EVERY = 8  # graphed decoding reads tokens back every this many cycles (steps)
WARMUP_CYCLES = 2


def use_graphs(mode: str, device: torch.device) -> bool:
    """Whether ``--graph mode`` captures on ``device``."""
    if mode not in GRAPH_MODES:
        raise UserError(f"--graph must be one of {', '.join(GRAPH_MODES)}, got '{mode}'")
    if mode == "on" and device.type != "cuda":
        raise UserError("--graph on needs a CUDA device (--device cuda); use --graph auto or off")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def readback_every(graphed: bool) -> int:
    """Cycles between host readbacks: eager decoding reads back after every cycle (nothing to batch)."""
    return READBACK_EVERY if graphed else 1


def warn(message: str) -> None:
    print(f"spd-engine: warning: {message}", file=sys.stderr, flush=True)


class StreamLanes(Lanes):
    """One CUDA stream per lane, forked from and joined back to the current (capturing) stream."""

    def __init__(self, count: int, device: torch.device):
        self.streams = [torch.cuda.Stream(device) for _ in range(count)]

    def fork(self) -> None:
        current = torch.cuda.current_stream()
        for stream in self.streams:
            stream.wait_stream(current)

    def run(self, lane: int, fn, *args):
        with torch.cuda.stream(self.streams[lane]):
            return fn(*args)

    def join(self) -> None:
        current = torch.cuda.current_stream()
        for stream in self.streams:
            current.wait_stream(stream)


def capture(step, generator: torch.Generator | None, warmup: int = WARMUP_CYCLES):
    """Run ``step`` ``warmup`` times eagerly on a side stream, then capture one call into a CUDA graph.
    Returns the graph's replay function. Raises whatever capture raises."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)  # fresh uniforms on every replay
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def graphed_cycle(state):
    """``SPDState.cycle`` as one CUDA graph with the PDM and each stage on its own stream; the eager cycle
    (after a one-line warning) if capture fails. The warm-up cycles are real cycles of this generation."""
    eager_lanes = state.lanes
    try:
        state.lanes = StreamLanes(state.n + 1, state.target.device)
        return capture(state.cycle, state.generator)
    except Exception as exc:  # any capture failure: the eager cycle is the same computation
        state.lanes = eager_lanes
        warn(f"CUDA graph capture of the SPD cycle failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
             f"running eagerly")
        return state.cycle


def graphed_step(step):
    """``VanillaStep.cycle`` as a CUDA graph; the eager step (after a one-line warning) if capture fails."""
    try:
        return capture(step.cycle, step.generator)
    except Exception as exc:
        warn(f"CUDA graph capture of the decode step failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
             f"running eagerly")
        return step.cycle
