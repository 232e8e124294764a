"""Plain-PyTorch reference ops: the ground truth in tests and the fallback on any device.

On a GPU every function here is free of host synchronisation (no ``.item()``, no data-dependent shapes), so
the torch backend can also be captured in a CUDA graph. On the CPU, reading a length is free, so attention
slices the cache to the live length instead of masking the whole capacity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF "half" rotary: x is (B, T, H, D); cos/sin are (B, T, D/2) already gathered at positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c = cos[:, :, None, :].to(x.dtype)
    s = sin[:, :, None, :].to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                           softmax_scale=None, causal=True):
    """flash-attn ``flash_attn_with_kvcache`` semantics (``rotary_interleaved=False``).

    q (B, Tq, Hq, D); caches (B, S_max, Hkv, D); k/v (B, Tq, Hkv, D); cache_seqlens (B,) int32.
    New k/v are rotated (k only) and written at ``cache_seqlens[b] + [0, Tq)``; the queries attend over
    ``[0, cache_seqlens[b] + Tq)`` with bottom-right-aligned causality among the new tokens.
    """
    strategy = attention_live_length if cache_seqlens.device.type == "cpu" else attention_capacity_masked
    return strategy(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, causal)


def _append_rotated(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin):
    """Rotate q and the new k at their positions and write the new k/v into the caches; returns (q, positions)."""
    B, Tq = q.shape[:2]
    positions = cache_seqlens.long()[:, None] + torch.arange(Tq, device=q.device)  # (B, Tq)
    if rotary_cos is not None:
        cos, sin = rotary_cos[positions], rotary_sin[positions]
        q = rotate_half_at(q, cos, sin)
        k = rotate_half_at(k, cos, sin)
    batch_index = torch.arange(B, device=q.device)[:, None].expand(B, Tq)
    k_cache.index_put_((batch_index, positions), k.to(k_cache.dtype))
    v_cache.index_put_((batch_index, positions), v.to(v_cache.dtype))
    return q, positions


def attention_live_length(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                          softmax_scale=None, causal=True):
    """Host-known lengths (CPU): each sequence attends over its live cache slice with SDPA; nothing past the
    live length is touched."""
    Tq, Hq = q.shape[1:3]
    group = Hq // k_cache.shape[2]
    q, _ = _append_rotated(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outputs = []
    for b, start in enumerate(cache_seqlens.tolist()):
        end = start + Tq
        keys = k_cache[b, :end].to(acc).repeat_interleave(group, 1).transpose(0, 1)  # (Hq, end, D)
        values = v_cache[b, :end].to(acc).repeat_interleave(group, 1).transpose(0, 1)
        mask = None
        if causal and Tq > 1:  # bottom-right aligned: query i sees keys <= start + i
            mask = torch.arange(end, device=q.device)[None] <= (start + torch.arange(Tq, device=q.device))[:, None]
        out = F.scaled_dot_product_attention(q[b].to(acc).transpose(0, 1), keys, values, attn_mask=mask,
                                             scale=softmax_scale)
        outputs.append(out.transpose(0, 1))
    return torch.stack(outputs).to(q.dtype)


def attention_capacity_masked(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                              softmax_scale=None, causal=True):
    """Device-resident lengths (GPU, graph-capturable): attend over the whole capacity under a mask, so no
    shape depends on a length."""
    B, Tq, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    q, positions = _append_rotated(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    key_pos = torch.arange(S_max, device=q.device)
    limit = positions if causal else (cache_seqlens.long() + Tq - 1)[:, None].expand(B, Tq)
    visible = key_pos[None, None, :] <= limit[:, :, None]  # (B, Tq, S_max)
    group = Hq // Hkv
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    # GQA without copying the cache: query heads are grouped as (Hkv, group) against each shared KV head.
    q_grouped = q.reshape(B, Tq, Hkv, group, D).to(acc)
    scores = torch.einsum("btkgd,bskd->bkgts", q_grouped, k_cache.to(acc)) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Stale or never-written cache rows may hold anything (NaN included); zero them so 0 * NaN never leaks.
    values = v_cache.masked_fill(~visible.any(1)[:, :, None, None], 0).to(acc)
    out = torch.einsum("bkgts,bskd->btkgd", probs, values).reshape(B, Tq, Hq, D)
    return out.to(q.dtype)


def rms_norm(x, weight, eps, residual=None):
    """Fused residual add + RMSNorm, HF numerics: the sum stays in x's dtype, the norm runs in fp32.

    Returns (normed, new_residual) where new_residual = x + residual (or x when residual is None).
    """
    if residual is not None:
        x = x + residual
    xf = x.float() if x.dtype != torch.float64 else x
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), x


def swiglu_mlp(x, gate_up_weight, down_weight):
    """down(silu(gate(x)) * up(x)) with gate and up stacked as one (2F, H) weight: one GEMV, not two."""
    gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down_weight)


def aggregate_features(anchors, weight_cat, row_slots, row_types):
    """Multi-depth feature aggregation of the draft module (docs/ARCHITECTURE.md, "The draft module").

    anchors    (S, m, H): anchor hidden-state snapshots per token slot, anchors[s, j] = h_{b_j} of slot s.
    weight_cat (H, H*m*(m+1)/2): W_0 | W_1 | ... | W_{m-1} side by side; W_i is (H, (i+1)H) and starts at
               column H*i*(i+1)/2.
    row_slots  (R,) int: the slot each output row reads.  row_types (R,) int: its aggregation type i.
    Returns g (R, H) with g[r] = W_{t} . concat(anchors[slot, 0..t]),  t = row_types[r].
    """
    S, m, H = anchors.shape
    R = row_slots.shape[0]
    x = anchors[row_slots.long()]  # (R, m, H)
    types = row_types.long()
    # Zero the anchors a row's type does not read, then one batched matmul per type against its W.
    out = x.new_zeros(R, H)
    for t in range(m):
        w = weight_cat[:, H * t * (t + 1) // 2: H * (t + 1) * (t + 2) // 2]  # (H, (t+1)H)
        g = x[:, : t + 1].reshape(R, (t + 1) * H) @ w.t()
        out = torch.where((types == t)[:, None], g, out)
    return out
