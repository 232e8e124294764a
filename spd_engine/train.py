"""Train a draft module (PDM) by distillation from the frozen target (docs/ARCHITECTURE.md, "The draft module").

    spd-engine train-pdm --model default --stages 4 --data prompts.jsonl --self-distill --steps 300 --out DIR

Pipeline of one run:

1. **Data.** ``.txt`` files are packed text; ``.jsonl`` files hold chats (``{"messages": [...]}`` or EAGLE
   ``{"turns": [...]}``) rendered with the model's chat template. With ``--self-distill`` the target first
   answers the prompts greedily (a ``.txt`` file then supplies passages that become "continue / summarise /
   explain" prompts) and training uses prompt + its own answer; answers are cached in the output directory.
   All token streams are concatenated and cut into ``--seq-len`` sequences, split into train / validation.
2. **Draft vocabulary.** The K most frequent tokens of the training sequences plus the target's own
   predictions over a bounded sample of them (self-distilled answers are its predictions already);
   :meth:`PDM.create` copies the matching LM-head rows.
3. **Steps.** The frozen target runs each sequence (no grad), capturing its anchor hidden states and logits;
   these are kept for later epochs when they fit ``--target-cache-gb``. The PDM's tower runs over the
   *staircase layout* (:func:`staircase_mask`) and the loss is KL(target ‖ draft) over the draft vocabulary
   at positions whose target argmax is in it. Half the steps use a partly filled pipeline (fill f in
   [1, n-1]). AdamW, linear warm-up (100 steps, at most 10% of the run) then linear decay, grad clip 1.0.
   Trainable weights are float32 masters; a half-precision target on a GPU runs the PDM under autocast.
4. **Checkpoints** (every ``--checkpoint-every`` steps and at the end) are directories committed by an atomic
   pointer update; ``--resume`` continues from the latest one and ends bit-identical to an uninterrupted run.
5. **Report.** Validation metrics (:meth:`Distiller.validate`), ``train_report.json`` and the final PDM,
   all in ``--out``.

``--cache`` runs also train data-parallel under torchrun (``--distributed``; :mod:`spd_engine.runtime.data_parallel`):
``--batch-size`` is then the global batch, each rank trains on its share, and rank 0 writes every file.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .decode import generate_batch
from .jsonl import write_text_atomic
from .errors import UserError
from .jsonl import read_jsonl
from .model import AnchorCapture
from .pdm import PDM, WEIGHTS_FILE
from .runtime.data_parallel import SINGLE, Replicas
from .stages import partition_layers, stage_layers_arg
from .weights import read_safetensors

REPORT_FILE = "train_report.json"
ANSWERS_FILE = "self_distill_answers.jsonl"
CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"  # names the newest complete checkpoint; replacing it is the commit point
TRAINER_STATE_FILE = "trainer_state.pt"
WARMUP_STEPS = 100
GRAD_CLIP = 1.0
# The target's own predictions join the draft-vocabulary counts; scanning this many tokens finds its frequent
# predictions without a second pass of target forwards over the whole training set.
VOCAB_SCAN_TOKENS = 16384
# Prompts answered together: one GEMM per weight per step instead of one GEMV per prompt, small caches.
SELF_DISTILL_BATCH = 16
# A .txt file is cut at blank lines into passages of at least this many words: the unit of sampling and of the
# train / validation split. Under --self-distill each passage, cut to at most PROMPT_WORDS words, becomes a
# prompt under one of these asks.
PASSAGE_WORDS = 80
PROMPT_WORDS = 200
PASSAGE_INSTRUCTIONS = ("Continue this passage.", "Summarise this passage.",
                        "Explain in plain words what happens in this passage.")


@dataclass
class TrainOptions:
    """Everything that defines a training run. A resumed run must ask for the same values (see RESUME_FREE)."""
    data: list[str]
    out: str
    stages: int | None = None
    stage_layers: list[int] | None = None
    anchors: list[int] | str = "auto"
    tower_layers: int = 1
    draft_vocab: int = 8192
    self_distill: bool = False
    answer_tokens: int = 256
    max_examples: int | None = None
    seq_len: int = 512
    steps: int | None = None  # overrides epochs
    epochs: float = 1.0
    batch_size: int = 8
    lr: float = 1e-4
    val_fraction: float = 0.05
    checkpoint_every: int = 200
    resume: bool = False
    seed: int = 0
    target_cache_gb: float = 4.0  # keep the target's outputs when a set fits (a pure speed-up)
    cache: list[str] | None = None  # build-data feature caches: train the PDM alone, no target forward per step
    fill_mix: str = "half"  # "half": the reference's 50/50; "regime": fills weighted by their share of drafts
    expected_acceptance: float = 0.6  # p of the "regime" mixture
    normalize_anchors: bool = False  # train on RMS-standardised anchors, folded into the weights at save time
    max_rows: int = 768  # a cached conversation longer than this trains on its last max_rows rows
    bf16: bool = False  # (--cache) bfloat16 autocast for the PDM's matmuls; float32 master weights
    micro_batch: int | None = None  # (--cache) sequences per forward pass on one rank; None: its whole share
    init: str | None = None  # (--cache) start from this saved PDM's weights instead of a fresh PDM
    feature_loss: float = 0.0  # (--cache) weight of EAGLE's feature regression beside the KL; 0 = off

    def check(self) -> None:
        if bool(self.data) == bool(self.cache):
            raise UserError("give either --data files or --cache DIR [DIR ...] (build-data feature caches), "
                            "not both")
        if self.feature_loss and not self.cache:
            raise UserError("--feature-loss trains on a feature cache: add --cache DIR (see build-data)")
        if not self.feature_loss >= 0:
            raise UserError(f"--feature-loss must be >= 0, got {self.feature_loss}")
        if self.init and not self.cache:
            raise UserError("--init continues a PDM on a feature cache: add --cache DIR (see build-data)")
        if self.fill_mix not in FILL_MIXES:
            raise UserError(f"--fill-mix must be one of {', '.join(FILL_MIXES)}, got '{self.fill_mix}'")
        if not 0 <= self.expected_acceptance < 1:
            raise UserError(f"--expected-acceptance must be in [0, 1), got {self.expected_acceptance}")
        if self.max_rows < 2:
            raise UserError(f"--max-rows must be >= 2, got {self.max_rows}")
        for name, value, low in (("--tower-layers", self.tower_layers, 1), ("--draft-vocab", self.draft_vocab, 1),
                                 ("--answer-tokens", self.answer_tokens, 1), ("--seq-len", self.seq_len, 2),
                                 ("--batch-size", self.batch_size, 1), ("--steps", self.steps, 1),
                                 ("--checkpoint-every", self.checkpoint_every, 1),
                                 ("--max-examples", self.max_examples, 1), ("--micro-batch", self.micro_batch, 1)):
            if value is not None and value < low:
                raise UserError(f"{name} must be >= {low}, got {value}")
        if not self.epochs > 0:
            raise UserError(f"--epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not self.target_cache_gb >= 0:
            raise UserError(f"--target-cache-gb must be >= 0, got {self.target_cache_gb}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


FILL_MIXES = ("half", "regime")
MIN_FULL_PIPELINE = 0.2  # the regime mixture still trains the full pipeline this often


def fill_probabilities(stages: int, mix: str, expected_acceptance: float) -> torch.Tensor:
    """(n,) probability of training fill f = 1..n.

    ``half``: the reference's partial-fill augmentation, full pipeline half the time, else uniform over
    [1, n-1]. ``regime``: each fill's share of verified drafts at per-draft acceptance p: after a flush the
    pipeline refills one token per accepted draft, so a draft is made at fill k < n with probability
    (1-p) p^(k-1) and at a full pipeline with p^(n-1); the full pipeline keeps at least
    :data:`MIN_FULL_PIPELINE`, the other fills sharing the rest in proportion."""
    n = stages
    if n == 1:
        return torch.ones(1)
    if mix == "half":
        return torch.cat([torch.full((n - 1,), 0.5 / (n - 1)), torch.tensor([0.5])])
    p = expected_acceptance
    shares = torch.tensor([(1 - p) * p ** (k - 1) for k in range(1, n)] + [p ** (n - 1)], dtype=torch.float64)
    if shares[-1] < MIN_FULL_PIPELINE:
        shares[:-1] *= (1 - MIN_FULL_PIPELINE) / shares[:-1].sum()
        shares[-1] = MIN_FULL_PIPELINE
    return (shares / shares.sum()).float()


# Options that may differ between a run and its resumption: none of them changes a trained number, except that
# micro_batch (like the number of ranks) splits the same batch into other pieces: float summation order only.
RESUME_FREE = ("out", "resume", "checkpoint_every", "target_cache_gb", "micro_batch")


# ====================================================================== data
def _read_jsonl(path: Path) -> list[list[dict]]:
    """Chats from a JSONL file: ``{"messages": [{"role", "content"}, ...]}`` or EAGLE ``{"turns": [...]}``
    (alternating user / assistant turns, user first)."""
    chats = []
    for number, record in read_jsonl(path):
        if isinstance(record, dict) and isinstance(record.get("messages"), list):
            messages = record["messages"]
        elif isinstance(record, dict) and isinstance(record.get("turns"), list):
            messages = [{"role": ("user", "assistant")[i % 2], "content": turn}
                        for i, turn in enumerate(record["turns"])]
        else:
            raise UserError(f"{path}:{number}: expected an object with 'messages' or 'turns'")
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in messages):
            raise UserError(f"{path}:{number}: every message needs string 'role' and 'content'")
        if messages:
            chats.append(messages)
    return chats


def passages(text: str, min_words: int = PASSAGE_WORDS) -> list[str]:
    """The text cut at blank lines into verbatim pieces of at least ``min_words`` words (the last may be
    shorter); joined back together they give the text again, up to a final blank line."""
    pieces, current, words = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        words += len(paragraph.split())
        if words >= min_words:
            pieces.append("\n\n".join(current) + "\n\n")
            current, words = [], 0
    if current and "".join(current).strip():
        pieces.append("\n\n".join(current))
    return pieces


def _first_user_turn(messages: list[dict]) -> list[dict] | None:
    """The conversation up to and including its first user message (a system message before it stays)."""
    for i, message in enumerate(messages):
        if message["role"] == "user":
            return messages[: i + 1]
    return None


def _examples(path: Path, self_distill: bool) -> list:
    """One file's examples: chats (lists of messages) to render, or passages of raw text to tokenize as is."""
    if not path.is_file():
        raise UserError(f"data file '{path}' does not exist")
    if path.suffix == ".txt":
        pieces = passages(path.read_text(encoding="utf-8", errors="replace"))
        if not self_distill:
            return pieces
        return [[{"role": "user", "content": PASSAGE_INSTRUCTIONS[i % len(PASSAGE_INSTRUCTIONS)] + "\n\n" +
                  " ".join(piece.split()[:PROMPT_WORDS])}] for i, piece in enumerate(pieces)]
    if path.suffix == ".jsonl":
        chats = _read_jsonl(path)
        return [p for p in map(_first_user_turn, chats) if p] if self_distill else chats
    raise UserError(f"data file '{path}' must be .txt (plain text) or .jsonl (chats)")


class AnswerCache:
    """Self-distilled answers on disk, one JSON line per prompt, appended as they are made, so an interrupted
    or resumed run never regenerates one. A line cut short by a crash is ignored."""

    def __init__(self, path: Path, model_key: str):
        self.path, self.model_key = path, model_key
        self.answers: dict[str, list[int]] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self.answers[record["key"]] = record["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def key(self, prompt_ids: list[int], answer_tokens: int) -> str:
        return hashlib.sha1(json.dumps([self.model_key, answer_tokens, prompt_ids]).encode()).hexdigest()

    def add(self, key: str, answer: list[int]) -> None:
        self.answers[key] = answer
        with self.path.open("a") as handle:
            handle.write(json.dumps({"key": key, "answer": answer}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def self_distill(engine, prompts: list[list[int]], answer_tokens: int, cache: AnswerCache,
                 progress: bool = True) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(prompt, the target's own greedy answer) for each prompt that fits the context. Missing answers are made
    ``SELF_DISTILL_BATCH`` prompts at a time by batched greedy decoding. Returns (pairs, prompts skipped for
    length)."""
    limit = engine.model.config.max_position_embeddings
    fitting = [ids for ids in prompts if len(ids) + answer_tokens <= limit]
    keys = [cache.key(ids, answer_tokens) for ids in fitting]
    missing = list({key: ids for key, ids in zip(keys, fitting) if key not in cache.answers}.items())
    with tqdm(total=len(missing), desc="self-distill", unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(missing), SELF_DISTILL_BATCH):
            batch = missing[start: start + SELF_DISTILL_BATCH]
            answers = generate_batch(engine.model, [ids for _, ids in batch], answer_tokens, engine.eos_ids)
            for (key, _), answer in zip(batch, answers):
                cache.add(key, answer)
            bar.update(len(batch))
    return [(ids, cache.answers[key]) for ids, key in zip(fitting, keys)], len(prompts) - len(fitting)


@dataclass
class TrainingData:
    train: torch.Tensor  # (N, T) int64
    val: torch.Tensor  # (M, T) int64
    val_answers: torch.Tensor | None = None  # (M, T) bool: the token is a self-distilled answer's
    summary: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha1(self.train.numpy().tobytes())
        digest.update(self.val.numpy().tobytes())
        return digest.hexdigest()


def load_training_data(engine, options: TrainOptions, progress: bool = True) -> TrainingData:
    """Read, render (and self-distill), split train / validation and pack each into ``seq_len`` sequences.

    Examples are passages of text files, chats, or prompts with their answers. ``--max-examples`` keeps a
    seeded random subset of them, in order. The split is by whole examples drawn at random until validation
    holds max(one sequence, ``val_fraction`` of the tokens), so no validation text is ever trained on.
    """
    tokenizer = engine.tokenizer
    examples = [example for path in options.data for example in _examples(Path(path), options.self_distill)]
    if options.max_examples is not None and options.max_examples < len(examples):
        keep = torch.randperm(len(examples), generator=torch.Generator().manual_seed(options.seed))
        examples = [examples[i] for i in sorted(keep[: options.max_examples].tolist())]

    def render(example, generation_prompt: bool) -> list[int]:
        # No BOS: passages continue one another, and chat templates place their own.
        text = example if isinstance(example, str) else tokenizer.apply_chat_template(
            example, add_generation_prompt=generation_prompt)
        return tokenizer.encode(text, add_bos=False)

    summary = {"files": list(options.data), "examples": len(examples), "self_distill": options.self_distill}
    if options.self_distill:
        prompts = [render(chat, True) for chat in examples]
        cache = AnswerCache(Path(options.out) / ANSWERS_FILE, engine.model_spec)
        pairs, skipped = self_distill(engine, prompts, options.answer_tokens, cache, progress)
        summary.update(skipped_prompts=skipped, answer_tokens=options.answer_tokens)
        streams = [prompt + answer for prompt, answer in pairs]
        is_answer = [[False] * len(prompt) + [True] * len(answer) for prompt, answer in pairs]
    else:
        streams = [render(example, False) for example in examples]
        is_answer = None
    tokens = sum(map(len, streams))
    if tokens == 0:
        raise UserError(f"no training text in {', '.join(options.data)}")
    T = options.seq_len

    val_ids, val_tokens = set(), 0
    if options.val_fraction > 0:
        for i in torch.randperm(len(streams), generator=torch.Generator().manual_seed(options.seed)).tolist():
            if val_tokens >= max(T, options.val_fraction * tokens):
                break
            val_ids.add(i)
            val_tokens += len(streams[i])

    def pack(ids: list[int], rows: list[list], dtype: torch.dtype) -> torch.Tensor:
        flat = [value for i in ids for value in rows[i]]
        return torch.tensor(flat[: len(flat) // T * T], dtype=dtype).view(-1, T)

    train_ids = [i for i in range(len(streams)) if i not in val_ids]
    val_ids = sorted(val_ids)
    train, val = pack(train_ids, streams, torch.long), pack(val_ids, streams, torch.long)
    if len(train) == 0 or (options.val_fraction > 0 and len(val) == 0):
        raise UserError(f"the data ({tokens} tokens in {len(streams)} examples) is too little for --seq-len {T}: "
                        "it must fill a training sequence and, with --val-fraction > 0, a validation sequence "
                        "of other whole examples")
    val_answers = pack(val_ids, is_answer, torch.bool) if is_answer is not None else None
    summary.update(tokens=tokens, seq_len=T, train_sequences=len(train), val_sequences=len(val),
                   val_examples=len(val_ids))
    return TrainingData(train, val, val_answers, summary)


def choose_draft_vocab(sequences: torch.Tensor, predicted: torch.Tensor, vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` most frequent tokens among the training tokens plus the target's predictions, as sorted
    ids (ties and never-seen tokens go by id)."""
    counts = torch.bincount(sequences.flatten(), minlength=vocab_size) + \
        torch.bincount(predicted.flatten(), minlength=vocab_size)
    ranked = torch.sort(-counts[:vocab_size], stable=True).indices  # stable: equal counts keep id order
    return ranked[: min(size, vocab_size)].sort().values


# ====================================================================== staircase layout
def staircase_blocks(depth_types: list[int], per_depth: bool = False) -> list[tuple[int, int]]:
    """The row blocks of a training sequence: (aggregation type, representative depth), in depth order, so the
    depth-0 block comes first.

    By default one block per distinct type among depths 0..n (``depth_types[d]``), represented by the
    shallowest depth using it; types no depth uses get no block (their rows could never be seen). That is exact
    for a one-layer tower, where only the depth-0 rows' outputs matter and they see each key row through its
    features alone. With ``per_depth`` every depth 0..n gets its own block: needed for towers of two or more
    layers, whose key rows carry their own attention (see :func:`staircase_mask`)."""
    if per_depth:
        return [(kind, depth) for depth, kind in enumerate(depth_types)]
    blocks: dict[int, int] = {}
    for depth, kind in enumerate(depth_types):
        blocks.setdefault(kind, depth)
    return list(blocks.items())


def staircase_mask(depth_types: list[int], seq_len: int, fill: int | torch.Tensor | None = None,
                   per_depth: bool = False) -> torch.Tensor:
    """(R, R) boolean attention mask (True = visible) over ``R = blocks * seq_len`` rows laid out block-major
    (block b, position t at row ``b * seq_len + t``; blocks from :func:`staircase_blocks`), recreating what
    the tower sees at inference.

    With n = len(depth_types) - 1 stages and fill f (default n: full pipeline), a row of depth d at position t
    sees the row for position t - δ (δ >= 0) only in the block of depth ``d + δ`` if ``d + δ < f`` and of
    depth n (the deepest type) otherwise. For the depth-0 block (the only one whose outputs get the loss) that
    is exactly the inference staircase: the newest token sees the token δ places older at depth min(n, δ),
    and with a partly filled pipeline (fill f) keys at distance >= f at full depth. Rows of other blocks follow
    the same rule from their own depth, which is what an in-flight token of that depth sees at inference; they
    feed the depth-0 rows only through the K/V of tower layers after the first. With ``per_depth`` blocks that
    is exact for any tower depth; with merged blocks a row stands for the shallowest depth of its type, which
    is exact for a one-layer tower only. Every row sees at least one row at its own position (itself, or the
    deepest row when its depth is past the fill), so none is empty.

    ``fill`` may also be a (seq_len,) tensor: query position t then sees the pipeline at fill ``fill[t]``.
    Each depth-0 query's attention depends on its own mask row only, so with a one-layer tower one pass
    trains every fill level at once (regime-weighted fills, :func:`fill_probabilities`).
    """
    n = len(depth_types) - 1
    fill = torch.as_tensor(n if fill is None else fill)
    if not bool(((fill >= 1) & (fill <= n)).all()):
        raise ValueError(f"fill must be in [1, {n}], got {fill.tolist()}")
    fill = fill.reshape(-1, 1)  # one fill for every query, or one per query position: (T, 1) against keys
    blocks = staircase_blocks(depth_types, per_depth)
    block_of_type = {kind: index for index, (kind, _) in enumerate(blocks)}
    # The block holding each depth's rows: its own with per-depth blocks, its type's otherwise.
    block_of_depth = torch.tensor([depth if per_depth else block_of_type[kind]
                                   for depth, kind in enumerate(depth_types)])
    positions = torch.arange(seq_len)
    distance = positions[:, None] - positions[None, :]  # query position minus key position
    causal = distance >= 0
    rows = []
    for _, depth in blocks:
        seen_depth = depth + distance.clamp(min=0)
        key_block = block_of_depth[torch.where(seen_depth < fill, seen_depth, n)]
        rows.append(torch.cat([causal & (key_block == index) for index in range(len(blocks))], dim=1))
    return torch.cat(rows, dim=0)


# ====================================================================== distillation
@dataclass
class TargetOutputs:
    anchors: torch.Tensor  # (B, T, m, H) hidden states at the PDM's anchors
    teacher: torch.Tensor  # (B, T, K) float32 target logits over the draft vocabulary
    argmax: torch.Tensor  # (B, T) the target's greedy next token (full vocabulary)


@torch.no_grad()
def target_pass(target, ids: torch.Tensor, anchor_layers: list[int], draft_vocab: torch.Tensor) -> TargetOutputs:
    """Run the frozen target over (B, T) sequences, one at a time (its KV cache holds one sequence), capturing
    the hidden states at ``anchor_layers`` and the logits over ``draft_vocab``."""
    B, T = ids.shape
    H, L = target.config.hidden_size, target.config.num_layers
    anchors = torch.empty(B, T, len(anchor_layers), H, dtype=target.dtype, device=target.device)
    teacher = torch.empty(B, T, len(draft_vocab), dtype=torch.float32, device=target.device)
    argmax = torch.empty(B, T, dtype=torch.long, device=target.device)
    cache = target.new_cache(T)
    for b in range(B):
        cache.reset()
        embedded = target.embed(ids[b: b + 1])
        anchors[b, :, 0] = embedded[0]  # anchor 0 is the embedding; forward_layers fills the others
        capture = AnchorCapture(tuple(anchor_layers), anchors[b])
        logits = target.logits(target.forward_layers(embedded, 0, L, cache, anchors=capture))[0]
        argmax[b] = logits.argmax(-1)
        teacher[b] = logits[:, draft_vocab].float()
    return TargetOutputs(anchors, teacher, argmax)


class TargetCache:
    """The frozen target's outputs for a fixed set of sequences, by index. They are kept after first use when
    the whole set fits in ``budget_bytes``, so later epochs and the final validation cost only the PDM;
    :func:`target_pass` runs one sequence at a time either way, so keeping them never changes a number."""

    def __init__(self, target, pdm: PDM, sequences: torch.Tensor, budget_bytes: float):
        self.target, self.pdm, self.sequences = target, pdm, sequences
        T = sequences.shape[1]
        m, H, K = len(pdm.config.anchors), target.config.hidden_size, len(pdm.draft_vocab)
        per_sequence = T * (m * H * target.dtype.itemsize + K * 4 + 8)
        self.keep = per_sequence * len(sequences) <= budget_bytes
        self.kept: dict[int, TargetOutputs] = {}

    def __len__(self) -> int:
        return len(self.sequences)

    def get(self, indices: list[int]) -> TargetOutputs:
        if not self.keep:
            return self._run(indices)
        missing = [i for i in dict.fromkeys(indices) if i not in self.kept]
        if missing:
            fresh = self._run(missing)
            for j, i in enumerate(missing):
                self.kept[i] = TargetOutputs(fresh.anchors[j], fresh.teacher[j], fresh.argmax[j])
        return TargetOutputs(*(torch.stack([getattr(self.kept[i], name) for i in indices])
                               for name in ("anchors", "teacher", "argmax")))

    def _run(self, indices: list[int]) -> TargetOutputs:
        ids = self.sequences[indices].to(self.target.device)
        return target_pass(self.target, ids, self.pdm.config.anchors, self.pdm.draft_vocab)


def type_weight(agg_weight: torch.Tensor, kind: int, hidden: int) -> torch.Tensor:
    """W_kind, the (H, (kind+1)H) block of the side-by-side aggregation weights (layout in :mod:`spd_engine.pdm`)."""
    start = hidden * kind * (kind + 1) // 2
    return agg_weight[:, start: start + hidden * (kind + 1)]


def folded_agg_weight(agg_weight: torch.Tensor, anchor_inv_scale: torch.Tensor) -> torch.Tensor:
    """Weights over raw anchors equal to ``agg_weight`` over anchors scaled by ``anchor_inv_scale`` (m, H):
    each W_i's column block j is multiplied by the scale of anchor j."""
    m = anchor_inv_scale.shape[0]
    columns = torch.cat([anchor_inv_scale[: kind + 1].reshape(-1) for kind in range(m)])
    return agg_weight * columns.to(agg_weight.dtype)[None]


class Distiller:
    """The frozen target and the trainable PDM, with the forward pieces that training and validation share."""

    def __init__(self, target, pdm: PDM, anchor_inv_scale: torch.Tensor | None = None):
        """``anchor_inv_scale`` (m, H): normalised anchors. The trainable ``pdm.agg_weight`` then acts on
        anchors times this scale (every type sees inputs of a similar size), and :func:`folded_agg_weight` folds
        the scale back into the weights the engine runs, so the ``aggregate_features`` op never changes."""
        self.target, self.pdm = target, pdm
        self.anchor_inv_scale = anchor_inv_scale
        self.feature_weight = 0.0  # weight of feature_loss beside the KL (train-pdm --feature-loss)
        self.depth_types = pdm.depth_types
        self.per_depth = pdm.config.tower_layers > 1
        self.blocks = staircase_blocks(self.depth_types, self.per_depth)
        self.vocab_row = torch.full((target.config.vocab_size,), -1, dtype=torch.long, device=target.device)
        self.vocab_row[pdm.draft_vocab] = torch.arange(len(pdm.draft_vocab), device=target.device)
        # bf16 autocast on a GPU when the target runs in half precision; the trainable weights stay float32.
        half_on_gpu = target.device.type == "cuda" and target.dtype != torch.float32
        self.autocast = (lambda: torch.autocast("cuda", dtype=target.dtype)) if half_on_gpu else nullcontext

    def draft_logits(self, anchors: torch.Tensor, fill=None, positions_wanted: torch.Tensor | None = None,
                     first_query: int = 0) -> torch.Tensor:
        """Draft logits (B, T, K) of the depth-0 rows: one block of aggregated features per type, the tower
        under the staircase mask at ``fill`` (default: full pipeline). ``positions_wanted`` limits the head
        to those positions (B, len(positions_wanted), K). ``first_query`` skips the queries (and head rows) of
        positions before it: rows (B, T - first_query, K) for positions first_query.. (they stay keys)."""
        return self.head(self.draft_hidden(anchors, fill, positions_wanted, first_query))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tower output rows -> float32 draft logits (frozen final norm, draft head)."""
        with self.autocast():
            return self.pdm.draft_logits(hidden).float()

    def feature_loss(self, hidden: torch.Tensor, target_hidden: torch.Tensor, where: torch.Tensor | None,
                     denominator: torch.Tensor) -> torch.Tensor:
        """EAGLE's feature regression: smooth L1 between the tower's output rows and the target's last-layer
        output at the same positions, both through the frozen final norm (the space the head reads; the raw
        residual stream has outlier channels ~1000x the rest), summed over ``where`` and divided by
        ``denominator``. A dense 576-value signal per token beside the KL's one distribution."""
        norm = self.pdm.tower.final_norm
        per_row = F.smooth_l1_loss(norm(hidden.float()), norm(target_hidden.float()), reduction="none").mean(-1)
        return (per_row if where is None else per_row * where).sum() / denominator

    def draft_hidden(self, anchors: torch.Tensor, fill=None, positions_wanted: torch.Tensor | None = None,
                     first_query: int = 0) -> torch.Tensor:
        """The tower's output rows (B, T', H) that :meth:`draft_logits` feeds to the head."""
        pdm = self.pdm
        B, T, m, H = anchors.shape
        if self.anchor_inv_scale is not None:
            anchors = anchors * self.anchor_inv_scale.to(anchors.dtype)
        with self.autocast():
            # Each block is aggregated once, at its own type: g_i = W_i . concat(h_0..h_i), one GEMM.
            features = torch.cat([F.linear(anchors[:, :, : kind + 1].reshape(B, T, (kind + 1) * H),
                                           type_weight(pdm.agg_weight, kind, H)) for kind, _ in self.blocks], dim=1)
            positions = torch.arange(T, device=anchors.device).repeat(len(self.blocks))
            mask = staircase_mask(self.depth_types, T, fill, self.per_depth).to(anchors.device)
            if first_query:
                # Depth-0 rows are seen by their own query alone, so those before first_query can go.
                keep = torch.arange(first_query, len(positions), device=anchors.device)
                features, positions, mask = features[:, keep], positions[keep], mask[keep][:, keep]
            out = pdm.masked_tower(features, positions, mask, outputs=T - first_query)  # the depth-0 rows
        return out if positions_wanted is None else out[:, positions_wanted]

    def loss_and_matches(self, logits: torch.Tensor, outputs: TargetOutputs, where: torch.Tensor | None = None,
                         denominator: torch.Tensor | None = None):
        """KL(target ‖ draft) over the draft vocabulary, averaged over positions whose target argmax is in it
        (and, with ``where`` (B, T), that are scored); plus (B, T) top-1 agreement with the target argmax
        (out-of-vocabulary targets are misses) and the in-vocabulary mask. ``denominator``: divide the KL sum
        by this count instead (that of a whole batch this is a piece of)."""
        in_vocab = self.vocab_row[outputs.argmax] >= 0
        if where is not None:
            in_vocab = in_vocab & where
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(outputs.teacher, -1), log_target=True,
                      reduction="none").sum(-1)
        loss = (kl * in_vocab).sum() / (in_vocab.sum().clamp(min=1) if denominator is None else denominator)
        matches = self.pdm.draft_vocab[logits.argmax(-1)] == outputs.argmax
        return loss, matches, in_vocab

    @torch.no_grad()
    def validate(self, targets: TargetCache, batch_size: int, answers: torch.Tensor | None = None) -> dict | None:
        """Validation under the exact inference staircase with a full pipeline (fill n):

        * ``loss``: the training loss (mean KL over in-vocabulary positions);
        * ``top1``: agreement of the draft's argmax with the target's argmax at positions whose target argmax
          is in the draft vocabulary (what the loss optimises);
        * ``simulated_acceptance``: the same agreement over *all* positions, out-of-vocabulary targets counted
          as misses: the predicted per-draft greedy acceptance rate p of a full pipeline on this text;
        * ``simulated_accept_length``: n / (1 + (n-1)(1-p)), the equivalent accept length for p (docs/ARCHITECTURE.md).

        ``answers`` (M, T) marks the positions holding self-distilled answer tokens; ``answers`` in the result
        repeats the agreement figures over those positions only. Their drafts are the ones SPD makes while it
        generates, so that is the closer prediction of measured acceptance (prompt text scores differently).
        """
        if len(targets) == 0:
            return None
        loss_sum, matches, in_vocab = 0.0, [], []
        for start in range(0, len(targets), batch_size):
            outputs = targets.get(list(range(start, min(start + batch_size, len(targets)))))
            loss, batch_matches, batch_in_vocab = self.loss_and_matches(self.draft_logits(outputs.anchors), outputs)
            loss_sum += float(loss) * float(batch_in_vocab.sum())
            matches.append(batch_matches.cpu())
            in_vocab.append(batch_in_vocab.cpu())
        matches, in_vocab = torch.cat(matches), torch.cat(in_vocab)
        report = {"loss": loss_sum / max(int(in_vocab.sum()), 1),
                  **self._agreement(matches, in_vocab, torch.ones_like(matches))}
        if answers is not None:
            report["answers"] = self._agreement(matches, in_vocab, answers)
        return report

    def _agreement(self, matches: torch.Tensor, in_vocab: torch.Tensor, where: torch.Tensor) -> dict:
        positions, counted = int(where.sum()), in_vocab & where
        p = float((matches & where).sum()) / max(positions, 1)
        n = self.pdm.config.stages
        return {"top1": float((matches & counted).sum()) / max(int(counted.sum()), 1),
                "simulated_acceptance": p, "simulated_accept_length": n / (1 + (n - 1) * (1 - p)),
                "in_vocab_fraction": int(counted.sum()) / max(positions, 1), "positions": positions}


def from_first_scored(outputs: TargetOutputs, where: torch.Tensor | None):
    """(first, outputs, where) with the teacher, targets and mask cut to start at the batch's first scored
    position: the positions before it are keys only, so their queries need not run (``draft_logits``'s
    ``first_query``). The anchors stay whole. ``where`` None: every position scores, nothing is cut."""
    if where is None or not bool(where.any()):
        return 0, outputs, where
    first = int(where.any(0).nonzero()[0])
    return first, TargetOutputs(outputs.anchors, outputs.teacher[:, first:], outputs.argmax[:, first:]), \
        where[:, first:]


def _train_step(distiller: Distiller, optimizer, scheduler, pieces: list[tuple[TargetOutputs, torch.Tensor | None]],
                fill, replicas: Replicas = SINGLE) -> tuple[float, float, int]:
    """One optimiser step over one batch; returns (loss, top-1 agreement, scored positions), all over the whole
    batch (every rank's pieces).

    ``pieces``: this rank's parts of the batch as (outputs, where) (``where`` None: every position scores), one
    forward and backward each (gradient accumulation). Each piece's KL sum is divided by the in-vocabulary count
    of the whole batch, so the gradients summed over pieces and ranks are those of the batch's mean loss
    whatever the split, up to float summation order. ``fill``: an int, None, or one fill per query position of
    the whole batch's padded length (a piece, padded to its own longest, takes the first ones). Positions before
    a piece's first scored one are keys only: their queries are not computed."""
    regress = distiller.feature_weight > 0
    counts = torch.zeros(2, dtype=torch.long, device=distiller.vocab_row.device)  # in-vocabulary, scored
    for outputs, where in pieces:
        in_vocab = distiller.vocab_row[outputs.argmax] >= 0
        counts[0] += (in_vocab if where is None else in_vocab & where).sum()
        counts[1] += outputs.argmax.numel() if where is None else where.sum()
    replicas.sum_(counts, "summing the batch's token counts")
    optimizer.zero_grad(set_to_none=True)
    tallies = torch.zeros(2, device=counts.device)  # loss, top-1 matches
    for outputs, where in pieces:
        first, outputs, where = from_first_scored(outputs, where)
        piece_fill = fill[: outputs.anchors.shape[1]] if isinstance(fill, torch.Tensor) else fill
        hidden = distiller.draft_hidden(outputs.anchors, piece_fill, first_query=first)
        loss, matches, _ = distiller.loss_and_matches(distiller.head(hidden), outputs, where,
                                                      denominator=counts[0].clamp(min=1))
        if regress:  # the deepest anchor is the last layer's output (checked when the run starts)
            loss = loss + distiller.feature_weight * distiller.feature_loss(
                hidden, outputs.anchors[:, first:, -1], where, counts[1].clamp(min=1))
        loss.backward()
        tallies[0] += loss.detach()
        tallies[1] += (matches if where is None else matches & where).sum()
    replicas.sum_gradients(distiller.pdm.trainable(), tallies)
    torch.nn.utils.clip_grad_norm_(distiller.pdm.trainable(), GRAD_CLIP)
    optimizer.step()
    scheduler.step()
    scored = int(counts[1])
    return float(tallies[0]), float(tallies[1]) / max(scored, 1), scored


BUCKET_BATCHES = 16  # length bucketing groups items over this many batches at a time


class BatchSampler:
    """Endless shuffled batches: each epoch is a fresh permutation drawn from ``generator``; a batch may span
    an epoch boundary. Its state (the current order and cursor) is checkpointed with the generator's."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator, lengths: list[int] | None = None):
        """With ``lengths``, each epoch's order is grouped so that a batch holds items of similar length (less
        padding): chunks of BUCKET_BATCHES batches are sorted by length, cut into batches, and those batches
        shuffled. The transform is a function of the permutation and the generator, so the checkpointed
        (order, cursor) still resumes exactly."""
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.lengths = None if lengths is None else torch.tensor(lengths)
        self.order = torch.empty(0, dtype=torch.long)
        self.cursor = 0

    def _epoch_order(self) -> torch.Tensor:
        order = torch.randperm(self.size, generator=self.generator)
        if self.lengths is None:
            return order
        span = self.batch_size * BUCKET_BATCHES
        batches = []
        for start in range(0, self.size, span):
            chunk = order[start: start + span]
            chunk = chunk[torch.sort(self.lengths[chunk], stable=True).indices]
            batches.extend(chunk.split(self.batch_size))
        return torch.cat([batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()])

    def next(self) -> torch.Tensor:
        taken = []
        need = self.batch_size
        while need:
            if self.cursor == len(self.order):
                self.order, self.cursor = self._epoch_order(), 0
            chunk = self.order[self.cursor: self.cursor + need]
            taken.append(chunk)
            self.cursor += len(chunk)
            need -= len(chunk)
        return torch.cat(taken)

    def state_dict(self) -> dict:
        return {"order": self.order.clone(), "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.cursor = state["order"], state["cursor"]


def pick_fill(generator: torch.Generator, stages: int) -> int | None:
    """Partial-fill augmentation: half the steps use a fill drawn from [1, n-1]; None means a full pipeline."""
    partial = bool(torch.rand(1, generator=generator) < 0.5)
    fill = int(torch.randint(1, max(stages, 2), (1,), generator=generator))  # drawn every step: fixed RNG use
    return fill if partial and stages > 1 else None


def lr_schedule(total_steps: int):
    """Linear warm-up over min(100, 10% of the run) steps, then linear decay to 0 at the last step."""
    warmup = max(1, min(WARMUP_STEPS, total_steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


# ====================================================================== checkpoints
def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names; None when there is none yet. A pointer naming no checkpoint is damage
    (the pointer is written only after its checkpoint is complete), never a reason to start over silently."""
    pointer = out_dir / CHECKPOINT_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    path = out_dir / CHECKPOINT_DIR / name
    if not name or "/" in name or not path.is_dir():
        raise UserError(f"checkpoint pointer '{pointer}' names no checkpoint ('{name[:40]}'); delete "
                        f"'{pointer.parent}' to start over")
    return path


def _damaged(checkpoint: Path, exc: Exception) -> UserError:
    first_line = (str(exc).strip().splitlines() or [""])[0]  # torch.load's messages run to many lines
    return UserError(f"checkpoint '{checkpoint}' is damaged ({type(exc).__name__}: {first_line}); delete "
                     f"'{checkpoint.parent}' to start over")


def read_trainer_state(checkpoint: Path) -> dict:
    """A checkpoint's trainer state; a damaged one is a UserError."""
    try:
        state = torch.load(checkpoint / TRAINER_STATE_FILE, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises pickle, EOF, zip and runtime errors on bad bytes
        raise _damaged(checkpoint, exc) from exc
    needed = {"step", "optimizer", "scheduler", "data_order", "rng", "identity", "data_fingerprint",
              "train_seconds", "running", "initial_val"}
    if not isinstance(state, dict) or not needed <= set(state) or not isinstance(state["identity"], dict):
        raise _damaged(checkpoint, ValueError(f"{TRAINER_STATE_FILE} lacks fields"))
    return state


def _restore_trainer(checkpoint: Path, state: dict, optimizer, scheduler, sampler, generator) -> None:
    """Optimizer, schedule, data order and RNGs as the checkpoint left them; a damaged state is a UserError."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["data_order"])
        _restore_rng(generator, state["rng"])
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as exc:
        raise _damaged(checkpoint, exc) from exc


def save_checkpoint(out_dir: Path, step: int, pdm: PDM, state: dict) -> Path:
    """Write the PDM (PDM.save) and the trainer state into a temporary directory, rename it into place, then
    atomically repoint ``latest`` at it: an interruption at any moment leaves the previous checkpoint current
    and no partial files (the temporary directory is removed on failure). Older checkpoints are then deleted."""
    root = out_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        pdm.save(tmp)
        torch.save(state, tmp / TRAINER_STATE_FILE)
        final = root / name
        if final.exists():  # left by a crash between its rename and the pointer update: never current
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST_FILE, name)
    for stale in root.iterdir():  # older checkpoints, and leftovers of a run killed while saving
        if stale.is_dir() and stale.name != name:
            shutil.rmtree(stale, ignore_errors=True)
        elif stale.is_file() and stale.name != LATEST_FILE:
            stale.unlink(missing_ok=True)
    return final


def _set_trainable(pdm: PDM, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the PDM's weights by float32 leaf tensors from ``tensors`` (keys as in ``PDM.state_dict``):
    the optimiser's masters, whatever dtype the target runs in. The tower switches to the torch reference
    ops, the only backend with autograd (the frozen target keeps its fast kernels)."""
    device = pdm.target.device
    pdm.tower.backend = "torch"

    def leaf(key: str) -> torch.Tensor:
        return tensors[key].detach().to(device=device, dtype=torch.float32).clone().requires_grad_()

    pdm.agg_weight = leaf("agg_weight")
    pdm.tower.lm_head_weight = leaf("draft_head")
    for i, layer in enumerate(pdm.tower.layers):
        for name, value in vars(layer).items():
            if value is not None:
                setattr(layer, name, leaf(f"tower.{i}.{name}"))


def _rng_state(generator: torch.Generator) -> dict:
    state = {"sampler": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(generator: torch.Generator, state: dict) -> None:
    generator.set_state(state["sampler"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _run_identity(options: TrainOptions, engine) -> dict:
    identity = {k: v for k, v in asdict(options).items() if k not in RESUME_FREE}
    identity.update(model=engine.model_spec, dtype=str(engine.model.dtype), device=engine.model.device.type)
    return identity


# ====================================================================== the run
def _parse_anchors(anchors) -> list[int] | str:
    if anchors == "auto" or isinstance(anchors, list):
        return anchors
    try:
        return [int(a) for a in str(anchors).split(",")]
    except ValueError as exc:
        raise UserError(f"--anchors must be 'auto' or comma-separated layer counts like 0,8,16,24,29, "
                        f"got '{anchors}'") from exc


def _new_pdm(target, bounds, options: TrainOptions, data: TrainingData) -> PDM:
    """A fresh PDM over the draft vocabulary chosen from the training data (and the target's predictions)."""
    predicted = torch.empty(0, dtype=torch.long)
    # Self-distilled answers are the target's own greedy predictions already: no scan needed.
    if options.draft_vocab < target.config.vocab_size and not options.self_distill:
        scan = data.train[: max(1, VOCAB_SCAN_TOKENS // options.seq_len)].to(target.device)
        no_vocab = torch.empty(0, dtype=torch.long, device=target.device)
        predicted = target_pass(target, scan, [0], no_vocab).argmax.cpu()
    vocab = choose_draft_vocab(data.train, predicted, target.config.vocab_size, options.draft_vocab)
    return PDM.create(target, bounds, _parse_anchors(options.anchors), options.tower_layers, vocab, seed=options.seed)


def _size_report(pdm: PDM, out_dir: Path) -> dict:
    target = pdm.target
    target_tensors = {id(t): t for t in [target.embed_weight, target.norm_weight, target.lm_head_weight] +
                      [w for layer in target.layers for w in vars(layer).values() if w is not None]}
    parameters = sum(t.numel() for t in pdm.trainable())
    return {"pdm_parameters": parameters,
            "pdm_fraction_of_target": parameters / sum(t.numel() for t in target_tensors.values()),
            "pdm_file_bytes": (out_dir / WEIGHTS_FILE).stat().st_size}


def train_pdm(engine, options: TrainOptions, progress: bool = True, replicas: Replicas = SINGLE) -> dict | None:
    """Train (or, with ``options.resume``, continue training) a PDM for ``engine``'s model; returns the report
    that is also written to ``<out>/train_report.json``. The final PDM is saved in ``<out>`` (``--pdm <out>``).
    ``replicas``: this rank of a data-parallel run (``--cache`` only): rank 0 writes every file and returns the
    report, the other ranks return None."""
    options.check()
    _parse_anchors(options.anchors)  # a malformed list fails before any work
    target = engine.model
    out_dir = Path(options.out)
    bounds = partition_layers(target.config.num_layers, options.stages, options.stage_layers)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(out_dir) if options.resume else None
    if options.resume and checkpoint is None:
        print(f"spd-engine: no checkpoint in '{out_dir}', starting from scratch", file=sys.stderr)
    identity = _run_identity(options, engine)
    state = read_trainer_state(checkpoint) if checkpoint else None
    if state is not None:
        for key, value in identity.items():
            if state["identity"].get(key) != value:
                raise UserError(f"cannot resume from '{checkpoint}': it was trained with {key}="
                                f"{state['identity'].get(key)!r}, this run asks for {value!r}")
    if options.cache:
        return _train_from_cache(engine, options, bounds, checkpoint, state, identity, progress, replicas)
    if replicas.world_size > 1:
        raise UserError("--distributed trains from a feature cache: add --cache DIR (see build-data)")

    data_started = time.perf_counter()
    data = load_training_data(engine, options, progress)
    data_seconds = time.perf_counter() - data_started
    if state is not None and state["data_fingerprint"] != data.fingerprint:
        raise UserError(f"cannot resume from '{checkpoint}': the training data changed since it was written")
    total_steps = options.steps or math.ceil(options.epochs * len(data.train) / options.batch_size)

    if state is None:
        pdm = _new_pdm(target, bounds, options, data)
        _set_trainable(pdm, pdm.state_dict())
    else:
        pdm = PDM.load(checkpoint, target, bounds)
        _set_trainable(pdm, read_safetensors(checkpoint / WEIGHTS_FILE))
    distiller = Distiller(target, pdm)
    train_targets, val_targets = (TargetCache(target, pdm, sequences, options.target_cache_gb * 2**30)
                                  for sequences in (data.train, data.val))

    optimizer = torch.optim.AdamW(pdm.trainable(), lr=options.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total_steps))
    generator = torch.Generator().manual_seed(options.seed)
    sampler = BatchSampler(len(data.train), options.batch_size, generator)
    if state is None:
        step, seconds, running = 0, 0.0, {"loss": None, "top1": None}
        initial_val = distiller.validate(val_targets, options.batch_size, data.val_answers)
    else:
        _restore_trainer(checkpoint, state, optimizer, scheduler, sampler, generator)
        step, seconds, running = state["step"], state["train_seconds"], state["running"]
        initial_val = state["initial_val"]

    def trainer_state() -> dict:
        return {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data_order": sampler.state_dict(), "rng": _rng_state(generator), "identity": identity,
                "data_fingerprint": data.fingerprint, "train_seconds": seconds, "running": dict(running),
                "initial_val": initial_val}

    bar = tqdm(total=total_steps, initial=step, desc="train-pdm", unit="step", disable=not progress, file=sys.stderr)
    while step < total_steps:
        started = time.perf_counter()
        outputs = train_targets.get(sampler.next().tolist())
        loss, top1, _ = _train_step(distiller, optimizer, scheduler, [(outputs, None)],
                                    pick_fill(generator, pdm.config.stages))
        seconds += time.perf_counter() - started
        step += 1
        # Exponential moving averages for the bar and the report (the per-step values are noisy).
        for key, value in (("loss", loss), ("top1", top1)):
            running[key] = value if running[key] is None else 0.95 * running[key] + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running['loss']:.3f}", top1=f"{running['top1']:.3f}")
        if step % options.checkpoint_every == 0 and step < total_steps:
            save_checkpoint(out_dir, step, pdm, trainer_state())
    bar.close()
    if state is None or step > state["step"]:  # a run resumed at its end already has this checkpoint
        save_checkpoint(out_dir, step, pdm, trainer_state())
    pdm.save(out_dir)

    report = {
        "model": engine.model_spec, "device": str(target.device), "dtype": str(target.dtype).replace("torch.", ""),
        "out": str(out_dir), "stages": pdm.config.stages, "stage_layers": [b - a for a, b in pdm.config.stage_bounds],
        "anchors": pdm.config.anchors, "tower_layers": pdm.config.tower_layers,
        "draft_vocab": pdm.config.draft_vocab_size, **_size_report(pdm, out_dir), "data": data.summary,
        "steps": step, "batch_size": options.batch_size, "lr": options.lr,
        "epochs": step * options.batch_size / len(data.train), "data_seconds": data_seconds, "train_seconds": seconds,
        "target_cache": train_targets.keep, "train_loss": running["loss"], "train_top1": running["top1"],
        "val_initial": initial_val, "val": distiller.validate(val_targets, options.batch_size, data.val_answers),
    }
    write_text_atomic(out_dir / REPORT_FILE, json.dumps(report, indent=1))
    return report


# ====================================================================== training from a feature cache
CACHE_VAL_SEQUENCES = 96  # held-out conversations: validation runs every fill over them


@contextmanager
def inference_weights(pdm: PDM, anchor_inv_scale: torch.Tensor | None):
    """While saving: the PDM holds the weights the engine runs (normalisation folded in)."""
    if anchor_inv_scale is None:
        yield
        return
    trained = pdm.agg_weight
    pdm.agg_weight = folded_agg_weight(trained.detach(), anchor_inv_scale)
    try:
        yield
    finally:
        pdm.agg_weight = trained


def _initial_pdm(options: TrainOptions, target, bounds, anchors: list[int], inv_scale: torch.Tensor | None) -> PDM:
    """``--init DIR``: a saved PDM to continue training (e.g. on more data), checked against this run's layout.
    Its aggregation weights act on raw anchors (any normalisation was folded in when it was saved), so under
    ``--normalize-anchors`` they are unfolded with this cache's scale: the engine's function is unchanged."""
    pdm = PDM.load(options.init, target, bounds)
    for name, have, want in (("anchors", pdm.config.anchors, anchors),
                             ("--tower-layers", pdm.config.tower_layers, options.tower_layers),
                             ("--draft-vocab", pdm.config.draft_vocab_size, options.draft_vocab)):
        if have != want:
            raise UserError(f"--init '{options.init}' has {name} {have}, this run asks for {want}; "
                            "train with its settings or start a fresh PDM")
    weights = pdm.state_dict()
    if inv_scale is not None:
        weights["agg_weight"] = folded_agg_weight(weights["agg_weight"].float(), 1.0 / inv_scale.float())
    _set_trainable(pdm, weights)
    return pdm


def boundary_anchors(bounds) -> list[int]:
    """``--anchors auto`` on a feature cache: the embedding and every stage boundary, the last layer's output
    included."""
    return sorted({0, *(b for _, b in bounds)})


def cache_split(cache, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = min(CACHE_VAL_SEQUENCES, max(1, round(val_fraction * len(cache)))) if val_fraction > 0 else 0
    if len(order) - held_out < 1:
        raise UserError(f"the feature cache has {len(cache)} conversations: too few to train and validate on")
    return sorted(order[held_out:]), sorted(order[:held_out])


def _fills(generator: torch.Generator, probabilities: torch.Tensor, length: int, per_position: bool):
    """Fill levels for one step: one per query position (exact for a one-layer tower) or one for the step."""
    draws = torch.multinomial(probabilities, length if per_position else 1, replacement=True, generator=generator)
    return draws + 1 if per_position else int(draws) + 1


class CacheDistiller(Distiller):
    """A :class:`Distiller` fed from a feature cache: the teacher comes from the cached last-layer output."""

    def __init__(self, target, pdm: PDM, anchor_inv_scale: torch.Tensor | None = None):
        super().__init__(target, pdm, anchor_inv_scale)
        # The target's LM-head rows of the draft vocabulary, gathered once (not per step).
        self.teacher_head = target.lm_head_weight[pdm.draft_vocab].float()

    def teacher(self, last_hidden: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.linear(self.target.final_norm(last_hidden.to(self.target.dtype)).float(), self.teacher_head)

    def outputs(self, batch) -> TargetOutputs:
        return TargetOutputs(batch.anchors, self.teacher(batch.last_hidden), batch.next_tokens)

    @torch.no_grad()
    def validate_fills(self, cache, indices: list[int], batch_size: int, max_rows: int,
                       replicas: Replicas = SINGLE) -> dict | None:
        """Per fill f = 1..n, on the held-out answer tokens: the draft's agreement with the target's token
        (an out-of-vocabulary token is a miss), i.e. the predicted per-draft acceptance at that fill. Several
        ranks share the batches and sum their tallies."""
        if not indices:
            return None
        n = self.pdm.config.stages
        hits, scored, in_vocab, loss_sum = torch.zeros(n), 0, 0, 0.0
        for start in replicas.deal(list(range(0, len(indices), batch_size))):
            batch = cache.batch(indices[start: start + batch_size], max_rows)
            outputs = self.outputs(batch)
            scored += int(batch.scored.sum())
            in_vocab += int((batch.scored & (self.vocab_row[batch.next_tokens] >= 0)).sum())
            first, outputs, where = from_first_scored(outputs, batch.scored)
            for f in range(1, n + 1):
                loss, matches, counted = self.loss_and_matches(
                    self.draft_logits(batch.anchors, f, first_query=first), outputs, where)
                hits[f - 1] += float((matches & where).sum())
                if f == n:
                    loss_sum += float(loss) * float(counted.sum())
        if replicas.world_size > 1:
            local = torch.cat([hits.double(), torch.tensor([scored, in_vocab, loss_sum], dtype=torch.float64)])
            tallies = replicas.sum_(local.to(self.vocab_row.device), "summing validation tallies").cpu()
            hits, loss_sum = tallies[:n].float(), float(tallies[-1])
            scored, in_vocab = map(int, tallies[n: n + 2])
        acceptance = (hits / max(scored, 1)).tolist()
        return {"acceptance_by_fill": {str(f): a for f, a in enumerate(acceptance, 1)},
                "acceptance_full_pipeline": acceptance[-1], "loss_full_pipeline": loss_sum / max(in_vocab, 1),
                "in_vocab_fraction": in_vocab / max(scored, 1), "answer_tokens": scored}


def _train_from_cache(engine, options: TrainOptions, bounds, checkpoint: Path | None, state: dict | None,
                      identity: dict, progress: bool, replicas: Replicas) -> dict | None:
    """``train-pdm --cache``: the PDM alone learns from cached anchors and teacher hidden states; no target
    forward runs per step. Loss on answer tokens only, fills drawn by ``--fill-mix``. With several ranks
    (:mod:`spd_engine.runtime.data_parallel`) each trains on its share of every batch; the run is the same."""
    from .feature_cache import FeatureCache

    target, out_dir = engine.model, Path(options.out)
    anchors = _parse_anchors(options.anchors)
    if anchors == "auto":
        anchors = boundary_anchors(bounds)
    cache = FeatureCache(options.cache, target.config, anchors)
    train_ids, val_ids = cache_split(cache, options.val_fraction, options.seed)
    answer_tokens = torch.tensor([t for i in train_ids for t in cache.sequences[i].tokens[
        cache.sequences[i].answer_start:]])
    fingerprint = hashlib.sha1(json.dumps([s.tokens for s in cache.sequences]).encode()).hexdigest()
    if state is not None and state["data_fingerprint"] != fingerprint:
        raise UserError(f"cannot resume from '{checkpoint}': the feature cache changed since it was written")
    total_steps = options.steps or math.ceil(options.epochs * len(train_ids) / options.batch_size)
    if options.batch_size < replicas.world_size:
        raise UserError(f"--batch-size {options.batch_size} is the global batch: it needs at least one sequence "
                        f"per rank, and {replicas.world_size} ranks were launched")
    inv_scale = None
    if options.normalize_anchors:
        # Every anchor channel to one RMS: that of the last layer's output overall, the residual scale the tower
        # (a copy of the target's last layers) was made for, so its N(0, 0.02) aggregation starts in range.
        rms = cache.channel_rms()
        inv_scale = (cache.deepest_rms() / rms).to(target.device)

    if state is None and options.init:
        pdm = _initial_pdm(options, target, bounds, anchors, inv_scale)
    elif state is None:
        vocab = choose_draft_vocab(answer_tokens, torch.empty(0, dtype=torch.long), target.config.vocab_size,
                                   options.draft_vocab)
        pdm = PDM.create(target, bounds, anchors, options.tower_layers, vocab, seed=options.seed)
        _set_trainable(pdm, pdm.state_dict())
    else:
        pdm = PDM.load(checkpoint, target, bounds)
        _set_trainable(pdm, {**read_safetensors(checkpoint / WEIGHTS_FILE), "agg_weight": state["agg_normed"]})
    replicas.broadcast_(pdm.trainable(), "receiving the starting weights")
    distiller = CacheDistiller(target, pdm, inv_scale)
    if options.feature_loss:
        if anchors[-1] != target.config.num_layers:
            raise UserError(f"--feature-loss regresses on the last layer's output: the deepest anchor must be "
                            f"{target.config.num_layers}, got {anchors[-1]}")
        distiller.feature_weight = options.feature_loss
    if options.bf16:
        distiller.autocast = lambda: torch.autocast(target.device.type, dtype=torch.bfloat16)
    probabilities = fill_probabilities(pdm.config.stages, options.fill_mix, options.expected_acceptance)
    per_position = options.tower_layers == 1

    optimizer = torch.optim.AdamW(pdm.trainable(), lr=options.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total_steps))
    generator = torch.Generator().manual_seed(options.seed)
    lengths = [min(cache.sequences[i].rows, options.max_rows) for i in train_ids]
    sampler = BatchSampler(len(train_ids), options.batch_size, generator, lengths)
    if state is None:
        step, seconds, rows_seen, running = 0, 0.0, 0, {"loss": None, "top1": None}
        initial_val = distiller.validate_fills(cache, val_ids, options.batch_size, options.max_rows, replicas)
    else:
        _restore_trainer(checkpoint, state, optimizer, scheduler, sampler, generator)
        step, seconds, running = state["step"], state["train_seconds"], state["running"]
        rows_seen, initial_val = state["rows_seen"], state["initial_val"]
    history = list(state["history"]) if state is not None else []

    def checkpoint_now() -> None:
        if not replicas.writer:
            return
        trainer = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "data_order": sampler.state_dict(), "rng": _rng_state(generator), "identity": identity,
                   "data_fingerprint": fingerprint, "train_seconds": seconds, "running": dict(running),
                   "initial_val": initial_val, "rows_seen": rows_seen, "history": history,
                   "agg_normed": pdm.agg_weight.detach().clone()}
        with inference_weights(pdm, inv_scale):
            save_checkpoint(out_dir, step, pdm, trainer)

    bar = tqdm(total=total_steps, initial=step, desc="train-pdm", unit="step",
               disable=not (progress and replicas.writer), file=sys.stderr)
    while step < total_steps:
        started = time.perf_counter()
        drawn = sampler.next().tolist()  # the whole batch: every rank draws it, so all stay in step
        fill = _fills(generator, probabilities, max(lengths[i] for i in drawn), per_position)
        mine = replicas.share([train_ids[i] for i in drawn])
        micro = options.micro_batch or len(mine)
        pieces = []
        for start in range(0, len(mine), micro):
            batch = cache.batch(mine[start: start + micro], options.max_rows)
            pieces.append((distiller.outputs(batch), batch.scored))
        loss, top1, scored = _train_step(distiller, optimizer, scheduler, pieces, fill, replicas)
        seconds += time.perf_counter() - started
        rows_seen += scored
        step += 1
        for key, value in (("loss", loss), ("top1", top1)):
            running[key] = value if running[key] is None else 0.95 * running[key] + 0.05 * value
        bar.update(1)
        bar.set_postfix(loss=f"{running['loss']:.3f}", top1=f"{running['top1']:.3f}")
        if step % options.checkpoint_every == 0 or step == total_steps:
            history.append({"step": step, "answer_tokens_seen": rows_seen, "train_top1": running["top1"],
                            "val": distiller.validate_fills(cache, val_ids, options.batch_size, options.max_rows,
                                                            replicas)})
            if step < total_steps:
                checkpoint_now()
    bar.close()
    if state is None or step > state["step"]:
        checkpoint_now()
    if not replicas.writer:
        return None
    with inference_weights(pdm, inv_scale):
        pdm.save(out_dir)
    report = {
        "model": engine.model_spec, "device": str(target.device), "dtype": str(target.dtype).replace("torch.", ""),
        "out": str(out_dir), "cache": [str(c) for c in options.cache], "stages": pdm.config.stages,
        "stage_layers": [b - a for a, b in pdm.config.stage_bounds], "anchors": pdm.config.anchors,
        "tower_layers": pdm.config.tower_layers, "draft_vocab": pdm.config.draft_vocab_size,
        **_size_report(pdm, out_dir), "fill_mix": options.fill_mix, "expected_acceptance": options.expected_acceptance,
        "feature_loss": options.feature_loss, "init": options.init,
        "fill_probabilities": probabilities.tolist(), "normalize_anchors": options.normalize_anchors,
        "train_conversations": len(train_ids), "val_conversations": len(val_ids),
        "train_answer_tokens": int(answer_tokens.numel()), "steps": step, "batch_size": options.batch_size,
        "micro_batch": options.micro_batch, "ranks": replicas.world_size,
        "lr": options.lr, "epochs": step * options.batch_size / len(train_ids), "train_seconds": seconds,
        "answer_tokens_seen": rows_seen, "train_tokens_per_s": rows_seen / seconds if seconds else 0.0,
        "train_loss": running["loss"], "train_top1": running["top1"], "val_initial": initial_val,
        "val": history[-1]["val"] if history else None, "history": history,
    }
    write_text_atomic(out_dir / REPORT_FILE, json.dumps(report, indent=1))
    return report


# ====================================================================== CLI
def add_arguments(p) -> None:
    from .cli import _add_model_args

    _add_model_args(p)
    p.add_argument("--stages", type=int, default=None, help="number of pipeline stages n")
    p.add_argument("--stage-layers", type=stage_layers_arg, default=None,
                   help="explicit layers per stage, e.g. 8,8,7,7")
    p.add_argument("--anchors", default="auto", help="'auto' or hidden-state indices, e.g. 0,8,16,24,29")
    p.add_argument("--tower-layers", type=int, default=1, help="decoder layers in the PDM's tower (L_s)")
    p.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary size K (capped at the model's)")
    p.add_argument("--cache", nargs="+", default=None, metavar="DIR",
                   help="train from build-data feature caches, read as one set (no target forward per step; "
                        "answer tokens only)")
    p.add_argument("--fill-mix", choices=FILL_MIXES, default="half",
                   help="pipeline fills to train: 'half' (full half the time) or 'regime' (each fill's share of "
                        "verified drafts at --expected-acceptance, full pipeline >= 20%%)")
    p.add_argument("--expected-acceptance", type=float, default=0.6, help="p of --fill-mix regime")
    p.add_argument("--normalize-anchors", action="store_true",
                   help="(--cache) train on RMS-standardised anchors; the scale is folded into the saved weights")
    p.add_argument("--max-rows", type=int, default=768,
                   help="(--cache) longest conversation window trained on (its last rows)")
    p.add_argument("--bf16", action="store_true",
                   help="(--cache) bfloat16 autocast for the PDM (float32 master weights): ~1.4x faster on CPUs "
                        "with AVX512-BF16")
    p.add_argument("--micro-batch", type=int, default=None, metavar="N",
                   help="(--cache) sequences per forward pass on one rank; a larger share of the global "
                        "--batch-size is accumulated over several passes (default: the whole share)")
    p.add_argument("--feature-loss", type=float, default=0.0, metavar="W",
                   help="(--cache) add W x EAGLE's feature regression (smooth L1 between the tower's output and "
                        "the target's last-layer output, through the final norm) to the KL; 0 = off")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="(--cache) start from this saved PDM (same stages, anchors, tower and draft vocabulary) "
                        "instead of a fresh one, e.g. to continue training on more data")
    p.add_argument("--distributed", action="store_true",
                   help="(--cache) data-parallel under torchrun: --batch-size is the global batch, each rank "
                        "trains on its share, rank 0 writes --out")
    importlib.import_module("spd_engine.runtime.distributed").add_arguments(p)
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help=".txt (plain text, used as passages of >= 80 words; with --self-distill they become "
                        "prompts) or .jsonl chats ({'messages': [...]} or {'turns': [...]})")
    p.add_argument("--self-distill", action="store_true",
                   help="train on the model's own greedy answers to the data's prompts (cached in --out)")
    p.add_argument("--answer-tokens", type=int, default=256, help="answer length limit for --self-distill")
    p.add_argument("--max-examples", type=int, default=None,
                   help="use a seeded random subset of this many examples (passages, chats or prompts)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (linear warm-up, then linear decay)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    p.add_argument("--out", required=True, help="output directory: final PDM, report, checkpoints, answers")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-cache-gb", type=float, default=4.0,
                   help="keep the frozen target's outputs in memory when the data fits in this many GiB "
                        "(faster epochs after the first; 0 disables)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object on stdout")


def run(args) -> int:
    options = TrainOptions(
        data=args.data, out=args.out, stages=args.stages,
        stage_layers=args.stage_layers,
        anchors=args.anchors, tower_layers=args.tower_layers, draft_vocab=args.draft_vocab,
        self_distill=args.self_distill, answer_tokens=args.answer_tokens, max_examples=args.max_examples,
        seq_len=args.seq_len, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        val_fraction=args.val_fraction, checkpoint_every=args.checkpoint_every, resume=args.resume, seed=args.seed,
        target_cache_gb=args.target_cache_gb, cache=args.cache, fill_mix=args.fill_mix,
        expected_acceptance=args.expected_acceptance, normalize_anchors=args.normalize_anchors,
        max_rows=args.max_rows, bf16=args.bf16, micro_batch=args.micro_batch, init=args.init,
        feature_loss=args.feature_loss)
    options.check()  # before loading the model: a bad flag fails fast
    if args.distributed:
        from .runtime.data_parallel import run_data_parallel

        return run_data_parallel(args, "torchrun --standalone --nproc-per-node 8 -m spd_engine train-pdm "
                                       "--distributed --cache DIR ...", lambda replicas: _train_and_print(
                                           args, options, replicas))
    return _train_and_print(args, options, SINGLE)


def _train_and_print(args, options: TrainOptions, replicas: Replicas) -> int:
    from .engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    report = train_pdm(engine, options, progress=replicas.writer, replicas=replicas)
    if not replicas.writer:
        return 0
    if args.json:
        print(json.dumps(report))
        return 0
    if options.cache:
        val = report["val"] or {}
        fills = " ".join(f"f{f}={a:.3f}" for f, a in val.get("acceptance_by_fill", {}).items())
        print(f"trained {report['steps']} steps in {report['train_seconds']:.0f}s "
              f"({report['train_tokens_per_s']:.0f} answer tokens/s): train top-1 {report['train_top1']:.3f}; "
              f"held-out acceptance by fill: {fills}; PDM saved in {report['out']}")
        return 0
    val = report["val"]
    print(f"trained {report['steps']} steps in {report['train_seconds']:.0f}s: train loss {report['train_loss']:.3f}, "
          f"top-1 {report['train_top1']:.3f}")
    if val is not None:
        print(f"validation: top-1 {val['top1']:.3f} | simulated acceptance {val['simulated_acceptance']:.3f} | "
              f"simulated accept length {val['simulated_accept_length']:.2f} (n={report['stages']})")
        if "answers" in val:
            answers = val["answers"]
            print(f"  on answer tokens only: top-1 {answers['top1']:.3f} | simulated acceptance "
                  f"{answers['simulated_acceptance']:.3f} | simulated accept length "
                  f"{answers['simulated_accept_length']:.2f}")
    print(f"PDM ({report['pdm_parameters'] / 1e6:.2f}M parameters) saved in {report['out']}; "
          f"use --pdm {report['out']}")
    return 0
