"""The Python API: load a model once, then generate in any decoding mode (:mod:`spd_engine.modes`).

    from spd_engine import Engine
    engine = Engine.load("default")
    result = engine.generate("Name three rivers.", chat=True, max_new_tokens=64, mode="spd", stages=4)
    print(result.text, result.stats.to_json())
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import DTYPES
from .errors import UserError
from .model import Model
from .modes import check_options, mode_class
from .modes.base import DecodingMode, GenerationResult, run_decoder
from .runtime.graph import readback_every, use_graphs
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, Tokenizer
from .weights import resolve_model_path


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
        self._modes: dict[tuple, DecodingMode] = {}

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

    def decoding_mode(self, name: str, **options) -> DecodingMode:
        """The mode ``name`` with ``options`` (None: not given; another mode's option is a one-line error),
        made once per engine and options, so its drafts load once however many prompts follow."""
        mode = mode_class(name)
        given = {keyword: value for keyword, value in options.items() if value is not None}
        check_options(mode, given)
        key = (name, tuple((keyword, tuple(value) if isinstance(value, list) else value)
                           for keyword, value in sorted(given.items())))
        if key not in self._modes:
            self._modes[key] = mode(self, **given)
        return self._modes[key]

    def generate(self, prompt: str | None = None, *, prompt_ids: list[int] | None = None, chat: bool = False,
                 max_new_tokens: int = 128, mode: str = "vanilla", temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False,
                 stream: Callable[[str], None] | None = None, graph: str = "auto", **mode_options) -> Output:
        """Generate up to ``max_new_tokens``; stops at the model's end-of-turn/EOS (kept in the output) unless
        ``ignore_eos`` (benchmarks want a fixed token count). ``mode_options`` are the mode's own (SPD:
        ``stages``, ``stage_layers``, ``pdm``). ``graph`` (auto | on | off): CUDA graphs, see
        :mod:`spd_engine.runtime.graph`; auto runs a mode whose cycle cannot be captured eagerly."""
        decoding = self.decoding_mode(mode, **mode_options)
        if graph == "on" and not decoding.capturable:
            raise UserError(f"--graph on: --mode {mode} has no capturable cycle; use --graph auto or off")
        graphed = use_graphs(graph, self.model.device) and decoding.capturable
        params = SamplingParams(temperature, top_k, top_p, seed)
        if prompt_ids is None:
            if prompt is None:
                raise UserError("give a prompt")
            prompt_ids = self.encode_prompt(prompt, chat)
        self.check_length(len(prompt_ids), max_new_tokens)
        streamer = StreamDecoder(self.tokenizer) if stream else None
        on_tokens = (lambda ids: stream(streamer.push(ids))) if stream else None
        eos_ids = set() if ignore_eos else self.eos_ids
        readback = readback_every(graphed)
        decoder = decoding.decoder(len(prompt_ids), max_new_tokens, params, readback)
        result = run_decoder(decoder, mode, prompt_ids, max_new_tokens, params, eos_ids, on_tokens, graphed=graphed,
                             readback=readback)
        # token_ids keep the end-of-turn token; the text is what a reader sees, without special tokens.
        return Output(result.prompt_ids, result.token_ids, result.stats, result.trace,
                      text=self.tokenizer.decode(result.token_ids, skip_special_tokens=True))
