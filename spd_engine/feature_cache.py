"""Read a feature cache written by ``spd-engine build-data`` (:mod:`spd_engine.distill_data`), checking it first.

Each conversation is one sequence: its tokens (prompt, then answer) and its cached hidden states, one row per
fed token, memory-mapped from the shard's ``.npy`` (bfloat16 bits). Nothing is packed across conversations.
A batch is padded to its longest sequence; :meth:`FeatureCache.batch` returns, per position t, the anchors the
PDM reads, the last layer's output (the teacher's logits are recomputed from it through the frozen final norm
and head), the target's next token x[t+1] and whether that token belongs to the answer (the loss scores
answer tokens only).

Anything that does not match (another model, anchors that were not cached, a truncated or corrupt shard) is a
one-line :class:`UserError` that says how to fix it.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .distill_data import MANIFEST_FILE, load_manifest
from .errors import UserError


@dataclass
class Sequence:
    shard: int  # the shard's key in FeatureCache.features
    row_start: int  # first feature row of this sequence in its shard
    tokens: list[int]  # prompt + answer
    answer_start: int  # index of the first answer token in ``tokens``
    domain: str = ""  # the prompt's domain (prompt_gen), for per-domain measurements

    @property
    def rows(self) -> int:
        return len(self.tokens) - 1


@dataclass
class FeatureBatch:
    anchors: torch.Tensor  # (B, T, m, H) float32, zero past a sequence's end
    last_hidden: torch.Tensor  # (B, T, H) float32: the last layer's output (teacher = head(norm(.)))
    next_tokens: torch.Tensor  # (B, T) int64: x[t + 1]
    scored: torch.Tensor  # (B, T) bool: x[t + 1] is an answer token (and t is a real row)


class FeatureCache:
    """One or several build-data directories read as one set of conversations (in the order given), e.g. two
    prompt mixes trained on together. Every directory must be for this model and cache the same layers."""

    def __init__(self, roots: str | Path | list[str | Path], config: ModelConfig, anchors: list[int]):
        roots = [Path(r) for r in ([roots] if isinstance(roots, (str, Path)) else roots)]
        if not roots:
            raise UserError("no feature cache given: name at least one build-data directory")
        self.layers = None
        self.hidden = config.hidden_size
        # Keyed by the order a shard was opened in: shard indices repeat across directories.
        self.features: dict[int, np.ndarray] = {}
        self.sequences: list[Sequence] = []
        for root in roots:
            manifest = self._checked_manifest(root, config, anchors)
            layers = manifest["feature_layers"]
            if self.layers is not None and layers != self.layers:
                raise UserError(f"the feature caches cache different layers ({self.layers} in '{roots[0]}', "
                                f"{layers} in '{root}'); rebuild one with the other's --feature-layers")
            self.layers = layers
            for shard in manifest["shards"]:
                self._open_shard(root, shard)
        self.anchor_columns = [self.layers.index(a) for a in anchors]
        self.teacher_column = self.layers.index(config.num_layers)

    @staticmethod
    def _checked_manifest(root: Path, config: ModelConfig, anchors: list[int]) -> dict:
        """``root``'s manifest, read once, after checking it is for this model and caches ``anchors``."""
        manifest = load_manifest(root)
        if manifest is None:
            raise UserError(f"'{root}' has no {MANIFEST_FILE}: build it with `spd-engine build-data --out {root}`")
        model = manifest.get("model", {})
        for key in ("hidden_size", "num_layers", "vocab_size"):
            if model.get(key) != getattr(config, key):
                raise UserError(f"the feature cache '{root}' was built for a model with {key}={model.get(key)}, "
                                f"this model has {getattr(config, key)}")
        layers = manifest.get("feature_layers")
        if not layers:
            raise UserError(f"'{root}' holds token shards only; rebuild its features with the same "
                            "`spd-engine build-data` command without --no-features")
        missing = [a for a in anchors if a not in layers]
        if missing:
            raise UserError(f"the feature cache '{root}' has layers {layers}, not the anchors {missing}; "
                            "choose --anchors among them or rebuild with --feature-layers")
        return manifest

    def _open_shard(self, root: Path, shard: dict) -> None:
        if not isinstance(shard, dict) or not {"index", "file"} <= set(shard):
            raise UserError(f"'{root / MANIFEST_FILE}' lists a malformed shard entry; rerun build-data")
        index = shard["index"]
        text_path, feature_path = root / shard["file"], root / str(shard.get("features"))
        if not shard.get("features") or not feature_path.is_file():
            raise UserError(f"shard {index} of '{root}' has no features file; rerun the build-data command")
        try:
            with gzip.open(text_path, "rt") as handle:
                records = [json.loads(line) for line in handle]
            tokens = [r["prompt_ids"] + r["answer_ids"] for r in records]
            answer_starts = [len(r["prompt_ids"]) for r in records]
            domains = [str(r.get("domain", "")) for r in records]
        except (OSError, EOFError, zlib.error, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"shard '{text_path}' is unreadable ({type(exc).__name__}); rebuild it with build-data") \
                from None
        try:
            features = np.load(feature_path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise UserError(f"features '{feature_path}' are truncated or corrupt ({exc}); delete the shard's "
                            "entry from the manifest (or the file) and rerun build-data") from None
        rows = sum(len(t) - 1 for t in tokens)
        if features.dtype != np.uint16 or features.shape != (rows, len(self.layers), self.hidden):
            raise UserError(f"features '{feature_path}' have shape {features.shape} {features.dtype}, expected "
                            f"({rows}, {len(self.layers)}, {self.hidden}) uint16; rebuild the shard")
        key = len(self.features)
        self.features[key] = features
        start = 0
        for ids, answer_start, domain in zip(tokens, answer_starts, domains):
            if len(ids) >= 2:
                self.sequences.append(Sequence(key, start, ids, answer_start, domain))
            start += len(ids) - 1

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def answer_tokens(self) -> int:
        return sum(len(s.tokens) - s.answer_start for s in self.sequences)

    def rows(self, sequence: Sequence, max_rows: int) -> tuple[int, int]:
        """The window of a sequence's rows that training sees: the last ``max_rows`` (answers sit at the end)."""
        return max(0, sequence.rows - max_rows), sequence.rows

    def batch(self, indices: list[int], max_rows: int) -> FeatureBatch:
        picked = [self.sequences[i] for i in indices]
        windows = [self.rows(s, max_rows) for s in picked]
        T = max(end - start for start, end in windows)
        B, m, H = len(picked), len(self.anchor_columns), self.hidden
        anchors = torch.zeros(B, T, m, H)
        last = torch.zeros(B, T, H)
        next_tokens = torch.zeros(B, T, dtype=torch.long)
        scored = torch.zeros(B, T, dtype=torch.bool)
        for b, (seq, (start, end)) in enumerate(zip(picked, windows)):
            block = self.features[seq.shard][seq.row_start + start: seq.row_start + end]
            block = torch.from_numpy(np.array(block).view(np.int16)).view(torch.bfloat16)
            n = end - start
            anchors[b, :n] = block[:, self.anchor_columns].float()
            last[b, :n] = block[:, self.teacher_column].float()
            targets = torch.tensor(seq.tokens[start + 1: end + 1])
            next_tokens[b, :n] = targets
            scored[b, :n] = torch.arange(start + 1, end + 1) >= seq.answer_start
        return FeatureBatch(anchors, last, next_tokens, scored)

    def channel_rms(self, sample_rows: int = 20000, columns: list[int] | None = None) -> torch.Tensor:
        """(m, H) root-mean-square of every anchor channel (or of ``columns``) over the first ``sample_rows``
        cached rows: the fixed standardisation of normalised anchors (deterministic for a given cache)."""
        columns = self.anchor_columns if columns is None else columns
        total, count = torch.zeros(len(columns), self.hidden, dtype=torch.float64), 0
        for index in sorted(self.features):
            block = self.features[index][: sample_rows - count]
            block = torch.from_numpy(np.array(block).view(np.int16)).view(torch.bfloat16)
            total += block[:, columns].double().pow(2).sum(0)
            count += block.shape[0]
            if count >= sample_rows:
                break
        return (total / max(count, 1)).sqrt().clamp(min=1e-6).float()

    def deepest_rms(self, sample_rows: int = 20000) -> float:
        """Overall RMS of the last layer's output (all channels), over the same rows."""
        return float(self.channel_rms(sample_rows, [self.teacher_column]).pow(2).mean().sqrt())
