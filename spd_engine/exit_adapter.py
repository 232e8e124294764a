"""The exit adapter: a small residual low-rank map applied to the early-exit hidden state (after layer E) before
the target's own frozen final norm and LM head, trained so the exit's logits match the last layer's.

    adapted = h + up(down(h))        down: H -> r, up: r -> H (zero at initialisation: the plain early exit)

Saved as ``exit_adapter.json`` (the target it was trained for, the exit layer, the rank) beside
``exit_adapter.safetensors``; loading checks both against the model and the asked-for exit layer.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UserError
from .model import check_shape
from .pdm import target_identity
from .weights import read_safetensors

CONFIG_FILE = "exit_adapter.json"
WEIGHTS_FILE = "exit_adapter.safetensors"


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

    @classmethod
    def create(cls, target, exit_layer: int, rank: int, seed: int = 0) -> "ExitAdapter":
        """Untrained: ``up`` is zero, so the adapter starts as the identity (the plain early exit)."""
        H = target.config.hidden_size
        generator = torch.Generator().manual_seed(seed)
        down = (torch.randn(rank, H, generator=generator) / H ** 0.5).to(target.device)
        up = torch.zeros(H, rank, device=target.device)
        return cls(ExitAdapterConfig(target_identity(target.config), exit_layer, rank), down, up)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, H) in the target's dtype -> the adapted hidden state, same shape and dtype."""
        down, up = self.down.to(hidden.dtype), self.up.to(hidden.dtype)
        return hidden + torch.nn.functional.linear(torch.nn.functional.linear(hidden, down), up)

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
        return cls(config, down.float().to(target.device), up.float().to(target.device))

    def save(self, path: str | Path) -> Path:
        """Both files written under temporary names, then renamed (a reader never sees half an adapter)."""
        from safetensors.torch import save_file

        from .jsonl import write_text_atomic

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{WEIGHTS_FILE}.tmp"
        save_file({"down": self.down.detach().float().cpu().contiguous(),
                   "up": self.up.detach().float().cpu().contiguous()}, str(tmp))
        tmp.replace(path / WEIGHTS_FILE)
        write_text_atomic(path / CONFIG_FILE, json.dumps(asdict(self.config), indent=2) + "\n")
        return path
