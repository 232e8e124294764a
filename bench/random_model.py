"""Random-weights models of real shapes, for timing without the real checkpoint (benchmarks only).

Decode speed depends on the shapes, not on the values, so a model with the real config and random weights
times like the real one. Shapes come from a Hugging Face ``config.json`` (the default model's config and
tokenizer files are enough for a same-shape SmolLM2) or from the configs embedded here:

    smollm2-135m   SmolLM2-135M-Instruct (the default model)    qwen2.5-0.5b  Qwen2.5-0.5B
    llama-3.2-1b   Llama-3.2-1B                                 llama-3-8b    Llama-3-8B
    tiny           4 small layers (head dim 64), for dry runs on a CPU

    python bench/random_model.py --config smollm2-135m --out /tmp/smollm2-random      # a HF directory
    python bench/random_model.py --config /path/to/config.json --tokenizer-from DIR --out DIR

:func:`random_model` builds the same thing straight on the device (no disk), which is how bench_decode.py times
the larger shapes. Values are N(0, 0.02) (norm weights 1), so activations stay finite in bf16.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

CONFIGS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000,
                         eos_token_id=128001),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=8192,
                       bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=True,
                         max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645),
    # head dim 64, so the Triton and CUDA attention kernels (not the reference) run on it
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=192, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=1, vocab_size=512, rope_theta=10000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=1,
                 eos_token_id=2),
}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def load_config(spec: str) -> dict:
    """An embedded config's name, a config.json file, or a directory holding one."""
    if spec in CONFIGS:
        raw = dict(CONFIGS[spec])
        raw["architectures"] = [_ARCHITECTURES[raw["model_type"]]]
        return raw
    path = Path(spec)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"random_model: error: '{spec}' is neither {', '.join(CONFIGS)} nor a config.json")
    return json.loads(path.read_text())


def random_state_dict(raw: dict, dtype: torch.dtype, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor a HF checkpoint of this config holds, with random values, created on ``device``."""
    from spd_engine.config import ModelConfig

    cfg = ModelConfig.from_dict(raw)
    generator = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=generator, device=device, dtype=torch.float32) * 0.02).to(dtype)

    def ones(size):
        return torch.ones(size, dtype=dtype, device=device)

    H, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    sd = {"model.embed_tokens.weight": normal(cfg.vocab_size, H), "model.norm.weight": ones(H)}
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = normal(cfg.vocab_size, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = ones(H)
        sd[p + "post_attention_layernorm.weight"] = ones(H)
        sd[p + "self_attn.q_proj.weight"] = normal(cfg.num_heads * D, H)
        sd[p + "self_attn.k_proj.weight"] = normal(cfg.num_kv_heads * D, H)
        sd[p + "self_attn.v_proj.weight"] = normal(cfg.num_kv_heads * D, H)
        sd[p + "self_attn.o_proj.weight"] = normal(H, cfg.num_heads * D)
        sd[p + "mlp.gate_proj.weight"] = normal(F, H)
        sd[p + "mlp.up_proj.weight"] = normal(F, H)
        sd[p + "mlp.down_proj.weight"] = normal(H, F)
        if cfg.attention_bias:
            for name, rows in (("q", cfg.num_heads * D), ("k", cfg.num_kv_heads * D), ("v", cfg.num_kv_heads * D)):
                sd[p + f"self_attn.{name}_proj.bias"] = normal(rows)
        if cfg.qk_norm:
            sd[p + "self_attn.q_norm.weight"] = ones(D)
            sd[p + "self_attn.k_norm.weight"] = ones(D)
    return sd


def random_model(spec: str, device, dtype: torch.dtype, backend: str = "auto", seed: int = 0):
    """A :class:`spd_engine.model.Model` of this shape with random weights, built on ``device``."""
    from spd_engine.config import ModelConfig
    from spd_engine.model import Model

    raw = load_config(spec)
    cfg = ModelConfig.from_dict(raw, name=f"random-{spec if spec in CONFIGS else Path(spec).stem}")
    return Model.from_state_dict(cfg, random_state_dict(raw, dtype, device, seed), device=device, backend=backend)


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level BPE without merges (256 byte tokens), for shapes whose real tokenizer is not at hand:
    prompts then tokenize to bytes, which is all a timing run needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {token: i for i, token in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))


def write_random_model(spec: str, out: Path, dtype: torch.dtype, tokenizer_from: Path | None = None) -> Path:
    """A Hugging Face directory of this shape with random weights (config, safetensors, tokenizer)."""
    from safetensors.torch import save_file

    raw = load_config(spec)
    out.mkdir(parents=True, exist_ok=True)
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=1))
    save_file({k: v.contiguous() for k, v in random_state_dict(raw, dtype, "cpu").items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    source = tokenizer_from or (Path(spec).parent if Path(spec).is_file() else Path(spec) if Path(spec).is_dir()
                                else None)
    if source is not None and (source / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    else:
        write_byte_tokenizer(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help=f"{' | '.join(CONFIGS)} | config.json | model directory")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="copy tokenizer files from this directory (default: the config's, else bytes)")
    args = parser.parse_args(argv)
    out = write_random_model(args.config, args.out, getattr(torch, args.dtype), args.tokenizer_from)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
