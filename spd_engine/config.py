"""Model configuration read from a Hugging Face ``config.json``."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2/2.5: biases on the q/k/v projections
    qk_norm: bool  # Qwen3: per-head RMSNorm on q and k before rotary
    rope_scaling: dict | None = None
    torch_dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = ""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict, name: str = "") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"unsupported model_type '{model_type}'; supported: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama 2/3/3.1/3.2, Qwen2/2.5, Qwen3)")
        # transformers >= 5 nests rope settings under rope_parameters; older configs keep them at top level.
        rope = dict(raw.get("rope_parameters") or {})
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        rope_theta = float(raw.get("rope_theta", rope.get("rope_theta", 10000.0)))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise UserError(f"unsupported rope scaling '{kind}'; supported: llama3")
            scaling = None if kind in ("default", None) else dict(scaling, rope_type=kind)
            if scaling is not None:
                for key in LLAMA3_ROPE_KEYS:
                    float(scaling[key])  # present and numeric, or the error names the field
        sizes = {key: int(raw[key]) for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "vocab_size")}
        sizes["num_key_value_heads"] = int(raw.get("num_key_value_heads") or sizes["num_attention_heads"])
        for key, value in sizes.items():
            if value < 1:
                raise UserError(f"'{key}' must be >= 1, got {value}")
        heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
        if heads % sizes["num_key_value_heads"]:
            raise UserError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                            f"({sizes['num_key_value_heads']})")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=sizes["intermediate_size"],
            num_layers=sizes["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=sizes["num_key_value_heads"],
            head_dim=int(raw.get("head_dim") or hidden // heads),
            vocab_size=sizes["vocab_size"],
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", model_type != "qwen2")),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            rope_scaling=scaling,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            eos_token_ids=eos_ids,
            name=name,
        )

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise UserError(f"no config.json in '{path}'")
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as exc:  # bad JSON or bad UTF-8
            raise UserError(f"config.json in '{path}' is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise UserError(f"config.json in '{path}' must hold a JSON object")
        try:
            return cls.from_dict(raw, name=Path(path).name)
        except KeyError as exc:
            raise UserError(f"config.json in '{path}' lacks the field {exc}") from exc
        except UserError as exc:
            raise UserError(f"config.json in '{path}': {exc}") from exc
        except (TypeError, ValueError, AttributeError) as exc:  # a field of the wrong type: int("x"), int(None)
            raise UserError(f"config.json in '{path}' has a field of the wrong type: {exc}") from exc

    def inverse_frequencies(self) -> torch.Tensor:
        """Rotary inverse frequencies (D/2,) in float32, with Llama 3 frequency scaling when configured."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if not self.rope_scaling:
            return inv_freq
        s = self.rope_scaling
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        original = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, smoothed, scaled)
