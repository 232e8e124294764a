"""The one decoding driver, and what a decoding mode supplies to it.

Every mode (vanilla, spd, pipespec, ppsd; the registry is :mod:`spd_engine.modes`) is two objects:

* a :class:`DecodingMode`, made once per engine and options: it checks the options, loads or builds its drafts,
  and makes a decoder for each generation;
* a :class:`Decoder`, the device-side state of one sequence. ``prefill`` runs the prompt, ``start`` takes the
  first token (drawn by the driver from the prefill logits), and each ``cycle`` advances the sequence by one
  step, committing zero or more tokens into ``out_tokens[:num_out]`` (both device tensors). ``finish`` turns
  what the decoder recorded into the mode's typed statistics and its verification trace.

The driver (:func:`run_decoder`) owns everything the modes share: the clock, prefill, the first token,
streaming, EOS, the token limit, CUDA-graph capture for the modes whose cycle is capturable, and reading the
committed tokens back every ``readback`` cycles with one host sync.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Collection, Iterable, Protocol

import torch

from ..sampling import SamplingParams, next_token

TokenCallback = Callable[[list[int]], None]


@dataclass
class DecodeStats:
    """What every mode reports; each mode's stats dataclass extends it. ``to_json`` is the JSON contract."""

    title: ClassVar[str] = ""  # the mode's name in prose ("SPD"); its registry name when empty
    mode: str
    new_tokens: int
    seconds: float  # wall clock of the whole generation: prefill, capture and decoding
    tokens_per_s: float
    prefill_seconds: float
    capture_seconds: float  # CUDA-graph warm-up and capture (0 when eager)
    decode_tokens_per_s: float  # tokens after the first / decoding seconds (capture excluded)
    graph: bool
    readback_every: int
    steps_run: int  # cycles run by the timed loop, including any a readback batch ran past the last token
    step_seconds: float  # decoding seconds / steps_run: the time of one cycle
    acceptance_rate: float | None  # accepted / verified drafts (None: the mode has no drafts)
    tokens_per_target_pass: float  # tokens per full pass of the target's layers (README: "Decoding modes")
    theoretical_speedup: float  # the speedup the mode's own paper defines, from this run's counts

    def to_json(self) -> dict:
        return asdict(self)

    def comparison_heading(self) -> str:
        """This run's column heading beside vanilla decoding (``generate`` without --no-compare)."""
        return self.title or self.mode

    def comparison_notes(self) -> list[str]:
        """What this run's numbers mean, under that side-by-side table."""
        acceptance = "n/a (no drafts)" if self.acceptance_rate is None else f"{self.acceptance_rate:.3f}"
        return [f"acceptance: {acceptance}",
                f"tokens per target pass: {self.tokens_per_target_pass:.2f}",
                f"theoretical speedup: {self.theoretical_speedup:.2f} (as the mode's paper defines it)"]


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    stats: DecodeStats | None = None
    trace: list[bool] = field(default_factory=list)  # one entry per verified draft, True = accepted


class Decoder(Protocol):
    """One sequence's decoding state (see the module docstring)."""

    generator: torch.Generator | None  # draws the first token (and is registered with a CUDA graph)
    out_tokens: torch.Tensor  # (capacity,) long: committed tokens after the first
    num_out: torch.Tensor  # (1,) long: how many of them

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Run the prompt; the last position's target logits (1, V)."""

    def start(self, first_token: torch.Tensor, prompt_len: int) -> None:
        """The first generated token (1,) enters."""

    def cycle(self) -> None:
        """One step; commits zero or more tokens."""

    def finish(self, common: dict, kept: int) -> tuple[DecodeStats, list[bool]]:
        """The mode's stats (``common`` holds every :class:`DecodeStats` field the driver knows, that is all
        but the last three) and trace, for the first ``kept`` committed tokens (the ones after the first that
        the driver kept)."""


class DecodingMode:
    """A decoding mode: its name, options and decoders. Subclasses set the class attributes and implement
    ``__init__`` (options checked, drafts loaded once) and :meth:`decoder`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Keyword options of Engine.generate this mode accepts, with their command-line flags, e.g.
    # {"exit_layer": "--exit-layer"}; giving another mode's option is a one-line error. A keyword is its
    # flag's argparse dest, and the flag defaults to None (not given), so the command line passes it on as is.
    # Modes may share an option (same keyword and flag); the flag is then defined by the first mode registered.
    options: ClassVar[dict[str, str]] = {}
    capturable: ClassVar[bool] = False  # its decoder has `graphed()`: a cycle free of host syncs

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Its command-line flags (shared by `generate` and `eval`)."""

    def __init__(self, engine, **options):
        self.engine = engine

    def decoder(self, prompt_len: int, max_new_tokens: int, params: SamplingParams, readback: int) -> Decoder:
        """A fresh decoder with room for the prompt, the answer and ``readback`` cycles run past its end."""
        raise NotImplementedError

    def describe(self) -> dict:
        """The settings this mode runs with (drafts, split), as eval's report records them."""
        return {}

    def eval_row(self, stats: DecodeStats) -> dict:
        """What eval records per prompt beside the common fields (SPD: its cycles)."""
        return {}

    def eval_totals(self, prompts: list[dict]) -> dict:
        """What eval reports per dataset beside the common totals, from its per-prompt rows."""
        return {}

    @classmethod
    def predict(cls, settings: dict, per_prompt: list[dict], times, link) -> dict | None:
        """The simulator's prediction (:mod:`spd_engine.simulate`) for this mode with its work spread over
        devices, against vanilla decoding on one: from the mode's settings (:meth:`describe`), eval's per-prompt
        rows (traces, counts), step times (``simulate.StepTimes``) and a link (``simulate.Link``). Returns
        {"devices", "tokens_per_s", "vanilla_tokens_per_s", "speedup"}, or None when the mode has no model."""
        return None


def stop_reached(token_ids: list[int], eos_ids: Collection[int], max_new_tokens: int) -> bool:
    """Called once per token: ``eos_ids`` is the caller's set, built once per generation."""
    return len(token_ids) >= max_new_tokens or (bool(token_ids) and token_ids[-1] in eos_ids)


def drain(step, steps_per_readback: int, device, tokens: list[int], eos_ids: Collection[int], max_new_tokens: int,
          on_tokens: TokenCallback | None) -> int:
    """Run ``step`` in batches of ``steps_per_readback``, then read back, with one host sync, how many tokens
    the device has committed (``device.num_out``) and append them from ``device.out_tokens`` to ``tokens``
    (which holds the first one already), streaming each, until EOS or the limit. Steps past the last kept
    token are wasted work, never output. Returns the number of steps run."""
    steps = 0
    while not stop_reached(tokens, eos_ids, max_new_tokens):
        for _ in range(steps_per_readback):
            step()
        steps += steps_per_readback
        produced = int(device.num_out)  # the one host sync per batch of steps
        for token in device.out_tokens[len(tokens) - 1: produced].tolist():
            tokens.append(token)
            if on_tokens:
                on_tokens([token])
            if stop_reached(tokens, eos_ids, max_new_tokens):
                break
    return steps


def run_decoder(decoder: Decoder, mode: str, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                eos_ids: Iterable[int], on_tokens: TokenCallback | None = None, graphed: bool = False,
                readback: int = 1) -> GenerationResult:
    """Prefill, the first token, then cycles (``decoder.graphed()`` replays them as a CUDA graph) read back
    every ``readback`` cycles until an EOS id (kept in the output) or ``max_new_tokens``."""
    eos_ids = set(eos_ids)
    start = time.perf_counter()
    capture_seconds, steps = 0.0, 0
    with torch.inference_mode():
        logits = decoder.prefill(prompt_ids)
        first = next_token(logits, params, decoder.generator)  # (1,)
        tokens = [int(first)]
        if on_tokens:
            on_tokens(tokens[-1:])
        decoder.start(first, len(prompt_ids))
        prefill_seconds = time.perf_counter() - start
        if not stop_reached(tokens, eos_ids, max_new_tokens):
            step = decoder.cycle
            if graphed:
                captured = time.perf_counter()
                step = decoder.graphed()  # its warm-up cycles are real cycles of this generation
                capture_seconds = time.perf_counter() - captured
            steps = drain(step, readback, decoder, tokens, eos_ids, max_new_tokens, on_tokens)
        seconds = time.perf_counter() - start
        decode_seconds = seconds - prefill_seconds - capture_seconds
        common = dict(
            mode=mode, new_tokens=len(tokens), seconds=seconds,
            tokens_per_s=len(tokens) / seconds if seconds > 0 else 0.0,
            prefill_seconds=prefill_seconds, capture_seconds=capture_seconds,
            decode_tokens_per_s=(len(tokens) - 1) / decode_seconds if decode_seconds > 0 and len(tokens) > 1 else 0.0,
            graph=graphed, readback_every=readback, steps_run=steps,
            step_seconds=decode_seconds / steps if steps else 0.0)
        stats, trace = decoder.finish(common, len(tokens) - 1)
    return GenerationResult(prompt_ids, tokens, stats, trace)
