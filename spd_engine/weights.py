"""Loading weights: Hugging Face safetensors directories (single or sharded) and GGUF files."""
from __future__ import annotations

import hashlib
import json
import os
import re
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
        except (ValueError, KeyError, TypeError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise UserError(f"bad shard index '{index}': {exc}") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise UserError(f"bad shard index '{index}': 'weight_map' must map tensor names to file names")
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise UserError(f"no model.safetensors or model.safetensors.index.json in '{model_dir}'")


def read_safetensors(path: Path, keep: Callable[[str], bool] | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file (those whose name passes ``keep``), each cast to ``dtype`` as it is
    read when one is given. A missing, corrupt or truncated file is a UserError, and so is integer data asked
    for as floats (quantised or garbage weights): every safetensors read in the engine goes through here."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"missing safetensors file '{path}'")
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if keep is not None and not keep(key):
                    continue
                tensor = handle.get_tensor(key)
                if dtype is not None and dtype.is_floating_point and not tensor.is_floating_point():
                    raise UserError(f"tensor '{key}' in '{path}' has dtype {str(tensor.dtype).removeprefix('torch.')}"
                                    "; weights must be floating point (quantised checkpoints are not supported)")
                tensors[key] = tensor if dtype is None else tensor.to(dtype)
    except (SafetensorError, OSError, RuntimeError, TypeError) as exc:
        raise UserError(f"corrupt or truncated safetensors file '{path}': {exc}") from exc
    return tensors


def load_state_dict(model_dir: Path, dtype: torch.dtype,
                    keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a HF checkpoint (or those whose name passes ``keep``), cast to ``dtype``. Tensors left
    out are never read."""
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensor_files(model_dir):
        tensors.update(read_safetensors(file, keep, dtype))
    return tensors


# A Hugging Face Hub model id, "ORG/NAME": one slash, no leading dot or slash (those are paths).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_cache_dir() -> Path:
    """Where huggingface_hub stores downloads: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def resolve_hub_id(repo_id: str) -> Path:
    """A Hub model id -> its snapshot in the local Hugging Face cache (the one ``refs/main`` names, else the
    newest with a config.json). Nothing is downloaded: without a cached copy this is a UserError saying where
    it looked."""
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    candidates = [snapshots / ref.read_text().strip()] if ref.is_file() else []
    if snapshots.is_dir():
        candidates += sorted(snapshots.iterdir(), key=lambda snapshot: snapshot.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / "config.json").is_file():
            return snapshot
    raise UserError(f"model '{repo_id}' is neither a local path nor in the Hugging Face cache (looked in {repo}); "
                    f"download it with `huggingface-cli download {repo_id}`, or give a directory or a .gguf file")


def resolve_model_path(spec: str) -> Path:
    """``default`` | a HF directory | a ``.gguf`` file (converted once into the cache) | a Hub id found in the
    local Hugging Face cache -> a HF directory."""
    from . import gguf_convert

    if spec == "default":
        return gguf_convert.default_model_dir()
    path = Path(spec).expanduser()
    if not path.exists():
        if _HUB_ID.fullmatch(spec):
            return resolve_hub_id(spec)
        raise UserError(f"model path '{spec}' does not exist (give 'default', a Hugging Face directory, a .gguf "
                        "file or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct)")
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
