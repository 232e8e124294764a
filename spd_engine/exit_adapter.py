"""The exit adapter of PPSD (:mod:`spd_engine.modes.ppsd`): a small residual low-rank map applied to the
early-exit hidden state (after layer E) before the target's own frozen final norm and LM head, trained so the
exit's logits match the last layer's.

    adapted = h + up(down(h))        down: H -> r, up: r -> H (up = 0: the plain early exit)

Saved as ``exit_adapter.json`` (the target it was trained for, the exit layer, the rank) beside
``exit_adapter.safetensors``; loading checks both against the model and the asked-for exit layer.

Training (``spd-engine train-exit-adapter --cache DIR --exit-layer E --out DIR``) reads a ``build-data`` feature
cache that holds hidden-state index E and the last layer's output, answer rows only; no target layer runs:

1. least squares: the ridge solution of h_L − h_E ≈ W h_E over the training rows, truncated to rank r by SVD
   (a closed form, seconds), as the start;
2. distillation: ``--steps`` Adam steps on KL(teacher ‖ exit) over the whole vocabulary, the teacher being the
   cached last-layer output through the frozen final norm and head (as ``train.CacheDistiller``'s).

It reports the held-out top-1 agreement of the exit head with the teacher with and without the adapter: the
predicted greedy PPSD acceptance (``modes.ppsd.exit_traces`` measures it on real prompts).
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError
from .model import check_shape
from .pdm import target_identity
from .weights import read_safetensors

CONFIG_FILE = "exit_adapter.json"
WEIGHTS_FILE = "exit_adapter.safetensors"
DEFAULT_RANK = 128


def check_exit_layer(num_layers: int, exit_layer: int) -> None:
    """An early exit needs at least one layer before it and one after it."""
    if not 1 <= exit_layer <= num_layers - 1:
        raise UserError(f"--exit-layer must be in [1, {num_layers - 1}] for this {num_layers}-layer model, "
                        f"got {exit_layer}")


@dataclass
class ExitAdapterConfig:
    target: dict  # pdm.target_identity of the model it was trained for
    exit_layer: int
    rank: int


class ExitAdapter:
    def __init__(self, config: ExitAdapterConfig, down: torch.Tensor, up: torch.Tensor):
        self.config = config
        self.down = down  # (r, H)
        self.up = up  # (H, r)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, H) -> the adapted hidden state, same shape and dtype. A loaded adapter is in the target's dtype
        (the casts are no-ops); one in training keeps float32 weights."""
        down, up = self.down.to(hidden.dtype), self.up.to(hidden.dtype)
        return hidden + F.linear(F.linear(hidden, down), up)

    @classmethod
    def load(cls, path: str | Path, target, exit_layer: int | None) -> "ExitAdapter":
        """Load for ``target``; ``exit_layer`` (None: the adapter's own) must be the one it was trained at."""
        path = Path(path)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_file.is_file() or not weights_file.is_file():
            raise UserError(f"--exit-adapter '{path}' is not an exit adapter directory (it needs {CONFIG_FILE} and "
                            f"{WEIGHTS_FILE}; train one with `spd-engine train-exit-adapter`)")
        try:
            config = ExitAdapterConfig(**json.loads(config_file.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"'{config_file}' is not a valid exit adapter config ({exc})") from exc
        identity = target_identity(target.config)
        if config.target != identity:
            differs = next(k for k in identity if config.target.get(k) != identity[k])
            raise UserError(f"--exit-adapter '{path}' was trained for a model with {differs}="
                            f"{config.target.get(differs)}, this model has {identity[differs]}")
        if exit_layer is not None and exit_layer != config.exit_layer:
            raise UserError(f"--exit-adapter '{path}' was trained at exit layer {config.exit_layer}, not "
                            f"--exit-layer {exit_layer}; drop --exit-layer or train one for layer {exit_layer}")
        tensors = read_safetensors(weights_file)
        H = target.config.hidden_size
        try:
            down = check_shape("down", tensors["down"], (config.rank, H))
            up = check_shape("up", tensors["up"], (H, config.rank))
        except KeyError as exc:
            raise UserError(f"'{weights_file}' lacks tensor {exc}") from exc
        return cls(config, down.to(target.device, target.dtype), up.to(target.device, target.dtype))

    def save(self, path: str | Path) -> Path:
        """Both files written under temporary names, then renamed (a reader never sees half an adapter)."""
        from safetensors.torch import save_file

        from .jsonl import write_atomic, write_text_atomic

        path = Path(path)
        tensors = {"down": self.down.detach().float().cpu().contiguous(),
                   "up": self.up.detach().float().cpu().contiguous()}
        write_atomic(path / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        write_text_atomic(path / CONFIG_FILE, json.dumps(asdict(self.config), indent=2) + "\n")
        return path


# ---------------------------------------------------------------------------------------------- training
def answer_rows(cache, indices: list[int], exit_column: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exit hidden states, last-layer outputs), (N, H) float32 each, of the answer rows of ``indices``' sequences,
    at most ``max_rows`` of them."""
    exits, lasts, count = [], [], 0
    for index in indices:
        batch = cache.batch([index], max_rows=cache.sequences[index].rows)
        scored = batch.scored[0]
        exits.append(batch.anchors[0, scored, exit_column])
        lasts.append(batch.last_hidden[0, scored])
        count += int(scored.sum())
        if count >= max_rows:
            break
    return torch.cat(exits)[:max_rows], torch.cat(lasts)[:max_rows]


def least_squares_start(exits: torch.Tensor, lasts: torch.Tensor, rank: int, ridge: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of the rank-``rank`` truncation of the ridge solution W of lasts − exits ≈ exits Wᵀ."""
    x, residual = exits.double(), (lasts - exits).double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, x.T @ residual).T  # (H, H): adapted = h + W h
    u, s, vh = torch.linalg.svd(weight)
    return vh[:rank].float(), (u[:, :rank] * s[:rank]).float()


def top1_agreement(target, adapter: ExitAdapter | None, exits: torch.Tensor, lasts: torch.Tensor,
                   batch_rows: int = 512) -> float:
    """How often the exit head's argmax equals the teacher's, over these rows."""
    hits = 0
    with torch.no_grad():
        for start in range(0, len(exits), batch_rows):
            hidden = exits[start: start + batch_rows].to(target.dtype)
            if adapter is not None:
                hidden = adapter(hidden)
            teacher = target.logits(lasts[start: start + batch_rows].to(target.dtype))
            hits += int((target.logits(hidden).argmax(-1) == teacher.argmax(-1)).sum())
    return hits / max(len(exits), 1)


def train_exit_adapter(engine, cache_dir: str, exit_layer: int, out: str, rank: int | None = None, steps: int = 100,
                       batch_rows: int = 256, lr: float = 1e-3, ridge: float = 1e-3, max_rows: int = 40000,
                       val_rows: int = 4000, seed: int = 0, progress: bool = True) -> dict:
    """Least squares, then distillation (see the module docstring); saves the adapter to ``out`` and returns the
    report (also written there as ``train_report.json``). ``rank`` defaults to min(128, H)."""
    from tqdm import tqdm

    from .feature_cache import FeatureCache
    from .jsonl import write_text_atomic

    target = engine.model
    L, H = target.config.num_layers, target.config.hidden_size
    rank = min(DEFAULT_RANK, H) if rank is None else rank
    check_exit_layer(L, exit_layer)
    if not 1 <= rank <= H:
        raise UserError(f"--rank must be in [1, {H}] (the hidden size), got {rank}")
    if steps < 0:
        raise UserError(f"--steps must be >= 0 (0: the least-squares start alone), got {steps}")
    for name, value in (("--batch-rows", batch_rows), ("--max-rows", max_rows), ("--val-rows", val_rows)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    try:
        cache = FeatureCache(cache_dir, target.config, [exit_layer])
    except UserError as exc:
        if "not the anchors" not in str(exc):
            raise
        raise UserError(f"the feature cache '{cache_dir}' does not hold hidden-state index {exit_layer}; pick "
                        f"--exit-layer among its layers or rebuild it with --feature-layers") from None
    order = list(range(len(cache)))
    random.Random(seed).shuffle(order)
    held_out = max(1, len(order) // 20)
    val_exits, val_lasts = answer_rows(cache, order[:held_out], 0, val_rows)
    exits, lasts = answer_rows(cache, order[held_out:], 0, max_rows)
    down, up = least_squares_start(exits, lasts, rank, ridge)
    adapter = ExitAdapter(ExitAdapterConfig(target_identity(target.config), exit_layer, rank),
                          down.to(target.device), up.to(target.device))
    report = {"exit_layer": exit_layer, "rank": rank, "train_rows": len(exits), "val_rows": len(val_exits),
              "val_agreement_plain_exit": top1_agreement(target, None, val_exits, val_lasts),
              "val_agreement_least_squares": top1_agreement(target, adapter, val_exits, val_lasts)}
    adapter.down.requires_grad_(True)
    adapter.up.requires_grad_(True)
    optimizer = torch.optim.Adam([adapter.down, adapter.up], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc="train-exit-adapter", unit="step", disable=not progress, file=sys.stderr):
        rows = torch.randint(len(exits), (batch_rows,), generator=generator)
        with torch.no_grad():
            teacher = F.log_softmax(target.logits(lasts[rows].to(target.dtype)).float(), -1)
        student = F.log_softmax(target.logits(adapter(exits[rows].to(target.dtype))).float(), -1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_value = float(loss.detach())
    adapter.down.requires_grad_(False)
    adapter.up.requires_grad_(False)
    report.update(steps=steps, final_kl=loss_value,
                  val_agreement_adapter=top1_agreement(target, adapter, val_exits, val_lasts))
    adapter.save(out)
    write_text_atomic(Path(out) / "train_report.json", json.dumps(report, indent=1) + "\n")
    return report


def add_arguments(p) -> None:
    from .cli import _add_model_args

    _add_model_args(p)
    p.add_argument("--cache", required=True, metavar="DIR", help="a build-data feature cache holding index E")
    p.add_argument("--exit-layer", type=int, required=True, help="layers before the early exit (1..L-1)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the adapter is written")
    p.add_argument("--rank", type=int, default=None,
                   help=f"rank r of the residual map (default: min({DEFAULT_RANK}, H))")
    p.add_argument("--steps", type=int, default=100, help="distillation steps after the least-squares start")
    p.add_argument("--batch-rows", type=int, default=256, help="cached rows per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ridge", type=float, default=1e-3, help="least-squares ridge, relative to the mean variance")
    p.add_argument("--max-rows", type=int, default=40000, help="training rows read from the cache")
    p.add_argument("--val-rows", type=int, default=4000, help="held-out rows for the agreement report")
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from .engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    report = train_exit_adapter(engine, args.cache, args.exit_layer, args.out, rank=args.rank, steps=args.steps,
                                batch_rows=args.batch_rows, lr=args.lr, ridge=args.ridge, max_rows=args.max_rows,
                                val_rows=args.val_rows, seed=args.seed)
    print(json.dumps(report))
    return 0
