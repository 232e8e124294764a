"""Loading weights: Hugging Face safetensors directories (single or sharded) and GGUF files."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from .errors import UserError


def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise UserError(f"bad shard index '{index}': {exc}") from exc
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"no model.safetensors or model.safetensors.index.json in '{model_dir}'")


def load_state_dict(model_dir: Path, dtype: torch.dtype,
                    keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a HF checkpoint (or those whose name passes ``keep``), cast to ``dtype``. Tensors left
    out are never read. Corrupt or truncated files are a UserError."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensor_files(model_dir):
        if not file.is_file():
            raise UserError(f"missing checkpoint shard '{file}'")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if keep is None or keep(key):
                        tensors[key] = handle.get_tensor(key).to(dtype)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise UserError(f"corrupt or truncated safetensors file '{file}': {exc}") from exc
    return tensors


def resolve_model_path(spec: str) -> Path:
    """``default`` | a HF directory | a ``.gguf`` file (converted once into the cache) -> a HF directory."""
    from . import gguf_convert

    if spec == "default":
        return gguf_convert.default_model_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"model path '{spec}' does not exist (give 'default', a Hugging Face directory or a .gguf file)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"'{spec}' is a file but not a .gguf file; give a model directory or a GGUF file")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        out = gguf_convert.cache_root() / f"gguf-{path.stem}-{key}"
        if not (out / "config.json").is_file():
            gguf_convert.convert_gguf(path, out)
        return out
    return path
