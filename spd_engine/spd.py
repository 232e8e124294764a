"""Speculative Pipeline Decoding: the cycle state and one cycle as one function. The mode
(:mod:`spd_engine.modes.spd`) and the driver (:func:`spd_engine.modes.base.run_decoder`) build on it.

Fixed-shape state, all on the device (docs/ARCHITECTURE.md, "The cycle"):

* positions: the newest in-flight token sits at position ``newest`` (depth 0); ``fill`` tokens are in
  flight, at positions newest, newest-1, ..., newest-fill+1 (depths 0..fill-1). Older positions are
  committed and have passed every layer.
* slots: token, anchors and draft distribution of position p live in slot ``p % (n+1)``; the n in-flight
  tokens plus the one that just completed occupy n+1 distinct slots, so nothing ever moves.
* every layer's cache length equals the position of the next token that layer will see; idle stages run
  anyway (fixed shapes) but advance their lengths by 0, so their writes are never read.

``SPDState.cycle`` contains no host synchronisation and no data-dependent shapes: accept, reject, flush and
rollback are predicated tensor updates, so the same function can be captured in a CUDA graph or split
across ranks. The host reads committed tokens back whenever it likes (every cycle when eager).
"""
from __future__ import annotations

import torch

from .decode import cache_capacity
from .errors import UserError
from .model import Model
from .modes.base import GenerationResult, TokenCallback, run_decoder
from .pdm import PDM
from .runtime.executor import Lanes, LocalStage, StageExecutor
from .runtime.graph import graphed_cycle, readback_every, use_graphs
from .sampling import Noise, SamplingParams, draw, target_probs
from .stages import partition_layers


def stage_anchor_layers(anchors: list[int], stage_bounds) -> list[list[tuple[int, int]]]:
    """Per stage, the anchors it produces as (anchor index j, layers done b_j): those with a < b_j <= b."""
    return [[(j, b) for j, b in enumerate(anchors) if a < b <= e] for a, e in stage_bounds]


class SPDState:
    """The cycle state. By default every stage runs here (:class:`LocalStage` executors over one full-model
    cache, eager :class:`Lanes`); a runtime that runs stages elsewhere passes its own ``stages`` and ``lanes``
    (then this state holds no target layers: ``cache`` is None)."""

    def __init__(self, target: Model, pdm: PDM, capacity: int, params: SamplingParams, max_cycles: int = 0,
                 stages: list[StageExecutor] | None = None, lanes: Lanes | None = None):
        self.pdm = pdm
        bounds = [tuple(b) for b in pdm.config.stage_bounds]
        self.init_pipeline(target, bounds, stage_anchor_layers(pdm.config.anchors, bounds), len(pdm.config.anchors),
                           pdm.draft_vocab, capacity, params, max_cycles, stages, lanes)
        dev = target.device
        self.pdm_cache = pdm.tower.new_cache(capacity)
        # Static tables: the aggregation type of each depth.
        self.depth_types = torch.tensor(pdm.depth_types, dtype=torch.long, device=dev)
        self.deepest_type = len(pdm.config.anchors) - 1
        self.row_offsets = torch.arange(self.slots, device=dev)

    def init_pipeline(self, target: Model, stage_bounds: list[tuple[int, int]], stage_anchors, anchor_count: int,
                      draft_vocab: torch.Tensor, capacity: int, params: SamplingParams, max_cycles: int = 0,
                      stages: list[StageExecutor] | None = None, lanes: Lanes | None = None) -> None:
        """The pipeline's state, whatever drafts: the ring, stage buffers, counters, history, uniforms and stage
        executors. ``stage_anchors[s]``: the (anchor index, layers done) stage s records; ``draft_vocab``: the
        target ids of the draft's vocabulary (verify maps the draft's distribution through it)."""
        cfg, dev = target.config, target.device
        self.target, self.params = target, params
        self.stage_bounds = stage_bounds
        self.n = n = len(stage_bounds)
        self.slots = n + 1
        H, K = cfg.hidden_size, draft_vocab.shape[0]
        self.draft_vocab = draft_vocab
        self.capacity = capacity
        self.cache = target.new_cache(capacity) if stages is None else None
        self.anchors = torch.zeros(self.slots, anchor_count, H, dtype=target.dtype, device=dev)
        self.ring_tokens = torch.zeros(self.slots, dtype=torch.long, device=dev)
        self.draft_q = torch.zeros(self.slots, K, dtype=torch.float32, device=dev)
        self.stage_in = torch.zeros(n, 1, 1, H, dtype=target.dtype, device=dev)  # stage_in[s]: input of stage s+1
        self.stage_out = torch.zeros_like(self.stage_in)
        self.newest = torch.zeros(1, dtype=torch.long, device=dev)
        self.fill = torch.zeros(1, dtype=torch.long, device=dev)
        self.cut = torch.full((1,), capacity, dtype=torch.int32, device=dev)  # the last flush, for the stages
        self.out_tokens = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.num_out = torch.zeros(1, dtype=torch.long, device=dev)
        self.accepted = torch.zeros(1, dtype=torch.long, device=dev)
        self.rejected = torch.zeros(1, dtype=torch.long, device=dev)
        # Per-cycle history, so a driver that reads back only every few cycles still knows exactly which cycle
        # committed which token and whether it was an accepted draft.
        self.cycles = torch.zeros(1, dtype=torch.long, device=dev)
        self.max_cycles = max_cycles or n * (capacity + 1)
        self.num_out_at = torch.zeros(self.max_cycles, dtype=torch.long, device=dev)
        self.accepted_at = torch.zeros(self.max_cycles, dtype=torch.long, device=dev)
        # The draft's results, in buffers of their own: the draft may run on a side stream.
        self.draft_token = torch.zeros(1, dtype=torch.long, device=dev)
        self.draft_probs = torch.zeros(K, dtype=torch.float32, device=dev)
        # Sampling: uniforms for the draft (K), the acceptance test (1) and the residual draw (V), one refill
        # per cycle.
        self.noise = None if params.greedy else Noise(params, dev, K + 1 + cfg.vocab_size)
        self.generator = self.noise.generator if self.noise else None
        self.stage_anchors = stage_anchors
        self.stages: list[StageExecutor] = stages if stages is not None else [
            LocalStage(target, s, bounds, stage_anchors[s], self.cache) for s, bounds in enumerate(stage_bounds)]
        self.lanes = lanes or Lanes()

    # ------------------------------------------------------------------ prefill and start
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Full-model prefill that also records every prompt token's anchors, then the PDM's prefill over the
        prompt rows at the deepest aggregation type. Returns the last position's target logits (1, V)."""
        target, pdm = self.target, self.pdm
        P = len(prompt_ids)
        self.pdm_cache.check_room(P + 1)  # the PDM's cache has the pipeline's capacity
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)
        anchors = torch.zeros(P, *self.anchors.shape[1:], dtype=target.dtype, device=target.device)
        embedded = target.embed(ids)
        anchors[:, 0] = embedded[0]
        last_hidden = self.prefill_layers(embedded, anchors)
        rows = torch.arange(P, device=target.device)
        features = pdm.aggregate(anchors, rows, torch.full_like(rows, self.deepest_type))
        pdm.tower.forward_layers(features[None], 0, pdm.config.tower_layers, self.pdm_cache)
        return target.logits(last_hidden)

    def prefill_layers(self, embedded: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """Every stage on the embedded prompt (1, P, H), filling ``anchors`` (P, m, H) at the anchor layers.
        Returns the last position's final hidden state (1, H)."""
        hidden = embedded
        for stage, executor in zip(self.stage_anchors, self.stages):
            hidden, produced = executor.prefill(hidden)
            for i, (j, _) in enumerate(stage):
                anchors[:, j] = produced[:, i]
        return hidden[:, -1]

    def start(self, first_token: torch.Tensor, prompt_len: int) -> None:
        """The first generated token (from prefill) enters the pipeline alone at depth 0."""
        self.newest.fill_(prompt_len)
        self.fill.fill_(1)
        self._enter(first_token.view(1))

    def _enter(self, token: torch.Tensor) -> None:
        """Place ``token`` at position ``newest``: record it, embed it as its anchor 0 and stage 1's input."""
        slot = self.newest % self.slots
        self.ring_tokens.index_copy_(0, slot, token)
        embedded = self.target.embed(token.view(1, 1))
        self.anchors[:, 0].index_copy_(0, slot, embedded.view(1, -1))
        self.stage_in[0].copy_(embedded)

    # ------------------------------------------------------------------ one cycle
    def draft(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PDM step: aggregate every uncached row (the just-completed token, if any, plus the in-flight ones),
        run the tower, and propose the token after ``newest``. Returns (draft id (1,), q over draft vocab),
        both in this state's own buffers."""
        pdm, n = self.pdm, self.n
        cached = self.pdm_cache.lengths[0].long()  # (1,) rows already in the PDM's cache
        positions = cached + self.row_offsets  # (n+1,) rows to compute; those past `newest` are padding
        depth = self.newest - positions
        complete = depth >= self.fill  # older than every in-flight token: has passed every layer
        types = torch.where(complete, self.deepest_type, self.depth_types[depth.clamp(0, n)])
        features = pdm.aggregate(self.anchors, positions % self.slots, types)
        newly_complete = (complete & (depth >= 0)).sum().to(torch.int32)  # 0 or 1 row joins the cache for good
        tower_out = pdm.tower.forward_layers(features[None], 0, pdm.config.tower_layers, self.pdm_cache,
                                             advance=newly_complete)
        newest_row = tower_out[0].index_select(0, self.newest - cached)  # (1, H)
        logits = pdm.draft_logits(newest_row)[0]  # (K,)
        if self.params.greedy:
            # index_select, not draft_vocab[argmax]: indexing with a 0-d tensor reads it on the host.
            self.draft_token.copy_(pdm.draft_vocab.index_select(0, logits.argmax().view(1)))
            return self.draft_token, None
        self.draft_probs.copy_(torch.softmax(logits.float() / self.params.temperature, dim=-1))
        choice = draw(self.draft_probs, self.noise.take(0, self.draft_probs.shape[0]))
        self.draft_token.copy_(pdm.draft_vocab.index_select(0, choice.view(1)))
        return self.draft_token, self.draft_probs

    def store_anchor(self, stage: int, anchor: int, hidden: torch.Tensor) -> None:
        """Anchor ``anchor`` of the token that 0-based ``stage`` ran this cycle (depth ``stage``), into its slot."""
        slot = (self.newest - stage) % self.slots
        self.anchors[:, anchor].index_copy_(0, slot, hidden.reshape(1, -1))

    def collect(self, results) -> None:
        """The stages' outputs and anchors (in their executors' buffers) into the cycle state."""
        for s, (out, anchors) in enumerate(results):
            self.stage_out[s].copy_(out)
            for i, (j, _) in enumerate(self.stage_anchors[s]):
                self.store_anchor(s, j, anchors[:, i])

    def verify(self, draft: torch.Tensor, q: torch.Tensor | None):
        """The token leaving stage n gives the target's distribution for the position after it, held by the
        candidate right behind it (this cycle's draft when n == 1).
        Returns (verifying, accept, target token, candidate)."""
        n, target = self.n, self.target
        logits = target.logits(self.stage_out[n - 1, 0])  # (1, V)
        candidate_pos = self.newest - n + 2
        candidate = draft if n == 1 else self.ring_tokens.index_select(0, candidate_pos % self.slots)
        verifying = self.fill == n
        if self.params.greedy:
            target_token = logits.argmax(-1)
            return verifying, candidate == target_token, target_token, candidate
        p = target_probs(logits, self.params)[0]  # (V,)
        q_draft = q if n == 1 else self.draft_q.index_select(0, candidate_pos % self.slots)[0]
        q_full = torch.zeros_like(p).index_copy_(0, self.draft_vocab, q_draft)
        p_c, q_c = p.index_select(0, candidate), q_full.index_select(0, candidate)
        K = q_draft.shape[0]
        u = self.noise.take(K, 1)
        accept = u * q_c < p_c  # accept with probability min(1, p/q)
        residual = (p - q_full).clamp_min(0)
        residual = torch.where(residual.sum() > 0, residual, p)  # p == q: any draw from p is exact
        target_token = draw(residual, self.noise.take(K + 1, p.shape[0])).view(1)
        return verifying, accept, target_token, candidate

    def step(self) -> None:
        """One pipeline step, free of random-number generators and host syncs (what a graph replays): every
        stage and the draft on their lanes, then verify, then commit / enter / flush by predicated updates.

        Stages are launched last first: their results land in their executors' own buffers and reach the
        ring only in ``collect``, after the draft has read it, so the order changes nothing here, while a
        pipeline whose stages run on other ranks gets them all going before rank 0 computes its own."""
        lanes = self.lanes
        lanes.fork()
        results = {s: lanes.run(s + 1, self.stages[s].step, self.stage_in[s], self.fill, self.cut)
                   for s in reversed(range(self.n))}
        draft, q = lanes.run(0, self.draft)
        lanes.join()
        self.collect([results[s] for s in range(self.n)])
        self.resolve(draft, q, *self.verify(draft, q))

    def cycle(self) -> None:
        """One cycle: this cycle's uniforms (sampling only), then :meth:`step`."""
        if self.noise is not None:
            self.noise.refill()
        self.step()

    def resolve(self, draft, q, verifying, accept, target_token, candidate) -> None:
        """Commit the verified token (or the target's own in its place), then either let the draft enter or
        flush and restart from the corrected token. Predicated updates only: no host sync."""
        n = self.n
        candidate_pos = self.newest - n + 2  # the verified position; on reject, the new committed length
        do_accept, do_reject = verifying & accept, verifying & ~accept
        committed = torch.where(accept, candidate, target_token)
        index = self.num_out.clamp(max=self.capacity - 1)
        keep = self.out_tokens.index_select(0, index)
        self.out_tokens.index_copy_(0, index, torch.where(verifying, committed, keep))
        self.num_out += verifying
        self.accepted += do_accept
        self.rejected += do_reject
        cycle = self.cycles.clamp(max=self.max_cycles - 1)
        self.num_out_at.index_copy_(0, cycle, self.num_out)
        self.accepted_at.index_copy_(0, cycle, self.accepted)
        self.cycles += 1
        # Flush on reject: every layer and the PDM cut back to the committed length (O(1), lengths only).
        cut = torch.where(do_reject, candidate_pos, self.capacity).to(torch.int32)
        self.rollback(cut)
        # Advance: on reject the corrected token restarts alone at depth 0; otherwise the draft enters.
        self.stage_in[1:].copy_(self.stage_out[:-1])
        self.newest.copy_(torch.where(do_reject, candidate_pos, self.newest + 1))
        self.fill.copy_(torch.where(do_reject, 1, (self.fill + 1).clamp(max=n)))
        if q is not None:
            self.draft_q.index_copy_(0, self.newest % self.slots, q[None])
        self._enter(torch.where(do_reject, target_token, draft))

    def graphed(self):
        return graphed_cycle(self)

    def finish(self, common: dict, kept: int):
        """SPD's statistics and trace from the per-cycle history, up to the cycle that committed the
        ``kept``-th token: cycles a readback batch ran past it count in ``cycles_run`` only."""
        from .modes.spd import SPDStats  # modes.spd builds on this module

        cycles_run, cycles, trace = self.verification_history(kept)
        accepted = sum(trace)
        new_tokens, n = common["new_tokens"], self.n
        # n x tokens / cycles: with the stages on n devices a cycle costs one stage (L/n layers), so n cycles
        # cost one pass of the whole target.
        equivalent_accept_length = n * new_tokens / cycles if cycles else 0.0
        config = self.pdm.config
        stats = SPDStats(
            **common, acceptance_rate=accepted / len(trace) if trace else 0.0,
            tokens_per_target_pass=equivalent_accept_length, theoretical_speedup=equivalent_accept_length,
            stages=n, stage_layers=[b - a for a, b in config.stage_bounds], anchors=config.anchors,
            tower_layers=config.tower_layers, cycles=cycles, accepted_drafts=accepted,
            rejected_drafts=len(trace) - accepted, tokens_per_cycle=new_tokens / cycles if cycles else 0.0,
            equivalent_accept_length=equivalent_accept_length, cycles_run=cycles_run)
        return stats, trace

    def verification_history(self, kept: int) -> tuple[int, int, list[bool]]:
        """From the per-cycle history: the cycles run, the cycles up to the one that committed the ``kept``-th
        token, and one entry per verification in those (True = the draft was accepted). Cycles a readback batch
        ran past the last kept token count in the first number only."""
        cycles_run = int(self.cycles)
        recorded = min(cycles_run, self.max_cycles)
        num_out_at, accepted_at = self.num_out_at[:recorded].tolist(), self.accepted_at[:recorded].tolist()
        cycles = next((c + 1 for c, count in enumerate(num_out_at) if count >= kept), 0) if kept else 0
        trace, verified_before, accepted_before = [], 0, 0
        for count, accepted_count in zip(num_out_at[:cycles], accepted_at[:cycles]):
            if count > verified_before:
                trace.append(accepted_count > accepted_before)
            verified_before, accepted_before = count, accepted_count
        return cycles_run, cycles, trace

    def rollback(self, cut: torch.Tensor) -> None:
        """Cut the PDM and this state's own target cache back to ``cut`` entries now (capacity: no cut); a
        stage whose cache lives elsewhere applies ``self.cut`` at its next step."""
        self.pdm_cache.rollback(cut)
        if self.cache is not None:
            self.cache.rollback(cut)
        self.cut.copy_(cut)


def spd_decoder(target: Model, pdm: PDM, prompt_len: int, max_new_tokens: int, params: SamplingParams,
                readback: int) -> SPDState:
    """Every stage in this process, with room for the prompt, the answer, the n tokens in flight and the
    cycles a readback batch runs past the last token."""
    n = len(pdm.config.stage_bounds)
    return SPDState(target, pdm, cache_capacity(prompt_len, max_new_tokens, extra=n + 2 + readback), params)


def generate_spd(target: Model, pdm: PDM, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 eos_ids, on_tokens: TokenCallback | None = None, graph: str = "off") -> GenerationResult:
    """SPD of one prompt without an :class:`~spd_engine.engine.Engine` (tests, benchmarks): every stage runs
    here, eagerly one after another or (``graph``) as one CUDA graph per cycle with a stream per stage (see
    :mod:`spd_engine.runtime.graph`)."""
    graphed = use_graphs(graph, target.device)
    readback = readback_every(graphed)
    state = spd_decoder(target, pdm, len(prompt_ids), max_new_tokens, params, readback)
    return run_decoder(state, "spd", prompt_ids, max_new_tokens, params, eos_ids, on_tokens, graphed=graphed,
                       readback=readback)


def default_pdm_dir(model_spec: str):
    """The PDM shipped with the engine for ``--model default``, if one is installed."""
    from importlib import resources

    if model_spec != "default":
        return None
    path = resources.files("spd_engine") / "pdms" / "smollm2-135m-instruct"
    return path if (path / "pdm_config.json").is_file() else None


def resolve_pdm(engine, spec, stages: int | None = None, stage_layers: list[int] | None = None) -> PDM:
    """``--pdm PATH`` | ``untrained`` | nothing (the shipped default for the model, if any)."""
    target = engine.model
    L = target.config.num_layers
    bounds = partition_layers(L, stages, stage_layers) if (stages is not None or stage_layers) else None
    if spec == "untrained":
        if bounds is None:
            raise UserError("--pdm untrained needs --stages N or --stage-layers")
        return PDM.create(target, bounds)
    if spec is None:
        spec = default_pdm_dir(engine.model_spec)
        if spec is None:
            raise UserError("no draft module (PDM) is known for this model: train one with "
                            "`spd-engine train-pdm --model ... --stages N --out DIR` and pass --pdm DIR, "
                            "or use --pdm untrained")
        try:
            return PDM.load(spec, target, bounds)
        except UserError as exc:  # the user never named this PDM: say which one, and the ways out
            raise UserError(f"the draft module shipped for the default model does not fit this run ({exc}); "
                            "to time another split, add --pdm untrained (an untrained draft: correct output, "
                            "low acceptance)") from exc
    return PDM.load(spec, target, bounds)
