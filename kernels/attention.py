"""Split-KV decode/verification attention over a static KV cache with the append fused in (Triton).

Semantics are flash_attn_with_kvcache's with rotary_interleaved=False (see spd_engine/ops/reference.py):
the Tq new keys are rotated (HF half rotation), written with their values at cache_seqlens[b] + [0, Tq),
and the rotated queries attend over [0, cache_seqlens[b] + Tq), causal and bottom-right aligned.

``plan`` (host: split-KV grid and workspaces from the capacity, once) and ``run`` (launches only, capturable)
split the work as FlashInfer does; ``attention_with_kvcache`` is one plan and one run.

Launch structure (two kernels; one when the plan has a single split):
  _attention_split_kernel  grid (num_splits, row_tiles * hkv, batch)
    One program owns one KV head of one sequence, one split of the key range and BLOCK_M query rows.
    Rows are (t, head-in-group) pairs, t-major, so the query heads of a GQA group share every K/V block.
    The split plan is derived from the cache capacity (kernels/split_kv.py), so a captured CUDA graph stays
    valid at any live length; programs read the live length from cache_seqlens on the device.
    Each key block is loaded from the cache up to the committed length. The block that holds the new
    positions takes them from k/v instead (k rotated and rounded to the cache dtype) and, in row tile 0
    only, stores them into the cache: the new tokens see themselves and each new row is written once.
    Scores use the two rotary halves as two dots, so q is never re-concatenated. Online softmax in base 2.
  _attention_combine_kernel  grid (batch * tq * hq): merges the per-split partials by their log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import dot_precision, rotate_half
from .split_kv import plan_splits

BLOCK_N = 64  # keys per block; splits start on block boundaries
MAX_BLOCK_M = 64  # query rows per program; longer verification / prefill uses more row tiles


@triton.jit
def _attention_split_kernel(
    Q, K_CACHE, V_CACHE, K_NEW, V_NEW, CACHE_SEQLENS, COS, SIN, OUT, PARTIAL_OUT, PARTIAL_LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    stride_knb, stride_knt, stride_knh,
    stride_vnb, stride_vnt, stride_vnh,
    stride_ob, stride_ot, stride_oh,
    stride_rot, rot_len,
    batch, tq, hq, hkv, s_max, split_len, scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROTARY: tl.constexpr, CAUSAL: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    split = tl.program_id(0)
    kv_head = tl.program_id(1) % hkv
    row_tile = tl.program_id(1) // hkv
    b = tl.program_id(2).to(tl.int64)
    seqlen = tl.load(CACHE_SEQLENS + b)

    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = t < tq
    offs_h = tl.arange(0, HALF)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)

    # Rotated queries, rounded to the input dtype for the tensor-core dot; the scale goes on the scores.
    q_ptrs = Q + b * stride_qb + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_h[None, :]
    q1 = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0).to(tl.float32)
    q2 = tl.load(q_ptrs + HALF, mask=row_valid[:, None], other=0.0).to(tl.float32)
    if HAS_ROTARY:
        q_pos = seqlen + t
        q1, q2 = rotate_half(q1, q2, COS, SIN, q_pos[:, None] * stride_rot + offs_h[None, :],
                             (row_valid & (q_pos < rot_len))[:, None])
    q1 = q1.to(Q.dtype.element_ty)
    q2 = q2.to(Q.dtype.element_ty)

    split_begin = split * split_len
    split_end = tl.minimum(split_begin + split_len, s_max)
    kv_end = seqlen + tq
    if CAUSAL:
        # Row tile 0 writes the new K/V, so it visits every new position; later tiles stop at their horizon.
        last_t = tl.minimum((row_tile * BLOCK_M + BLOCK_M - 1) // GROUP, tq - 1)
        kv_end = tl.where(row_tile > 0, seqlen + last_t + 1, kv_end)
    loop_end = tl.minimum(split_end, kv_end)
    if CAUSAL:
        row_limit = tl.minimum(seqlen + t + 1, loop_end)
    else:
        row_limit = tl.zeros([BLOCK_M], dtype=tl.int32) + loop_end
    cached_end = tl.minimum(seqlen, loop_end)
    new_write_end = tl.where(row_tile == 0, loop_end, seqlen)  # only row tile 0 stores the new K/V

    k_cache = K_CACHE + b * stride_kcb + kv_head * stride_kch
    v_cache = V_CACHE + b * stride_vcb + kv_head * stride_vch
    k_new = K_NEW + b * stride_knb + kv_head * stride_knh
    v_new = V_NEW + b * stride_vnb + kv_head * stride_vnh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for start in range(split_begin, loop_end, BLOCK_N):
        pos = start + offs_n
        in_cache = pos < cached_end
        k_offsets = pos[None, :] * stride_kcs + offs_h[:, None]  # (HALF, BLOCK_N): K^T, one half at a time
        v_offsets = pos[:, None] * stride_vcs + offs_d[None, :]
        k1 = tl.load(k_cache + k_offsets, mask=in_cache[None, :], other=0.0)
        k2 = tl.load(k_cache + k_offsets + HALF, mask=in_cache[None, :], other=0.0)
        v = tl.load(v_cache + v_offsets, mask=in_cache[:, None], other=0.0)
        if start + BLOCK_N > seqlen:  # the block that holds new tokens
            is_new = (pos >= seqlen) & (pos < loop_end)
            t_new = pos - seqlen
            kn_offsets = t_new[None, :] * stride_knt + offs_h[:, None]
            kn1 = tl.load(k_new + kn_offsets, mask=is_new[None, :], other=0.0).to(tl.float32)
            kn2 = tl.load(k_new + kn_offsets + HALF, mask=is_new[None, :], other=0.0).to(tl.float32)
            if HAS_ROTARY:
                kn1, kn2 = rotate_half(kn1, kn2, COS, SIN, pos[None, :] * stride_rot + offs_h[:, None],
                                       (is_new & (pos < rot_len))[None, :])
            kn1 = kn1.to(K_CACHE.dtype.element_ty)
            kn2 = kn2.to(K_CACHE.dtype.element_ty)
            vn = tl.load(v_new + t_new[:, None] * stride_vnt + offs_d[None, :], mask=is_new[:, None], other=0.0)
            vn = vn.to(V_CACHE.dtype.element_ty)
            writes = is_new & (pos < new_write_end)
            tl.store(k_cache + k_offsets, kn1, mask=writes[None, :])
            tl.store(k_cache + k_offsets + HALF, kn2, mask=writes[None, :])
            tl.store(v_cache + v_offsets, vn, mask=writes[:, None])
            k1 = tl.where(is_new[None, :], kn1, k1)
            k2 = tl.where(is_new[None, :], kn2, k2)
            v = tl.where(is_new[:, None], vn, v)

        scores = tl.dot(q1, k1, input_precision=DOT_PRECISION) + tl.dot(q2, k2, input_precision=DOT_PRECISION)
        scores = tl.where(pos[None, :] < row_limit[:, None], scores * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row with nothing visible yet keeps max -inf; subtracting 0 then gives p = 0 rather than NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(scores - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(V_CACHE.dtype.element_ty), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        out_ptrs = OUT + b * stride_ob + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(OUT.dtype.element_ty), mask=row_valid[:, None])
    else:
        # An empty split (past the live length) leaves o = 0 with lse = -inf: zero weight in the combine.
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        partial_row = ((split * batch + b) * tq + t) * hq + head
        tl.store(PARTIAL_OUT + partial_row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_valid[:, None])
        tl.store(PARTIAL_LSE + partial_row, lse, mask=row_valid)


@triton.jit
def _attention_combine_kernel(
    PARTIAL_OUT, PARTIAL_LSE, OUT, stride_ob, stride_ot, stride_oh, tq, hq, rows_total, num_splits,
    HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr,
):
    # Split 0 holds key 0, which every row sees, so the max below is finite.
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, HEAD_DIM)
    split_valid = offs_s < num_splits
    lse = tl.load(PARTIAL_LSE + offs_s * rows_total + row, mask=split_valid, other=float("-inf"))
    weights = tl.math.exp2(lse - tl.max(lse, 0))
    partial = tl.load(PARTIAL_OUT + (offs_s[:, None] * rows_total + row) * HEAD_DIM + offs_d[None, :],
                      mask=split_valid[:, None], other=0.0)
    out = tl.sum(weights[:, None] * partial, 0) / tl.sum(weights, 0)
    head = row % hq
    t = (row // hq) % tq
    b = row // (hq * tq)
    tl.store(OUT + b * stride_ob + t * stride_ot + head * stride_oh + offs_d, out.to(OUT.dtype.element_ty))


def _check_inputs(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin):
    B, Tq, Hq, D = q.shape
    _, S_max, Hkv, _ = k_cache.shape
    if v_cache.shape != k_cache.shape or k.shape != (B, Tq, Hkv, D) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    if D < 32 or D > 256 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two in [32, 256], got {D}")
    if len({q.dtype, k_cache.dtype, v_cache.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError("q, k, v and the caches must share one dtype")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        raise ValueError("cache_seqlens must be an int32 tensor of shape (batch,)")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    tensors = [q, k_cache, v_cache, k, v] + ([rotary_cos, rotary_sin] if rotary_cos is not None else [])
    if any(x.stride(-1) != 1 for x in tensors):
        raise ValueError("the last dimension of every tensor must be contiguous")
    if rotary_cos is not None and (rotary_cos.shape[-1] != D // 2 or rotary_sin.shape != rotary_cos.shape):
        raise ValueError(f"rotary tables must be (positions, {D // 2})")


@dataclass(frozen=True)
class AttentionPlan:
    """What one attention shape needs, decided on the host from the cache capacity (FlashInfer's plan/run
    split): the split-KV grid, and the output and split workspaces, allocated once. ``run`` launches into
    them without allocating, so it can be captured on any stream. One plan serves every layer of a stage:
    they run one after another on one stream, and each layer's output is consumed before the next runs."""
    q_shape: tuple[int, int, int, int]  # (B, Tq, Hq, D)
    num_kv_heads: int
    capacity: int
    block_m: int
    row_tiles: int
    num_splits: int
    split_len: int
    out: torch.Tensor
    partial_out: torch.Tensor
    partial_lse: torch.Tensor


def plan(q_shape, num_kv_heads: int, capacity: int, dtype: torch.dtype, device, num_splits: int | None = None
         ) -> AttentionPlan:
    """``num_splits`` overrides the capacity plan (tests use it to cover both the single-split and the combine
    path)."""
    B, Tq, Hq, D = q_shape
    group = Hq // num_kv_heads
    block_m = max(16, min(MAX_BLOCK_M, triton.next_power_of_2(Tq * group)))
    row_tiles = triton.cdiv(Tq * group, block_m)
    if num_splits is None:
        num_splits, split_len = plan_splits(B * num_kv_heads * row_tiles, capacity, BLOCK_N, torch.device(device))
    else:
        split_len = triton.cdiv(triton.cdiv(capacity, num_splits), BLOCK_N) * BLOCK_N
        num_splits = triton.cdiv(capacity, split_len)
    out = torch.empty(q_shape, dtype=dtype, device=device)
    if num_splits > 1:
        partial_out = torch.empty((num_splits, B, Tq, Hq, D), dtype=torch.float32, device=device)
        partial_lse = torch.empty((num_splits, B, Tq, Hq), dtype=torch.float32, device=device)
    else:
        partial_out = partial_lse = out  # never touched with a single split
    return AttentionPlan(tuple(q_shape), num_kv_heads, capacity, block_m, row_tiles, num_splits, split_len, out,
                         partial_out, partial_lse)


def run(attention_plan: AttentionPlan, q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
        softmax_scale=None, causal=True) -> torch.Tensor:
    """Attention into ``attention_plan.out`` (returned); the plan must match q's shape and the cache's."""
    _check_inputs(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    B, Tq, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    p = attention_plan
    if p.q_shape != tuple(q.shape) or p.capacity != S_max or p.num_kv_heads != Hkv or p.out.dtype != q.dtype:
        raise ValueError(f"this attention plan is for q {p.q_shape} {p.out.dtype}, {p.num_kv_heads} KV heads, capacity "
                         f"{p.capacity}; got q {tuple(q.shape)} {q.dtype}, {Hkv} KV heads, capacity {S_max}")
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    out = p.out
    has_rotary = rotary_cos is not None
    cos = rotary_cos if has_rotary else q  # placeholders are never read when HAS_ROTARY is False
    sin = rotary_sin if has_rotary else q
    _attention_split_kernel[(p.num_splits, p.row_tiles * Hkv, B)](
        q, k_cache, v_cache, k, v, cache_seqlens, cos, sin, out, p.partial_out, p.partial_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        cos.stride(0) if has_rotary else 0, cos.shape[0] if has_rotary else 0,
        B, Tq, Hq, Hkv, S_max, p.split_len, scale * 1.4426950408889634,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_M=p.block_m, BLOCK_N=BLOCK_N,
        HAS_ROTARY=has_rotary, CAUSAL=bool(causal), SINGLE_SPLIT=p.num_splits == 1,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4, num_stages=2,
    )
    if p.num_splits > 1:
        _attention_combine_kernel[(B * Tq * Hq,)](
            p.partial_out, p.partial_lse, out, out.stride(0), out.stride(1), out.stride(2), Tq, Hq, B * Tq * Hq,
            p.num_splits, HEAD_DIM=D, SPLITS=triton.next_power_of_2(p.num_splits), num_warps=4,
        )
    return out


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                           softmax_scale=None, causal=True, *, num_splits=None):
    """See spd_engine.ops.reference.attention_with_kvcache: a plan made for this call, then its run (the output
    is the plan's own, fresh per call). ``num_splits`` overrides the capacity plan."""
    _check_inputs(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    attention_plan = plan(tuple(q.shape), k_cache.shape[2], k_cache.shape[1], q.dtype, q.device, num_splits)
    return run(attention_plan, q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale,
               causal)
