"""The pipeline draft module (PDM): anchors, multi-depth aggregation, a small decoder tower, a draft head.

Data layout shared with the SPD cycle and the ``aggregate_features`` kernels:

* ``anchors``  (slots, m, H): anchors[s, j] is hidden state index ``b_j`` (0 = embedding, j>0 = output of
  layer b_j - 1) of the token held in slot s. Stages write them in place as a token passes.
* ``agg_weight`` (H, H*m*(m+1)/2): W_0 | W_1 | ... side by side, W_i: (i+1)H -> H, no bias.

A token at depth d has passed ``layers(d)`` layers and uses type ``i(d)``, the largest i with
b_i <= layers(d). The tower is a :class:`Model` of L_s decoder layers with the target's architecture,
sharing the target's embedding and frozen final norm; its head is the draft-vocabulary head.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import ops
from .config import ModelConfig
from .errors import UserError
from .jsonl import write_atomic
from .model import LayerWeights, Model, check_shape
from .ops.reference import rotate_half_at
from .weights import read_safetensors

CONFIG_FILE = "pdm_config.json"
WEIGHTS_FILE = "pdm.safetensors"


def auto_anchors(num_layers: int, stages: int) -> list[int]:
    """The reference rule: sorted({0, lps, 3*lps, 6*lps, L-1}) clipped to [0, L], lps = layers per stage."""
    lps = max(1, num_layers // stages)
    return sorted({min(max(a, 0), num_layers) for a in (0, lps, 3 * lps, 6 * lps, num_layers - 1)})


def target_identity(cfg: ModelConfig) -> dict:
    return {"name": cfg.name, "model_type": cfg.model_type, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size}


@dataclass
class PDMConfig:
    target: dict
    stage_bounds: list[list[int]]
    anchors: list[int]
    tower_layers: int
    draft_vocab_size: int

    @property
    def stages(self) -> int:
        return len(self.stage_bounds)

    def layers_at_depth(self, depth: int) -> int:
        return 0 if depth == 0 else self.stage_bounds[depth - 1][1]

    def type_at_depth(self, depth: int) -> int:
        done = self.layers_at_depth(depth)
        return max(i for i, b in enumerate(self.anchors) if b <= done)


def _tower_config(target: ModelConfig, tower_layers: int) -> ModelConfig:
    from dataclasses import replace

    return replace(target, num_layers=tower_layers, name=f"{target.name}-pdm-tower")


class PDM:
    def __init__(self, config: PDMConfig, target: Model, agg_weight: torch.Tensor, tower_layers: list[LayerWeights],
                 head: torch.Tensor, draft_vocab: torch.Tensor):
        self.config = config
        self.target = target
        self.agg_weight = agg_weight
        self.draft_vocab = draft_vocab  # (K,) int64: target id of each draft-head row
        self.tower = Model(_tower_config(target.config, config.tower_layers), target.embed_weight, tower_layers,
                           target.norm_weight, head, backend=target.backend)
        self.depth_types = [config.type_at_depth(d) for d in range(config.stages + 1)]

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, target: Model, stage_bounds: list[tuple[int, int]], anchors: list[int] | str = "auto",
               tower_layers: int = 1, draft_vocab: torch.Tensor | None = None, seed: int = 0) -> "PDM":
        """A fresh PDM: W_i ~ N(0, 0.02); tower layers copied from the target's last L_s layers (a warm
        start with the right architecture and scale); head rows copied from the target's LM head."""
        cfg = target.config
        L, H = cfg.num_layers, cfg.hidden_size
        anchors = auto_anchors(L, len(stage_bounds)) if anchors == "auto" else sorted(set(int(a) for a in anchors))
        if anchors[0] != 0 or anchors[-1] > L:
            raise UserError(f"anchors must start at 0 and stay within [0, {L}], got {anchors}")
        if not 1 <= tower_layers <= L:
            raise UserError(f"tower layers must be in [1, {L}], got {tower_layers}")
        if draft_vocab is None:
            draft_vocab = torch.arange(cfg.vocab_size)
        draft_vocab = draft_vocab.to(torch.long).to(target.device)
        m = len(anchors)
        gen = torch.Generator().manual_seed(seed)
        agg = (torch.randn(H, H * m * (m + 1) // 2, generator=gen) * 0.02).to(target.dtype).to(target.device)
        tower = [LayerWeights(**{k: None if v is None else v.clone() for k, v in vars(layer).items()})
                 for layer in target.layers[L - tower_layers:]]
        head = target.lm_head_weight[draft_vocab].clone()
        config = PDMConfig(target_identity(cfg), [list(b) for b in stage_bounds], anchors, tower_layers,
                           int(draft_vocab.numel()))
        return cls(config, target, agg, tower, head, draft_vocab)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"agg_weight": self.agg_weight, "draft_head": self.tower.lm_head_weight, "draft_vocab": self.draft_vocab}
        for i, layer in enumerate(self.tower.layers):
            for name, value in vars(layer).items():
                if value is not None:
                    sd[f"tower.{i}.{name}"] = value
        return sd

    def trainable(self) -> list[torch.Tensor]:
        return [t for k, t in self.state_dict().items() if k != "draft_vocab"]

    def save(self, out_dir: str | Path) -> Path:
        """Atomic: weights and config land under a temporary name, then both are renamed into place."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        for name, writer in ((WEIGHTS_FILE, lambda p: save_file(sd, str(p))),
                             (CONFIG_FILE, lambda p: p.write_text(json.dumps(asdict(self.config), indent=1)))):
            for stale in out_dir.glob(f".{name}.*.tmp"):  # left by a save that was killed: never read, only space
                stale.unlink(missing_ok=True)
            write_atomic(out_dir / name, writer)
        return out_dir

    @classmethod
    def load(cls, path: str | Path, target: Model, stage_bounds: list[tuple[int, int]] | None = None) -> "PDM":
        """A saved PDM; a missing, corrupt or mismatched checkpoint is a UserError naming what is wrong."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise UserError(f"'{path}' is not a PDM checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        config = read_config(path / CONFIG_FILE)
        check_compatible(config, target.config, stage_bounds)
        sd = read_weights(path / WEIGHTS_FILE, config, target.config)
        sd = {k: v.to(target.device) for k, v in sd.items()}
        fields = LayerWeights.shapes(target.config)
        tower = [LayerWeights(**{f: None if shape is None else sd[f"tower.{i}.{f}"].to(target.dtype)
                                 for f, shape in fields.items()}) for i in range(config.tower_layers)]
        return cls(config, target, sd["agg_weight"].to(target.dtype), tower, sd["draft_head"].to(target.dtype),
                   sd["draft_vocab"].long())

    # ------------------------------------------------------------------ inference pieces
    def aggregate(self, anchors: torch.Tensor, row_slots: torch.Tensor, row_types: torch.Tensor) -> torch.Tensor:
        return ops.aggregate_features(anchors, self.agg_weight, row_slots, row_types, backend=self.target.backend)

    def draft_logits(self, tower_out: torch.Tensor) -> torch.Tensor:
        """Tower output rows -> logits over the draft vocabulary (target's frozen norm, then the draft head)."""
        return self.tower.logits(tower_out)

    # ------------------------------------------------------------------ training pieces
    def masked_tower(self, features: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                     outputs: int | None = None) -> torch.Tensor:
        """The tower over (B, R, H) rows at ``positions`` (R,) with an explicit (R, R) boolean attention mask
        (True = visible): the staircase used in training. No cache. With ``outputs``, only the first
        ``outputs`` rows are returned, and the last layer computes nothing else (the other rows are its keys)."""
        cfg = self.tower.config
        cos_table, sin_table = self.tower.rope_tables(int(positions.max()) + 1)
        cos, sin = cos_table[positions][None], sin_table[positions][None]
        group = cfg.num_heads // cfg.num_kv_heads

        def attend(q, k, v, queries=None):
            q, k = rotate_half_at(q, cos, sin), rotate_half_at(k, cos, sin)
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, :queries].transpose(1, 2), k.repeat_interleave(group, 2).transpose(1, 2),
                v.repeat_interleave(group, 2).transpose(1, 2), attn_mask=mask[:queries])
            return out.transpose(1, 2)

        hidden, residual = features, None
        for index, layer in enumerate(self.tower.layers):
            keep = outputs if index == len(self.tower.layers) - 1 else None
            hidden, residual = self.tower.decoder_layer(layer, hidden, residual, partial(attend, queries=keep),
                                                        keep=keep)
        return hidden + residual


def read_config(path: Path) -> PDMConfig:
    """``pdm_config.json``, with every field present and of the right type (else a UserError)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise UserError(f"'{path}' is not valid JSON: {exc}") from exc
    fields = PDMConfig.__dataclass_fields__
    if not isinstance(raw, dict) or set(raw) != set(fields):
        raise UserError(f"'{path}' must be an object with exactly the fields {', '.join(fields)}")

    def ints(value) -> bool:
        return isinstance(value, list) and all(type(v) is int for v in value)

    well_typed = (isinstance(raw["target"], dict) and ints(raw["anchors"]) and raw["anchors"]
                  and isinstance(raw["stage_bounds"], list) and raw["stage_bounds"]
                  and all(ints(b) and len(b) == 2 for b in raw["stage_bounds"])
                  and type(raw["tower_layers"]) is int and raw["tower_layers"] >= 1
                  and type(raw["draft_vocab_size"]) is int and raw["draft_vocab_size"] >= 1)
    if not well_typed:
        raise UserError(f"'{path}' has a field of the wrong type (target: object, stage_bounds: [[start, end], ...], "
                        "anchors: [int, ...], tower_layers and draft_vocab_size: positive ints)")
    bounds = raw["stage_bounds"]
    if bounds[0][0] != 0 or any(a >= b for a, b in bounds) or any(x[1] != y[0] for x, y in zip(bounds, bounds[1:])):
        raise UserError(f"'{path}': stage_bounds {bounds} are not contiguous layer ranges from 0")
    anchors = raw["anchors"]
    if anchors[0] != 0 or any(a >= b for a, b in zip(anchors, anchors[1:])) or anchors[-1] > bounds[-1][1]:
        raise UserError(f"'{path}': anchors {anchors} must rise from 0 to at most {bounds[-1][1]} layers")
    return PDMConfig(**raw)


def read_weights(path: Path, config: PDMConfig, target: ModelConfig) -> dict[str, torch.Tensor]:
    """``pdm.safetensors``, with every tensor ``config`` and the target need, in the right shape and kind."""
    sd = read_safetensors(path)
    H, m, K = target.hidden_size, len(config.anchors), config.draft_vocab_size
    shapes = {"agg_weight": (H, H * m * (m + 1) // 2), "draft_head": (K, H), "draft_vocab": (K,)}
    for i in range(config.tower_layers):
        shapes.update({f"tower.{i}.{f}": shape for f, shape in LayerWeights.shapes(target).items() if shape})
    for name, shape in shapes.items():
        if name not in sd:
            raise UserError(f"'{path}' lacks tensor '{name}'")
        check_shape(name, sd[name], shape)
        if sd[name].is_floating_point() == (name == "draft_vocab"):
            raise UserError(f"'{path}': tensor '{name}' must hold {'integers' if name == 'draft_vocab' else 'floats'}")
    vocab = sd["draft_vocab"]
    if vocab.min() < 0 or vocab.max() >= target.vocab_size:
        raise UserError(f"'{path}': draft_vocab holds ids outside the target's vocabulary [0, {target.vocab_size})")
    return sd


def check_compatible(config: PDMConfig, target: ModelConfig, stage_bounds: list[tuple[int, int]] | None) -> None:
    """Refuse a PDM trained for another model or another stage split, naming the first difference."""
    mine = config.target
    for key in ("hidden_size", "num_layers", "vocab_size", "model_type"):
        if mine.get(key) != getattr(target, key):
            raise UserError(f"PDM does not match the model: it was trained for {key}={mine.get(key)}, "
                            f"the model has {getattr(target, key)}")
    if stage_bounds is not None and [list(b) for b in stage_bounds] != config.stage_bounds:
        have = ",".join(str(b - a) for a, b in config.stage_bounds)
        want = ",".join(str(b - a) for a, b in stage_bounds)
        raise UserError(f"PDM was trained for stage layers {have}, but {want} was asked for; "
                        f"use --stage-layers {have} or train a PDM for this split")
