"""The Python API: load a model once, then generate in vanilla or SPD mode.

    from spd_engine import Engine
    engine = Engine.load("default")
    result = engine.generate("Name three rivers.", chat=True, max_new_tokens=64, mode="spd", stages=4)
    print(result.text, result.stats)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import DTYPES
from .decode import GenerationResult, generate_vanilla
from .errors import UserError
from .model import Model
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, Tokenizer
from .weights import resolve_model_path

MODES = ("vanilla", "spd")


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """Default: float32 on the CPU (bf16 matmuls are slow there), bfloat16 on a GPU."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    return DTYPES[dtype]


@dataclass
class Output(GenerationResult):
    text: str = ""


class Engine:
    def __init__(self, model: Model, tokenizer: Tokenizer, model_dir: Path, model_spec: str = ""):
        if tokenizer.max_token_id >= model.config.vocab_size:  # its ids would index past the embedding table
            raise UserError(f"the tokenizer in '{model_dir}' has token ids up to {tokenizer.max_token_id}, but the "
                            f"model embeds only {model.config.vocab_size}: tokenizer.json is not this model's")
        self.model = model
        self.tokenizer = tokenizer
        self.model_dir = model_dir
        self.model_spec = model_spec or str(model_dir)

    @classmethod
    def load(cls, model: str = "default", device: str | None = None, dtype: str | None = None,
             backend: str = "auto") -> "Engine":
        from . import ops

        torch_device = pick_device(device)
        reason = ops.usable_reason(backend, torch_device)
        if reason:
            raise UserError(reason)
        model_dir = resolve_model_path(model)
        loaded = Model.from_pretrained(model_dir, dtype=pick_dtype(dtype, torch_device), device=torch_device,
                                       backend=backend)
        return cls(loaded, Tokenizer(model_dir), model_dir, model_spec=model)

    @property
    def eos_ids(self) -> set[int]:
        ids = set(self.model.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def encode_prompt(self, prompt: str, chat: bool = False) -> list[int]:
        ids = self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        if not ids:
            raise UserError("the prompt is empty after tokenization")
        return ids

    def check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        limit = self.model.config.max_position_embeddings
        if prompt_len + max_new_tokens > limit:
            raise UserError(f"prompt ({prompt_len} tokens) + --max-new-tokens ({max_new_tokens}) exceeds the "
                            f"model's context of {limit} tokens")

    def generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None, chat: bool = False,
                 max_new_tokens: int = 128, mode: str = "vanilla", stages: int | None = None,
                 stage_layers: list[int] | None = None, pdm=None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False,
                 stream: Callable[[str], None] | None = None, graph: str = "auto") -> Output:
        """Generate up to ``max_new_tokens``; stops at the model's end-of-turn/EOS (kept in the output) unless
        ``ignore_eos`` (benchmarks want a fixed token count). ``graph`` (auto | on | off): CUDA graphs, see
        :mod:`spd_engine.runtime.graph`."""
        if mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
        if mode == "vanilla" and (pdm is not None or stages is not None or stage_layers):
            raise UserError("--pdm, --stages and --stage-layers apply to --mode spd only; add --mode spd, or drop "
                            "them for plain decoding")
        params = SamplingParams(temperature, top_k, top_p, seed)
        if prompt_ids is None:
            if prompt is None:
                raise UserError("give a prompt")
            prompt_ids = self.encode_prompt(prompt, chat)
        self.check_length(len(prompt_ids), max_new_tokens)
        streamer = StreamDecoder(self.tokenizer) if stream else None
        on_tokens = (lambda ids: stream(streamer.push(ids))) if stream else None
        eos_ids = set() if ignore_eos else self.eos_ids
        if mode == "vanilla":
            result = generate_vanilla(self.model, prompt_ids, max_new_tokens, params, eos_ids, on_tokens,
                                      graph=graph)
        else:
            from .spd import generate_spd, resolve_pdm

            draft = resolve_pdm(self, pdm, stages=stages, stage_layers=stage_layers)
            result = generate_spd(self.model, draft, prompt_ids, max_new_tokens, params, eos_ids, on_tokens,
                                  graph=graph)
        # token_ids keep the end-of-turn token; the text is what a reader sees, without special tokens.
        return Output(result.prompt_ids, result.token_ids, result.stats, result.trace,
                      text=self.tokenizer.decode(result.token_ids, skip_special_tokens=True))
