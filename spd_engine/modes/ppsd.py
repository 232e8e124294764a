"""PPSD: pipeline-parallel self-speculative decoding (Li, Liu, Shi, Shao, Zhang, Li: "Pipeline Parallelism is All
You Need for Optimized Early-Exit Based Self-Speculative Decoding", arXiv 2509.19368).

The draft is the target itself, cut short: its first E layers, then its own final norm and LM head (optionally
after a small trained :class:`~spd_engine.exit_adapter.ExitAdapter`). The layers form a two-stage pipeline,
early [0, E) and late [E, L), and drafting overlaps verification ("verify-while-draft"): in one cycle

* the late stage runs token t (drafted last cycle) through layers [E, L) and the head: the target's
  distribution for position t+1, which verifies the draft t+1;
* the early stage runs that draft t+1 through layers [0, E), and the exit head on its output drafts t+2.

On accept, t+1 is committed and t+2 enters; on reject, the target's own token replaces t+1, every layer's cache
is cut back to the committed length (O(1): lengths only) and the corrected token restarts alone, so the late
stage idles one cycle. This is the SPD cycle (:class:`~spd_engine.spd.SPDState`, docs/ARCHITECTURE.md, "The
cycle") with stage bounds [(0, E), (E, L)] and, in place of the PDM, the exit head on stage 0's output of the
newest token of the same cycle: :class:`PPSDState` reuses SPDState's verify (greedy and speculative sampling,
over the full vocabulary), resolve, rollback and per-cycle history. Greedy output equals vanilla output token
for token, and sampling keeps the target's distribution.

The cycle has no host sync (the draft is an argmax or an exponential race over preallocated uniforms), so it
is captured as a CUDA graph like SPD's, the early stage and its exit head on one stream, the late stage on
another.

Counts (``PPSDStats``; ``tokens`` are the decoded tokens, after the first, which prefill produces):

* ``theoretical_speedup`` = ``tokens_per_target_pass`` = tokens × L / (cycles × max(E, L − E)) (the README
  defines the second for every mode): vanilla spends L layer-times per token, a
  PPSD cycle on two devices the slower stage's. The paper's own text was not retrievable here (only its
  abstract), so this is derived from the schedule above, in the paper's unit (layers; the heads left out).
  With i.i.d. acceptance α each reject costs one refill cycle, cycles ≈ tokens × (2 − α), hence
  ≈ L / ((2 − α) · max(E, L − E)): at most 2, at E = L/2 and α = 1. PPSD saves latency, not compute: every
  cycle applies all L layers once (E to the newest token, L − E to the one before it).

The default exit layer of ``--model default`` (SmolLM2-135M-Instruct, 30 layers) is :data:`DEFAULT_EXIT_LAYER`,
chosen by ``bench/ppsd_exit_layer.py`` (bench/results/ppsd_exit_layer.json): teacher-forced greedy acceptance of
the plain early exit (equal to PPSD's acceptance: a draft is verified only after an all-correct prefix) at
every exit layer, on the first turns of the eval prompts, times the pipeline balance — predicted speedup
(L + h) / ((2 − α) · (max(E, L − E) + h)), h = the head in layer-equivalents of weight bytes (8 here). E = 15
won with α = 0.097 and a predicted 0.87 (below 1: the plain exit of a 135M model rarely agrees with its last
layer); a trained exit adapter there reaches α = 0.405, predicted 1.03. Other models default to the balanced
split E = L // 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..decode import cache_capacity
from ..errors import UserError
from ..exit_adapter import ExitAdapter, check_exit_layer
from ..model import AnchorCapture, Model
from ..sampling import SamplingParams, draw, target_probs
from ..simulate import CONTROL_BYTES, Link, count_cycles
from ..spd import SPDState
from .base import DecodeStats, DecodingMode, GenerationResult, TokenCallback, run_decoder

DEFAULT_EXIT_LAYER = 15  # --model default; see the module docstring and bench/results/ppsd_exit_layer.json


@dataclass
class PPSDStats(DecodeStats):
    """The common fields (``tokens_per_target_pass`` and ``theoretical_speedup`` as in the module docstring),
    plus the exit layer, whether an exit adapter drafted, the cycles up to the last kept token and the drafts
    verified in them."""

    exit_layer: int
    exit_adapter: bool
    cycles: int
    accepted_drafts: int
    rejected_drafts: int


class ExitDraft:
    """The early-exit draft head: the hidden state after layer ``exit_layer``, through the adapter (if any), the
    target's final norm and its LM head. Its vocabulary is the target's whole vocabulary, which is what
    ``draft_vocab`` tells SPDState's verify (it maps a PDM's draft-vocabulary distribution into the target's)."""

    def __init__(self, target: Model, exit_layer: int, adapter: ExitAdapter | None = None):
        check_exit_layer(target.config.num_layers, exit_layer)
        if adapter is not None and adapter.config.exit_layer != exit_layer:
            raise UserError(f"the exit adapter was trained at exit layer {adapter.config.exit_layer}, not "
                            f"{exit_layer}")
        self.target, self.exit_layer, self.adapter = target, exit_layer, adapter
        self.draft_vocab = torch.arange(target.config.vocab_size, device=target.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        return self.target.logits(hidden)


class PPSDState(SPDState):
    """SPD's cycle state with the exit draft in place of the PDM (see the module docstring). Only what differs
    is here: the state has no PDM or anchors, and the draft runs after stage 0 on stage 0's lane."""

    def __init__(self, target: Model, draft: ExitDraft, capacity: int, params: SamplingParams):
        E, L = draft.exit_layer, target.config.num_layers
        self.exit_draft = draft
        # One anchor slot: SPDState._enter records each token's embedding as its anchor 0; the exit draft reads
        # no anchors and the stages record none.
        self.init_pipeline(target, [(0, E), (E, L)], [[], []], 1, draft.draft_vocab, capacity, params)

    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Every layer on the prompt; the last position's target logits (1, V)."""
        self.cache.check_room(len(prompt_ids) + 1)
        hidden = self.target.embed(torch.tensor([prompt_ids], dtype=torch.long, device=self.target.device))
        for stage in self.stages:
            hidden, _ = stage.prefill(hidden)
        return self.target.logits(hidden[:, -1])

    def draft_after_exit(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The exit head on stage 0's output (1, 1, H) of the newest token proposes the token after it. Returns
        (draft id (1,), its distribution over the vocabulary, or None when greedy), in this state's buffers."""
        logits = self.exit_draft.logits(hidden[0])  # (1, V)
        if self.params.greedy:
            self.draft_token.copy_(logits.argmax(-1))
            return self.draft_token, None
        # The draft draws from the target's own sampling transform of its logits: any q keeps the rule exact,
        # and one shaped like p is accepted more often.
        self.draft_probs.copy_(target_probs(logits, self.params)[0])
        self.draft_token.copy_(draw(self.draft_probs, self.noise.take(0, self.draft_probs.shape[0])).view(1))
        return self.draft_token, self.draft_probs

    def early_exit(self):
        """Stage 0 on the newest token, then the draft from its output: one lane, as the draft needs it."""
        early = self.stages[0].step(self.stage_in[0], self.fill, self.cut)
        return early, self.draft_after_exit(early[0])

    def step(self) -> None:
        """Verify-while-draft: the late stage (lane 2) verifies while the early stage and the exit head (lane 1)
        draft; then SPDState's verify and resolve. The late stage is launched first, as in SPDState.step."""
        lanes = self.lanes
        lanes.fork()
        late = lanes.run(2, self.stages[1].step, self.stage_in[1], self.fill, self.cut)
        early, (draft, q) = lanes.run(1, self.early_exit)
        lanes.join()
        self.collect([early, late])
        self.resolve(draft, q, *self.verify(draft, q))

    def rollback(self, cut: torch.Tensor) -> None:
        """No draft cache to cut: only the target's layers."""
        self.cache.rollback(cut)
        self.cut.copy_(cut)

    def finish(self, common: dict, kept: int) -> tuple[PPSDStats, list[bool]]:
        _, cycles, trace = self.verification_history(kept)
        accepted = sum(trace)
        L, E = self.target.config.num_layers, self.exit_draft.exit_layer
        speedup = kept * L / (cycles * max(E, L - E)) if cycles else 0.0
        return PPSDStats(
            **common, acceptance_rate=accepted / len(trace) if trace else 0.0,
            tokens_per_target_pass=speedup, theoretical_speedup=speedup,
            exit_layer=E, exit_adapter=self.exit_draft.adapter is not None, cycles=cycles,
            accepted_drafts=accepted, rejected_drafts=len(trace) - accepted), trace


def ppsd_decoder(model: Model, draft: ExitDraft, prompt_len: int, max_new_tokens: int, params: SamplingParams,
                 readback: int) -> PPSDState:
    """Room for the prompt, the answer, the two tokens in flight and the cycles a readback batch runs past the
    last token."""
    return PPSDState(model, draft, cache_capacity(prompt_len, max_new_tokens, extra=4 + readback), params)


class PPSDMode(DecodingMode):
    name = "ppsd"
    summary = "pipeline-parallel self-speculative decoding: an early-exit draft overlapped with verification"
    options = {"exit_layer": "--exit-layer", "exit_adapter": "--exit-adapter"}
    capturable = True

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--exit-layer", type=int, default=None,
                            help=f"PPSD: layers before the early exit, 1..L-1 (default: {DEFAULT_EXIT_LAYER} for "
                                 f"--model default, measured; L//2 otherwise; an adapter's own)")
        parser.add_argument("--exit-adapter", default=None,
                            help="PPSD: exit adapter directory (spd-engine train-exit-adapter)")

    def __init__(self, engine, exit_layer: int | None = None, exit_adapter=None):
        super().__init__(engine)
        model = engine.model
        self.adapter_spec = str(exit_adapter) if exit_adapter is not None else None
        adapter = ExitAdapter.load(exit_adapter, model, exit_layer) if exit_adapter is not None else None
        if exit_layer is None:
            exit_layer = (adapter.config.exit_layer if adapter is not None
                          else DEFAULT_EXIT_LAYER if engine.model_spec == "default"
                          else model.config.num_layers // 2)
        self.draft = ExitDraft(model, exit_layer, adapter)

    def decoder(self, prompt_len: int, max_new_tokens: int, params: SamplingParams, readback: int) -> PPSDState:
        return ppsd_decoder(self.engine.model, self.draft, prompt_len, max_new_tokens, params, readback)

    def describe(self) -> dict:
        return {"exit_layer": self.draft.exit_layer, "exit_adapter": self.adapter_spec}

    def eval_row(self, stats: PPSDStats) -> dict:
        return {"cycles": stats.cycles}

    @classmethod
    def predict(cls, settings: dict, per_prompt: list[dict], times, link) -> dict:
        """The early layers and the exit head on one device, the late layers and the head on another."""
        prediction = predict_ppsd(times.layer_ms, times.head_ms, link, [p["trace"] for p in per_prompt],
                                  settings["exit_layer"], times.hidden_size, times.dtype_bytes)
        return {"devices": 2, "tokens_per_s": prediction.tokens_per_s,
                "vanilla_tokens_per_s": prediction.vanilla_tokens_per_s, "speedup": prediction.speedup}


def generate_ppsd(model: Model, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams, eos_ids,
                  exit_layer: int, adapter: ExitAdapter | None = None,
                  on_tokens: TokenCallback | None = None) -> GenerationResult:
    """PPSD of one prompt without an :class:`~spd_engine.engine.Engine` (tests, benchmarks), eagerly."""
    decoder = ppsd_decoder(model, ExitDraft(model, exit_layer, adapter), len(prompt_ids), max_new_tokens, params,
                           readback=1)
    return run_decoder(decoder, "ppsd", prompt_ids, max_new_tokens, params, eos_ids, on_tokens)


# ---------------------------------------------------------------------------------------------- measurement
@torch.inference_mode()
def exit_traces(model: Model, sequences: list[tuple[list[int], int]], exit_layers: list[int],
                adapters: dict[int, ExitAdapter] | None = None) -> dict[int, list[str]]:
    """Greedy PPSD's verification traces ('A'/'R' per verification, one string per sequence) at each exit layer,
    teacher-forced: one full forward per ``(tokens, answer_start)`` sequence, the answer being the target's own
    greedy one. Every draft greedy PPSD verifies is drafted from an all-correct prefix, so the exit head's
    argmax at answer position t against the target's argmax there is exactly the outcome of verifying the
    draft for t + 1; the traces replay to the engine's cycles (``simulate.count_cycles(trace, 2)``).
    ``adapters`` maps an exit layer to the adapter drafting there."""
    adapters = adapters or {}
    L, H = model.config.num_layers, model.config.hidden_size
    traces: dict[int, list[str]] = {E: [] for E in exit_layers}
    for tokens, answer_start in sequences:
        cache = model.new_cache(cache_capacity(len(tokens), 0))
        exits = torch.zeros(len(tokens), len(exit_layers), H, dtype=model.dtype, device=model.device)
        ids = torch.tensor([tokens], dtype=torch.long, device=model.device)
        last = model.forward_layers(model.embed(ids), 0, L, cache, anchors=AnchorCapture(tuple(exit_layers), exits))
        verified = slice(answer_start, len(tokens) - 1)  # positions whose next token is a kept answer token
        target_tokens = model.logits(last[0, verified]).argmax(-1)
        for column, E in enumerate(exit_layers):
            hidden = exits[verified, column]
            if E in adapters:
                hidden = adapters[E](hidden)
            hits = (model.logits(hidden).argmax(-1) == target_tokens).tolist()
            traces[E].append("".join("A" if hit else "R" for hit in hits))
    return traces


# ---------------------------------------------------------------------------------------------- simulator
@dataclass
class PPSDPrediction:
    exit_layer: int
    tokens: int  # decoded tokens (after each prompt's first)
    cycles: int
    acceptance_rate: float
    early_ms: float  # device 1 per cycle: layers [0, E) + the exit head
    late_ms: float  # device 2 per cycle: layers [E, L) + the head
    cycle_ms: float
    tokens_per_s: float  # PPSD on two devices
    vanilla_tokens_per_s: float  # all layers + the head per token on one device
    speedup: float
    theoretical_speedup: float  # PPSDStats.theoretical_speedup of these counts


def predict_ppsd(layer_ms: list[float], head_ms: float, link: Link, traces: list[str], exit_layer: int,
                 hidden_size: int, dtype_bytes: int = 2, adapter_ms: float = 0.0) -> PPSDPrediction:
    """Tokens/s of PPSD with layers [0, E) + the exit head on one device and layers [E, L) + the head on another,
    against vanilla on one device, from per-layer times, the head's time (final norm + LM head + argmax), a link
    and verification traces ('A'/'R' per verification, one string per prompt, as in ``spd-engine eval``).

    Cycles come from replaying the traces through the SPD schedule at n = 2 (``simulate.count_cycles``), which
    is PPSD's. Per cycle (fixed shapes, so every cycle costs the same): the early device sends stage 0's
    output (H values) as soon as its layers finish, while it runs the exit head; the late device verifies and
    sends its verdict (token, accept, cut) back. The next cycle starts when each device has what it needs:

        cycle = max(early layers + max(exit head, hidden message), late layers + head + verdict message)
    """
    L = len(layer_ms)
    if not 1 <= exit_layer <= L - 1:
        raise UserError(f"exit layer must be in [1, {L - 1}] for {L} layer times, got {exit_layer}")
    early_layers, late_layers = sum(layer_ms[:exit_layer]), sum(layer_ms[exit_layer:])
    exit_head_ms = head_ms + adapter_ms
    early_ms, late_ms = early_layers + exit_head_ms, late_layers + head_ms
    cycle = max(early_layers + max(exit_head_ms, link.message_ms(hidden_size * dtype_bytes)),
                late_ms + link.message_ms(CONTROL_BYTES))
    cycles = sum(count_cycles(trace, 2) for trace in traces)
    tokens = sum(len(trace) for trace in traces)  # one token per verification
    accepted = sum(trace.count("A") for trace in traces)
    vanilla_ms = sum(layer_ms) + head_ms
    ppsd_ms = cycles * cycle
    return PPSDPrediction(
        exit_layer=exit_layer, tokens=tokens, cycles=cycles, acceptance_rate=accepted / tokens if tokens else 0.0,
        early_ms=early_ms, late_ms=late_ms, cycle_ms=cycle,
        tokens_per_s=1e3 * tokens / ppsd_ms if ppsd_ms else 0.0, vanilla_tokens_per_s=1e3 / vanilla_ms,
        speedup=tokens * vanilla_ms / ppsd_ms if ppsd_ms else 0.0,
        theoretical_speedup=tokens * L / (cycles * max(exit_layer, L - exit_layer)) if cycles else 0.0)
