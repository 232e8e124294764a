"""Speculative Pipeline Decoding: the cycle state, one cycle as one function, and the eager driver.

Fixed-shape state, all on the device (DESIGN.md §1):

* positions: the newest in-flight token sits at position ``newest`` (depth 0); ``fill`` tokens are in
  flight, at positions newest, newest-1, ..., newest-fill+1 (depths 0..fill-1). Older positions are
  committed and have passed every layer.
* slots: token, anchors and draft distribution of position p live in slot ``p % (n+1)``; the n in-flight
  tokens plus the one that just completed occupy n+1 distinct slots, so nothing ever moves.
* every layer's cache length equals the position of the next token that layer will see; idle stages run
  anyway (fixed shapes) but advance their lengths by 0, so their writes are never read.

``SPDState.cycle`` contains no host synchronisation and no data-dependent shapes: accept, reject, flush and
rollback are predicated tensor updates, so the same function can be captured in a CUDA graph or split
across ranks. The host reads committed tokens back whenever it likes (every cycle in the eager driver).
"""
from __future__ import annotations

import time

import torch

from .decode import GenerationResult, TokenCallback, cache_capacity, stop_reached
from .errors import UserError
from .model import Model
from .pdm import PDM
from .sampling import SamplingParams, next_token, target_probs
from .stages import partition_layers


def stage_anchor_layers(anchors: list[int], stage_bounds) -> list[list[tuple[int, int]]]:
    """Per stage, the anchors it produces as (anchor index j, layers done b_j): those with a < b_j <= b."""
    return [[(j, b) for j, b in enumerate(anchors) if a < b <= e] for a, e in stage_bounds]


class SPDState:
    def __init__(self, target: Model, pdm: PDM, capacity: int, params: SamplingParams):
        cfg, dev = target.config, target.device
        self.target, self.pdm, self.params = target, pdm, params
        self.stage_bounds = [tuple(b) for b in pdm.config.stage_bounds]
        self.n = n = len(self.stage_bounds)
        self.slots = n + 1
        m, H = len(pdm.config.anchors), cfg.hidden_size
        self.capacity = capacity
        self.cache = self.new_target_cache(capacity)
        self.pdm_cache = pdm.tower.new_cache(capacity)
        self.anchors = torch.zeros(self.slots, m, H, dtype=target.dtype, device=dev)
        self.ring_tokens = torch.zeros(self.slots, dtype=torch.long, device=dev)
        self.draft_q = torch.zeros(self.slots, pdm.config.draft_vocab_size, dtype=torch.float32, device=dev)
        self.stage_in = torch.zeros(n, 1, 1, H, dtype=target.dtype, device=dev)  # stage_in[s]: input of stage s+1
        self.stage_out = torch.zeros_like(self.stage_in)
        self.newest = torch.zeros(1, dtype=torch.long, device=dev)
        self.fill = torch.zeros(1, dtype=torch.long, device=dev)
        self.out_tokens = torch.zeros(capacity, dtype=torch.long, device=dev)
        self.num_out = torch.zeros(1, dtype=torch.long, device=dev)
        self.accepted = torch.zeros(1, dtype=torch.long, device=dev)
        self.rejected = torch.zeros(1, dtype=torch.long, device=dev)
        self.generator = params.generator(dev)
        # Static tables: aggregation type per depth, and which anchors each stage produces.
        self.depth_types = torch.tensor(pdm.depth_types, dtype=torch.long, device=dev)
        self.deepest_type = len(pdm.config.anchors) - 1
        self.row_offsets = torch.arange(self.slots, device=dev)
        self.stage_anchors = stage_anchor_layers(pdm.config.anchors, self.stage_bounds)

    def new_target_cache(self, capacity: int):
        """The KV cache of the target layers this state runs itself: all of them in a single process."""
        return self.target.new_cache(capacity)

    # ------------------------------------------------------------------ prefill and start
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        """Full-model prefill that also records every prompt token's anchors, then the PDM's prefill over the
        prompt rows at the deepest aggregation type. Returns the last position's target logits (1, V)."""
        target, pdm = self.target, self.pdm
        P = len(prompt_ids)
        self.cache.check_room(P + 1)
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
        """Every target layer on the embedded prompt (1, P, H), filling ``anchors`` (P, m, H) at the anchor
        layers. Returns the last position's final hidden state (1, H)."""
        captures = {b: (lambda h, j=j: anchors[:, j].copy_(h[0])) for j, b in enumerate(self.pdm.config.anchors)
                    if b > 0}
        hidden = self.target.forward_layers(embedded, 0, self.target.config.num_layers, self.cache,
                                            captures=captures)
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
        run the tower, and propose the token after ``newest``. Returns (draft id (1,), q over draft vocab)."""
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
            return pdm.draft_vocab[logits.argmax()].view(1), None
        q = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        return pdm.draft_vocab[torch.multinomial(q, 1, generator=self.generator)], q

    def store_anchor(self, stage: int, anchor: int, hidden: torch.Tensor) -> None:
        """Anchor ``anchor`` of the token that 0-based ``stage`` ran this cycle (depth ``stage``), into its slot."""
        slot = (self.newest - stage) % self.slots
        self.anchors[:, anchor].index_copy_(0, slot, hidden.reshape(1, -1))

    def run_stages(self) -> None:
        """Stage s runs its layers on the token at depth s-1; an idle stage computes but does not advance."""
        for s, (a, b) in enumerate(self.stage_bounds):
            active = (self.fill > s).to(torch.int32)
            captures = {layers: (lambda h, s=s, j=j: self.store_anchor(s, j, h)) for j, layers in self.stage_anchors[s]}
            self.stage_out[s].copy_(self.target.forward_layers(self.stage_in[s], a, b, self.cache,
                                                               captures=captures, advance=active))

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
        q_draft = q if n == 1 else self.draft_q[candidate_pos % self.slots][0]
        q_full = torch.zeros_like(p).index_copy_(0, self.pdm.draft_vocab, q_draft)
        p_c, q_c = p.index_select(0, candidate), q_full.index_select(0, candidate)
        u = torch.rand(1, device=p.device, generator=self.generator)
        accept = u * q_c < p_c  # accept with probability min(1, p/q)
        residual = (p - q_full).clamp_min(0)
        residual = torch.where(residual.sum() > 0, residual, p)  # p == q: any draw from p is exact
        target_token = torch.multinomial(residual / residual.sum(), 1, generator=self.generator)
        return verifying, accept, target_token, candidate

    def cycle(self) -> None:
        """One pipeline step: draft, all stages, verify, then commit / enter / flush by predicated updates."""
        draft, q = self.draft()
        self.run_stages()
        self.resolve(draft, q, *self.verify(draft, q))

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

    def rollback(self, cut: torch.Tensor) -> None:
        """Cut every target layer and the PDM back to ``cut`` entries (capacity: no cut)."""
        self.cache.rollback(cut)
        self.pdm_cache.rollback(cut)


def generate_spd(target: Model, pdm: PDM, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                 eos_ids, on_tokens: TokenCallback | None = None) -> GenerationResult:
    """Eager SPD in one process: every stage runs here, one after another."""
    n = len(pdm.config.stage_bounds)
    state = SPDState(target, pdm, cache_capacity(len(prompt_ids), max_new_tokens, extra=n + 2), params)
    return run_spd(state, prompt_ids, max_new_tokens, eos_ids, on_tokens)


def run_spd(state: SPDState, prompt_ids: list[int], max_new_tokens: int, eos_ids,
            on_tokens: TokenCallback | None = None) -> GenerationResult:
    """Eager SPD driver over any SPDState (single-process or distributed): prefill, then cycles until EOS or
    the token limit. Reads results back every cycle."""
    eos_ids = set(eos_ids)
    pdm, params, n = state.pdm, state.params, state.n
    start = time.perf_counter()
    tokens: list[int] = []
    trace: list[bool] = []  # one entry per verification: accepted?
    cycles = 0
    with torch.inference_mode():
        logits = state.prefill(prompt_ids)
        first = next_token(logits, params, state.generator)
        tokens.append(int(first))
        if on_tokens:
            on_tokens(tokens[-1:])
        state.start(first, len(prompt_ids))
        accepted_before = 0
        while not stop_reached(tokens, eos_ids, max_new_tokens):
            state.cycle()
            cycles += 1
            produced = int(state.num_out)
            if produced > len(tokens) - 1:
                new = state.out_tokens[len(tokens) - 1: produced].tolist()
                accepted_now = int(state.accepted)
                trace.append(accepted_now > accepted_before)
                accepted_before = accepted_now
                for token in new:
                    tokens.append(token)
                    if on_tokens:
                        on_tokens([token])
                    if stop_reached(tokens, eos_ids, max_new_tokens):
                        break
    seconds = time.perf_counter() - start
    accepted, rejected = int(state.accepted), int(state.rejected)
    verified = accepted + rejected
    stats = {
        "mode": "spd",
        "new_tokens": len(tokens),
        "seconds": seconds,
        "tokens_per_s": len(tokens) / seconds if seconds > 0 else 0.0,
        "wall_seconds": seconds,
        "stages": n,
        "stage_layers": [b - a for a, b in pdm.config.stage_bounds],
        "anchors": pdm.config.anchors,
        "tower_layers": pdm.config.tower_layers,
        "cycles": cycles,
        "accepted_drafts": accepted,
        "rejected_drafts": rejected,
        "acceptance_rate": accepted / verified if verified else 0.0,
        "tokens_per_cycle": len(tokens) / cycles if cycles else 0.0,
        "equivalent_accept_length": n * len(tokens) / cycles if cycles else 0.0,
    }
    stats["theoretical_speedup"] = stats["equivalent_accept_length"]
    return GenerationResult(prompt_ids, tokens, stats, trace)


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
