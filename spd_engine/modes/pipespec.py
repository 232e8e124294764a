"""PipeSpec: a chain of k >= 2 models, smallest first, the last the target, each verifying its predecessor's
token stream while that predecessor keeps drafting (McDanel et al., "PipeSpec: Breaking Stage Dependencies in
Hierarchical LLM Decoding", arXiv:2505.01572).

The chain. Drafts are independent checkpoints (``--draft-models A,B``, smallest first, the target's tokenizer)
or truncated self-drafts (``--draft-layers m[,m2...]``: the target's first m layers, its final norm and LM head,
sharing the target's tensors). Every model keeps its own KV cache and its own *stream*: the prompt, the
committed tokens, then the tokens it vouches for. The target's stream is the committed output; each lower
stream extends the one above it (the invariant every update restores).

One step of level i. Level 0 drafts one token. Level i >= 1 runs, in one batched forward, the part of its stream
its cache lacks (normally its newest token) plus up to ``window`` pending tokens of level i-1 (those past its own
stream), which gives its distribution at up to ``window`` + 1 positions. It resolves them in order: a pending
token there is accepted with probability min(1, p_i(x)/p_{i-1}(x)) (greedy: iff it is p_i's argmax), and the
first rejection is replaced by a draw from the residual max(0, p_i - p_{i-1}); at a position with no pending
token it draws from p_i (the bonus). So each step emits the accepted prefix plus one token, every one
distributed exactly as level i's own model, which is what makes them valid drafts for level i+1 (each level
records the distribution it drew every token from). A level with nothing pending generates one token, as in the
paper, where a stage that is not verifying decodes on its own.

The schedule (the asynchrony, made deterministic). Time runs in sub-ticks; level i starts a step every
``periods[i]`` sub-ticks and its step takes that long: it reads the streams as they stand when it starts and its
result lands when it ends, so a level always works on its predecessor's latest output and never waits for
another level. By default a sub-tick is the time of one target layer: the target's period is its layer count L and
a model's period is its cost (layers' weight elements read per token, relative to the target's) times L, rounded,
at least 1; a truncated self-draft of m layers thus has period m exactly. Results landing in the same sub-tick
apply target first, so a higher level's rollback wins. One ``cycle()`` is one target period: exactly one target
forward.

Rollback. When a level's new tokens contradict the stream of the level below (a rejection, or a bonus where the
level below already holds another token), every lower stream becomes a copy of the higher one and a step still
in flight there is void when it lands (unless its tokens agree with the new stream). Caches follow lazily: before
its next forward a model's cache is cut (``KVCache.rollback``, O(1): lengths only) to the longest prefix its
K/V and its stream share. Keeping a lower stream that agrees with a higher one is lossless: whether a token
survives depends only on the tokens before it, so the kept tokens are still draws of the lower model given their
prefix. A lower level may run at most ``2 * (window + 1)`` tokens ahead of the level above it.

Statistics. ``acceptance_rate`` is the target's: accepted / verified drafts of level k-2.
``tokens_per_target_pass`` = committed tokens after the first (which comes from the prefill) / target forward
passes (one per cycle, up to the cycle that committed the last kept token); drafts' passes are not counted: in the
paper each model has its own device. ``theoretical_speedup`` is the paper's expected tokens per target step
(Theorem 1 with its steady-state verification probability):

    PipeSpec = (1 - rho) + rho * (1 - a^(w+1)) / (1 - a),    rho = a / (1 - a^(w+1) + a)

with a this run's target acceptance rate and w the window (the paper's gamma). The formula assumes i.i.d.
acceptance and drafts that are always ready. It was taken from a third-party summary of the paper (the paper's
own text could not be fetched here); it is reported beside, never mixed with, the measured counts.

The default (no option; another model gets the same depth fraction): one self-draft of 27 of 30 layers, window 2,
chosen by bench/pipespec_defaults.py on --model default (bench/results/pipespec_defaults.json). Its screening
shows SmolLM2-135M's truncated self-drafts agree poorly with the target (teacher-forced greedy agreement <= 0.10 up
to 18 layers, 0.37 at 24, 0.55 at 27), and in real runs no self-draft chain (1, 7, 15, 27 or 28 layers; 1+28,
7+28) committed measurably more than one token per target pass: a draft deep enough to agree is barely faster
than the target, so its tokens come a step too late, and a shallow one is fast but rarely right. With every
chain tied, the rule takes the one with the fewest draft forwards per target pass, then the smallest window.
PipeSpec pays off with a small draft that agrees often (``--draft-models``), as in the paper.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..decode import cache_capacity, prefill
from ..errors import UserError
from ..model import Model
from ..sampling import SamplingParams, draw, target_probs
from ..simulate import Link
from .base import DecodeStats, DecodingMode, GenerationResult, TokenCallback, run_decoder

# Measured by bench/pipespec_defaults.py on SmolLM2-135M-Instruct (30 layers); see the module docstring.
DEFAULT_DRAFT_FRACTIONS = (27 / 30,)
DEFAULT_WINDOW = 2
TOKEN_ID_BYTES = 8  # a stream message carries int64 token ids


@dataclass(frozen=True)
class ChainModel:
    """One model of the chain."""
    name: str
    model: Model
    cost: float  # weight elements its layers read per token, relative to the target's


def layer_elements(model: Model) -> int:
    return sum(t.numel() for layer in model.layers if layer is not None for t in vars(layer).values()
               if t is not None)


def truncated_draft(target: Model, layers: int) -> Model:
    """The target's first ``layers`` layers, final norm and LM head, as a Model of that depth: the same tensors,
    no copy."""
    config = dataclasses.replace(target.config, num_layers=layers)
    return Model(config, target.embed_weight, target.layers[:layers], target.norm_weight, target.lm_head_weight,
                 backend=target.backend)


def build_chain(target: Model, drafts: Sequence[Model], names: Sequence[str] | None = None) -> list[ChainModel]:
    models = [*drafts, target]
    names = list(names) if names is not None else [f"draft{i}" for i in range(len(drafts))] + ["target"]
    full = layer_elements(target)
    return [ChainModel(name, model, layer_elements(model) / full) for name, model in zip(names, models)]


def schedule_periods(chain: Sequence[ChainModel]) -> list[int]:
    """Sub-ticks per step of each model, a sub-tick being one target layer's time (see the module docstring)."""
    layers = chain[-1].model.config.num_layers
    return [max(1, round(level.cost * layers)) for level in chain]


def paper_speedup(acceptance: float, window: int) -> float:
    """PipeSpec's expected tokens per target step (see the module docstring); 1 for no acceptance."""
    if acceptance >= 1.0:
        return window + 1.0
    per_verification = (1 - acceptance ** (window + 1)) / (1 - acceptance)
    verifying = acceptance / (1 - acceptance ** (window + 1) + acceptance)
    return (1 - verifying) + verifying * per_verification


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


@dataclass
class PipeSpecStats(DecodeStats):
    chain: list[str]  # model names, smallest first, the target last
    chain_layers: list[int]
    costs: list[float]  # per token, relative to the target (the simulator's step-time ratios)
    window: int
    periods: list[int]  # sub-ticks per step of each model (the schedule)
    target_passes: int
    draft_passes: list[int]  # forwards run by each draft (steps skipped at the lead limit excluded)
    accepted: list[int]  # per model: drafts of the model below it that it accepted (0 for the first)
    rejected: list[int]
    level_acceptance: list[float | None]  # accepted / verified per model (None: the first verifies nothing)
    rollbacks: list[int]  # per model: times a higher model contradicted its stream


@dataclass
class _Step:
    """A step in flight: computed when it starts, applied when it ends."""
    finish: int  # the sub-tick at whose end it lands
    proposed: list[int]  # the level's stream at the start plus its new tokens
    new_from: int  # where the new tokens start
    probs: list[torch.Tensor | None]  # the distribution each new token was drawn from (None: greedy)
    outcomes: list[bool]  # its verifications, in order (True: accepted)


@dataclass
class _TargetRecord:
    """The counters right after one target step landed, so statistics stop at the last kept token."""
    committed: int  # tokens committed after the first
    verifications: int  # len(trace)
    accepted: list[int]
    rejected: list[int]
    rollbacks: list[int]
    passes: list[int]


class PipeSpecDecoder:
    """One sequence's chain state (the :class:`~.base.Decoder` protocol); eager, with host syncs."""

    def __init__(self, chain: Sequence[ChainModel], capacity: int, params: SamplingParams, window: int,
                 periods: Sequence[int] | None = None):
        if window < 1:
            raise UserError(f"the PipeSpec window must be >= 1, got {window}")
        self.chain = list(chain)
        self.params, self.window = params, window
        self.periods = list(periods) if periods is not None else schedule_periods(self.chain)
        if len(self.periods) != len(self.chain) or min(self.periods) < 1:
            raise UserError(f"PipeSpec periods must be one count >= 1 per model of the chain, got {self.periods}")
        self.lead_limit = 2 * (window + 1)
        k = len(self.chain)
        target = self.chain[-1].model
        self.device = target.device
        self.caches = [level.model.new_cache(capacity) for level in self.chain]
        self.generator = params.generator(self.device)
        self.out_tokens = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.num_out = torch.zeros(1, dtype=torch.long, device=self.device)
        self.streams: list[list[int]] = [[] for _ in range(k)]
        self.cached: list[list[int]] = [[] for _ in range(k)]  # the tokens whose K/V each cache holds
        self.probs: list[dict[int, torch.Tensor]] = [{} for _ in range(k)]  # position -> distribution drawn from
        self.in_flight: list[_Step | None] = [None] * k
        self.tick = 0
        self.prompt_len = self.committed = 0  # committed: length of the committed stream (prompt included)
        self.accepted, self.rejected, self.rollbacks, self.passes = ([0] * k for _ in range(4))
        self.trace: list[bool] = []  # the target's verifications
        self.records: list[_TargetRecord] = []

    # ------------------------------------------------------------------ the Decoder protocol
    def prefill(self, prompt_ids: list[int]) -> torch.Tensor:
        for level, cache in zip(self.chain, self.caches):
            logits = prefill(level.model, cache, prompt_ids)
        self.cached = [list(prompt_ids) for _ in self.chain]
        return logits  # the target's, the last in the chain

    def start(self, first_token: torch.Tensor, prompt_len: int) -> None:
        stream = self.cached[-1] + [int(first_token)]
        self.streams = [list(stream) for _ in self.chain]
        self.prompt_len, self.committed = prompt_len, len(stream)

    def cycle(self) -> None:
        """One target period: the sub-ticks up to and including one target step's landing."""
        for _ in range(self.periods[-1]):
            self._sub_tick()

    def finish(self, common: dict, kept: int) -> tuple[PipeSpecStats, list[bool]]:
        k = len(self.chain)
        steps = next((n + 1 for n, record in enumerate(self.records) if record.committed >= kept), len(self.records))
        steps = steps if kept else 0
        last = self.records[steps - 1] if steps else _TargetRecord(0, 0, [0] * k, [0] * k, [0] * k, [0] * k)
        trace = self.trace[:last.verifications]
        acceptance = sum(trace) / len(trace) if trace else 0.0
        level_acceptance = [None] + [a / (a + r) if a + r else 0.0
                                     for a, r in zip(last.accepted[1:], last.rejected[1:])]
        stats = PipeSpecStats(
            **common, acceptance_rate=acceptance, tokens_per_target_pass=kept / steps if steps else 0.0,
            theoretical_speedup=paper_speedup(acceptance, self.window),
            chain=[level.name for level in self.chain],
            chain_layers=[level.model.config.num_layers for level in self.chain],
            costs=[level.cost for level in self.chain], window=self.window, periods=self.periods,
            target_passes=steps, draft_passes=last.passes[:-1], accepted=last.accepted, rejected=last.rejected,
            level_acceptance=level_acceptance, rollbacks=last.rollbacks)
        return stats, trace

    # ------------------------------------------------------------------ the schedule
    def _sub_tick(self) -> None:
        t = self.tick
        for level in range(len(self.chain)):  # every start reads the streams as the previous sub-tick left them
            if t % self.periods[level] == 0:
                self.in_flight[level] = self._start(level, finish=t + self.periods[level] - 1)
        for level in reversed(range(len(self.chain))):  # the target lands first: its rollbacks win
            step = self.in_flight[level]
            if step is not None and step.finish == t:
                self.in_flight[level] = None
                self._land(level, step)
        self.tick += 1

    def _start(self, level: int, finish: int) -> _Step | None:
        stream = self.streams[level]
        top = len(self.chain) - 1
        if level < top and len(stream) - len(self.streams[level + 1]) >= self.lead_limit:
            return None  # far enough ahead of the level above: drafting further would likely be wasted
        pending = self.streams[level - 1][len(stream): len(stream) + self.window + 1] if level else []
        fed = pending[:self.window]
        logits = self._forward(level, stream, fed)
        new, probs, outcomes = self._resolve(level, logits, pending, len(stream))
        proposed = stream + new
        # The cache now holds stream + fed; a rejected draft's K/V (and anything after it) is stale.
        self._cut_cache(level, common_prefix(self.cached[level], proposed))
        return _Step(finish, proposed, len(stream), probs, outcomes)

    def _forward(self, level: int, stream: list[int], fed: list[int]) -> torch.Tensor:
        """Run what the cache lacks of ``stream`` plus ``fed``; the logits of the last len(fed) + 1 rows."""
        model, cache = self.chain[level].model, self.caches[level]
        # Keep the longest prefix the cache shares with the stream, but always rerun the newest token: its
        # output row gives the next position's distribution.
        self._cut_cache(level, min(common_prefix(self.cached[level], stream), len(stream) - 1))
        inputs = stream[len(self.cached[level]):] + fed
        cache.check_room(len(self.cached[level]) + len(inputs))
        ids = torch.tensor([inputs], dtype=torch.long, device=self.device)
        hidden = model.forward_layers(model.embed(ids), 0, model.config.num_layers, cache)
        self.cached[level] = stream + fed
        self.passes[level] += 1
        return model.logits(hidden[0, -(len(fed) + 1):])

    def _cut_cache(self, level: int, length: int) -> None:
        if length < len(self.cached[level]):
            self.caches[level].rollback(length)
            del self.cached[level][length:]

    def _resolve(self, level: int, logits: torch.Tensor, pending: list[int], position: int):
        """Speculative sampling over the rows: the accepted prefix of ``pending`` plus one token (a residual draw
        at the first rejection, or a draw from this level's distribution where nothing is pending)."""
        greedy = self.params.greedy
        rows = logits.argmax(-1).tolist() if greedy else target_probs(logits, self.params)
        new, probs, outcomes = [], [], []
        for row in range(logits.shape[0]):
            draft = pending[row] if row < len(pending) else None
            p = None if greedy else rows[row]
            if greedy:
                token = rows[row]
                accepted = token == draft
            elif draft is None:
                token, accepted = self._draw(p), False
            else:
                q = self.probs[level - 1][position + row]
                uniform = torch.rand((), generator=self.generator, device=self.device)
                accepted = bool(uniform * q[draft] < p[draft])
                if accepted:
                    token = draft
                else:
                    residual = (p - q).clamp_min(0)
                    token = self._draw(residual if residual.sum() > 0 else p)  # p == q: any draw from p is exact
            new.append(token)
            probs.append(p)
            if draft is None:
                break
            outcomes.append(accepted)
            if not accepted:
                break
        return new, probs, outcomes

    def _draw(self, weights: torch.Tensor) -> int:
        return int(draw(weights, torch.rand(weights.shape, generator=self.generator, device=self.device)))

    def _land(self, level: int, step: _Step) -> None:
        stream = self.streams[level]
        if step.proposed[:len(stream)] != stream:
            return  # a higher level rewrote this stream while the step ran: its tokens contradict it
        for offset, p in enumerate(step.probs):
            if p is not None and step.new_from + offset >= len(stream):
                self.probs[level][step.new_from + offset] = p
        self.streams[level] = step.proposed
        self.accepted[level] += sum(step.outcomes)
        self.rejected[level] += len(step.outcomes) - sum(step.outcomes)
        if level:  # the level below's distributions up to here are settled: free them
            below = self.probs[level - 1]
            for position in [p for p in below if p < len(step.proposed)]:
                del below[position]
        self._propagate(level)
        if level == len(self.chain) - 1:
            self._commit(step.outcomes)

    def _propagate(self, level: int) -> None:
        """Restore the invariant below ``level``: a lower stream that does not extend the one above becomes a
        copy of it (a rollback when it held a contradicting token)."""
        for lower in reversed(range(level)):
            above, stream = self.streams[lower + 1], self.streams[lower]
            shared = common_prefix(above, stream)
            if shared == len(above):
                return  # it extends the level above, and the levels below it extend it already
            if shared < len(stream):
                self.rollbacks[lower] += 1
            self.streams[lower] = list(above)
            self.probs[lower].clear()

    def _commit(self, outcomes: list[bool]) -> None:
        target = self.streams[-1]
        new = target[self.committed:]
        start = self.committed - self.prompt_len - 1  # out_tokens holds the tokens after the first
        self.out_tokens[start: start + len(new)] = torch.tensor(new, dtype=torch.long, device=self.device)
        self.num_out += len(new)
        self.committed = len(target)
        self.trace.extend(outcomes)
        self.records.append(_TargetRecord(self.committed - self.prompt_len - 1, len(self.trace), list(self.accepted),
                                          list(self.rejected), list(self.rollbacks), list(self.passes)))


def pipespec_capacity(prompt_len: int, max_new_tokens: int, levels: int, window: int, readback: int = 1) -> int:
    """Room for the prompt, the answer, every lower stream's lead over the one above it, one forward's window,
    and the tokens the cycles of a readback batch may commit past the end."""
    lead = 2 * (window + 1) + window + 1
    return cache_capacity(prompt_len, max_new_tokens, extra=(levels - 1) * lead + (readback + 1) * (window + 1))


def generate_pipespec(target: Model, drafts: list[Model], prompt_ids: list[int], max_new_tokens: int,
                      params: SamplingParams, eos_ids: Iterable[int], window: int = DEFAULT_WINDOW,
                      on_tokens: TokenCallback | None = None, periods: Sequence[int] | None = None,
                      names: Sequence[str] | None = None) -> GenerationResult:
    """PipeSpec with ``drafts`` (smallest first) before ``target``; ``periods`` overrides the cost-derived
    schedule (sub-ticks per step of each model, the target last)."""
    chain = build_chain(target, drafts, names)
    capacity = pipespec_capacity(len(prompt_ids), max_new_tokens, len(chain), window)
    decoder = PipeSpecDecoder(chain, capacity, params, window, periods)
    return run_decoder(decoder, "pipespec", prompt_ids, max_new_tokens, params, eos_ids, on_tokens)


# ---------------------------------------------------------------------------------------------- the mode
def parse_counts(flag: str, value) -> list[int]:
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    try:
        return [int(item) for item in items]
    except (TypeError, ValueError):
        raise UserError(f"{flag} takes comma-separated layer counts such as 8 or 4,12; got '{value}'") from None


def default_draft_layers(num_layers: int) -> list[int]:
    """The measured default depth fractions of this target's depth (each 1 to L-1 layers)."""
    if num_layers < 2:
        raise UserError("PipeSpec self-drafts need a target of at least 2 layers; give --draft-models")
    return sorted({min(num_layers - 1, max(1, round(f * num_layers))) for f in DEFAULT_DRAFT_FRACTIONS})


def check_draft_layers(layers: list[int], num_layers: int) -> None:
    for m in layers:
        if m == num_layers:
            raise UserError(f"--draft-layers: a draft of {m} layers is as deep as the target ({num_layers} layers)")
        if not 1 <= m < num_layers:
            raise UserError(f"--draft-layers: {m} is out of range; a self-draft runs 1 to {num_layers - 1} of the "
                            f"target's {num_layers} layers")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise UserError(f"--draft-layers must increase (smallest draft first), got {','.join(map(str, layers))}")


class PipeSpecMode(DecodingMode):
    name = "pipespec"
    summary = "PipeSpec: a chain of drafts, each verifying the one below it asynchronously, then the target"
    options = {"draft_models": "--draft-models", "draft_layers": "--draft-layers"}

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--draft-models", default=None, metavar="A,B",
                            help="pipespec: draft model specs, smallest first, loaded like --model (same tokenizer)")
        parser.add_argument("--draft-layers", default=None, metavar="M[,M2...]",
                            help="pipespec: truncated self-drafts, the target's first M layers + its head "
                                 "(default: the measured default depth)")

    def __init__(self, engine, draft_models=None, draft_layers=None):
        super().__init__(engine)
        target = engine.model
        if draft_models is not None and draft_layers is not None:
            raise UserError("give --draft-models or --draft-layers, not both: a PipeSpec chain is either "
                            "separate draft models or self-drafts of the target")
        if draft_models is not None:
            specs = ([spec.strip() for spec in draft_models.split(",")] if isinstance(draft_models, str)
                     else list(draft_models))
            if not specs or not all(specs):
                raise UserError(f"--draft-models takes comma-separated model specs, got '{draft_models}'")
            drafts = [self.load_draft(spec) for spec in specs]
            self.chain = build_chain(target, drafts, [*specs, engine.model_spec])
            for spec, level, above in zip(specs, self.chain, self.chain[1:]):
                if level.cost >= above.cost:
                    raise UserError(f"--draft-models must grow toward the target (smallest first): '{spec}' is "
                                    "not smaller than the next model in the chain")
        else:
            L = target.config.num_layers
            layers = (parse_counts("--draft-layers", draft_layers) if draft_layers is not None
                      else default_draft_layers(L))
            check_draft_layers(layers, L)
            self.chain = build_chain(target, [truncated_draft(target, m) for m in layers],
                                     [f"{engine.model_spec}[:{m}]" for m in layers] + [engine.model_spec])
        self.self_drafts = draft_models is None
        self.window = DEFAULT_WINDOW
        self.periods = schedule_periods(self.chain)

    def load_draft(self, spec: str) -> Model:
        """A draft loaded like the target (its device, dtype and backend), which must share its tokenizer."""
        from ..config import DTYPES
        from ..engine import Engine

        target = self.engine.model
        dtype = next(name for name, value in DTYPES.items() if value == target.dtype)
        draft = Engine.load(spec, device=target.device.type, dtype=dtype, backend=target.backend)
        if draft.tokenizer.vocabulary() != self.engine.tokenizer.vocabulary():
            raise UserError(f"--draft-models: '{spec}' has another tokenizer than the target's; PipeSpec drafts "
                            "must give every token the target's id")
        if draft.model.config.vocab_size != target.config.vocab_size:
            raise UserError(f"--draft-models: '{spec}' scores {draft.model.config.vocab_size} token ids, the target "
                            f"{target.config.vocab_size}; their distributions must cover the same ids")
        return draft.model

    def decoder(self, prompt_len: int, max_new_tokens: int, params: SamplingParams, readback: int) -> PipeSpecDecoder:
        capacity = pipespec_capacity(prompt_len, max_new_tokens, len(self.chain), self.window, readback)
        return PipeSpecDecoder(self.chain, capacity, params, self.window, self.periods)

    def describe(self) -> dict:
        return {"chain": [level.name for level in self.chain],
                "chain_layers": [level.model.config.num_layers for level in self.chain],
                "self_drafts": self.self_drafts, "costs": [level.cost for level in self.chain],
                "periods": self.periods, "window": self.window}

    def eval_row(self, stats: PipeSpecStats) -> dict:
        return {"target_passes": stats.target_passes}

    @classmethod
    def predict(cls, settings: dict, per_prompt: list[dict], times, link) -> dict:
        """One device per model. A self-draft of m layers steps in its layers' time plus the head's; another
        draft in its cost times the target's step."""
        decoded = sum(p["new_tokens"] - 1 for p in per_prompt)
        passes = sum(p["target_passes"] for p in per_prompt)
        run = ScheduleCounts(settings["costs"], settings["periods"], settings["window"],
                             decoded / passes if passes else 0.0)
        step_ms = None
        if settings["self_drafts"]:
            step_ms = [sum(times.layer_ms[:m]) + times.head_ms for m in settings["chain_layers"]]
        prediction = predict_pipespec(run, times.vanilla_token_ms(), link, step_ms)
        return {"devices": len(settings["periods"]), "tokens_per_s": prediction.tokens_per_s,
                "vanilla_tokens_per_s": prediction.vanilla_tokens_per_s, "speedup": prediction.speedup}


# ---------------------------------------------------------------------------------------------- the simulator
@dataclass(frozen=True)
class ScheduleCounts:
    """What the simulator needs of PipeSpec runs (a :class:`PipeSpecStats` has the same fields): the schedule
    and the tokens committed per target pass."""
    costs: list[float]
    periods: list[int]
    window: int
    tokens_per_target_pass: float


@dataclass
class PipeSpecPrediction:
    sub_tick_ms: float  # the schedule's sub-tick on these devices: the slowest level's step + message per period
    cycle_ms: float  # one target period
    tokens_per_s: float
    vanilla_tokens_per_s: float
    speedup: float
    bottleneck: int  # the model whose step sets the sub-tick


def predict_pipespec(stats: PipeSpecStats | ScheduleCounts, target_step_ms: float, link: Link,
                     step_ms: Sequence[float] | None = None) -> PipeSpecPrediction:
    """PipeSpec tokens/s with one device per model, against vanilla on one device, by replaying the recorded
    run's schedule (``stats``: a run's, or :class:`ScheduleCounts` pooled over runs) on real step times.

    ``step_ms``: one forward of each model (up to window + 1 tokens: decoding is memory-bound, so about one
    token's time), the target last; by default ``stats.costs`` times ``target_step_ms`` (a truncated self-draft
    of m layers costs m/L). On its own device, model i must finish a step, and send its new token ids to the
    next model (one ``link`` message), within its ``periods[i]`` sub-ticks, so the sub-tick is the largest
    (step + message) / period; a cycle is the target's period, and it commits ``tokens_per_target_pass`` tokens,
    the run's count. Vanilla decodes one token per ``target_step_ms``. Prefill is left out of both. Since the
    schedule is the one the run used, the prediction is exact for it; devices whose step-time ratios differ from
    ``periods`` idle for part of their period (the bottleneck model sets the pace).
    """
    times = list(step_ms) if step_ms is not None else [cost * target_step_ms for cost in stats.costs]
    if len(times) != len(stats.periods):
        raise UserError(f"give one step time per model of the chain ({len(stats.periods)}), got {len(times)}")
    message_ms = link.message_ms(TOKEN_ID_BYTES * (stats.window + 1))
    per_sub_tick = [(ms + message_ms) / period for ms, period in zip(times, stats.periods)]
    sub_tick_ms = max(per_sub_tick)
    cycle_ms = sub_tick_ms * stats.periods[-1]
    tokens_per_s = 1000.0 * stats.tokens_per_target_pass / cycle_ms
    vanilla = 1000.0 / target_step_ms
    return PipeSpecPrediction(sub_tick_ms, cycle_ms, tokens_per_s, vanilla, tokens_per_s / vanilla,
                              per_sub_tick.index(sub_tick_ms))
