"""Benchmark attention_with_kvcache (decode / verification over a static cache) on every backend.

GB/s counts the compulsory traffic: the live K/V rows read once, q and the output, the new K/V written.
The cache capacity is fixed per model, as in the engine, so the split plan is the one a captured graph uses.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _timing  # noqa: E402

MODELS = {"smollm2-135m": (9, 3, 64), "llama3-8b": (32, 8, 128)}  # (Hq, Hkv, head_dim)
CACHE_LENGTHS = (512, 2048, 8192)
NEW_TOKENS = (1, 5)  # plain decode, and verification of an n = 4 pipeline
CAPACITY = 8192 + 64


def main():
    args, device, copy_gbps = _timing.start(__doc__, Path(__file__).name)
    from spd_engine import ops

    dtype = torch.bfloat16
    has_flash_attn = importlib.util.find_spec("flash_attn") is not None
    rows = []
    for model, (hq, hkv, head_dim) in MODELS.items():
        k_cache = torch.randn(1, CAPACITY, hkv, head_dim, dtype=dtype, device=device)
        v_cache = torch.randn_like(k_cache)
        angles = torch.arange(CAPACITY, device=device)[:, None] * torch.rand(head_dim // 2, device=device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        for length in CACHE_LENGTHS:
            for tq in NEW_TOKENS:
                q = torch.randn(1, tq, hq, head_dim, dtype=dtype, device=device)
                k = torch.randn(1, tq, hkv, head_dim, dtype=dtype, device=device)
                v = torch.randn_like(k)
                seqlens = torch.full((1,), length, dtype=torch.int32, device=device)
                calls = {
                    backend: (lambda b=backend: ops.attention_with_kvcache(q, k_cache, v_cache, k, v, seqlens, cos, sin,
                                                                           backend=b))
                    for backend in _timing.available_backends()
                }
                if has_flash_attn:
                    from flash_attn import flash_attn_with_kvcache

                    calls["flash_attn"] = lambda: flash_attn_with_kvcache(
                        q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=True)
                element = k_cache.element_size()
                nbytes = element * (2 * (length + tq) * hkv * head_dim + 2 * tq * hq * head_dim + 2 * tq * hkv * head_dim)
                rows += _timing.measure(calls, nbytes, copy_gbps, args.warmup, args.repeats, model=model,
                                        cache_length=length, new_tokens=tq, dtype=str(dtype))
    _timing.write_record(args.out, "attention_with_kvcache", copy_gbps, rows)


if __name__ == "__main__":
    main()
