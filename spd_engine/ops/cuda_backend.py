"""CUDA backend of the op API: the kernels of ``spd_engine._C`` (csrc/) as ``torch.library`` custom ops.

The extension takes raw device pointers, strides, dtype codes and a stream handle, so it is independent of
the torch build; this module turns tensors into those arguments. Each op is registered with
``torch.library.custom_op`` plus a fake (meta) implementation, so CUDA graphs and ``torch.compile`` treat it as
one opaque op, and every launch goes to ``torch.cuda.current_stream()`` so it lands in a graph being captured.

``swiglu_mlp`` has no CUDA-C kernel: it delegates to the Triton backend (fused gate/up GEMV + SiLU·mul, then
cuBLAS for the down projection) and to the torch reference where Triton is missing. Inputs outside what
the CUDA kernels implement (float64, head dims other than 64/128, unaligned caches) take the same
Triton-backend-then-torch path, which itself hands Triton's own gaps to the reference, so ``backend="cuda"``
never fails on a valid input.

Importing this module without the built extension raises ImportError, which makes dispatch fall back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

try:
    from spd_engine import _C
except ImportError as exc:  # not built: no nvcc at install time, or SPD_ENGINE_NO_CUDA=1
    raise ImportError(
        "spd_engine._C (the CUDA extension) is not built; reinstall with nvcc on PATH or CUDA_HOME set "
        f"to enable the 'cuda' backend ({exc})"
    ) from exc

from kernels.split_kv import cdiv, plan_splits

from . import reference

try:
    # The Triton backend, not the raw kernels: it sends what Triton cannot compile (float64, head dims outside
    # its range) on to the torch reference, so every input has a path.
    from . import triton_backend as _fallback
except ImportError:  # no Triton: the torch reference is the next best
    _fallback = reference

# Must match spd::DType in csrc/ops.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _dtype_code(t: Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(f"the cuda backend supports float32/float16/bfloat16, got {t.dtype}") from None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _strides3(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_device(*tensors: Optional[Tensor]) -> None:
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if device.type != "cuda" or any(t.device != device for t in present):
        raise ValueError("the cuda backend needs every tensor on the same CUDA device")
    if any(t.dim() > 0 and t.stride(-1) != 1 for t in present):
        raise ValueError("the cuda backend needs every tensor contiguous along its last dimension")


def _rotary_args(rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], head_dim: int) -> dict:
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("pass both rotary_cos and rotary_sin, or neither")
    if rotary_cos is None:
        return dict(rotary_cos=0, rotary_sin=0, rotary_dtype=0, rotary_row_stride=0, rotary_len=0)
    if rotary_cos.shape[-1] != head_dim // 2 or rotary_sin.shape != rotary_cos.shape or rotary_sin.stride() != rotary_cos.stride():
        raise ValueError(f"rotary tables must be two (positions, {head_dim // 2}) tensors of one layout")
    if rotary_sin.dtype != rotary_cos.dtype:
        raise ValueError("rotary_cos and rotary_sin must share a dtype")
    return dict(rotary_cos=rotary_cos.data_ptr(), rotary_sin=rotary_sin.data_ptr(),
                rotary_dtype=_dtype_code(rotary_cos), rotary_row_stride=rotary_cos.stride(0),
                rotary_len=rotary_cos.shape[0])


def _check_kv_shapes(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor) -> None:
    B, _, Hkv, D = k_cache.shape
    if v_cache.shape != k_cache.shape or k.shape[0] != B or k.shape[2:] != (Hkv, D) or v.shape != k.shape:
        raise ValueError(f"shape mismatch: caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if len({k_cache.dtype, v_cache.dtype, k.dtype, v.dtype}) != 1:
        raise ValueError("k, v and the caches must share one dtype")
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,) or cache_seqlens.stride(0) != 1:
        raise ValueError("cache_seqlens must be a contiguous int32 tensor of shape (batch,)")


@dataclass(frozen=True)
class AttentionPlan:
    """The CUDA kernel's split-KV grid for one q shape at one capacity, and its output and split workspaces,
    allocated once (host side: FlashInfer's plan); :func:`attention_with_kvcache` with ``plan`` only launches
    into them (run). One plan serves every layer of a stage, which run one after another on one stream."""
    q_shape: tuple[int, int, int, int]
    num_kv_heads: int
    capacity: int
    num_splits: int
    split_len: int
    out: Tensor
    partial_out: Optional[Tensor]
    partial_lse: Optional[Tensor]


def _plan(q_shape, num_kv_heads: int, capacity: int, dtype: torch.dtype, device: torch.device) -> AttentionPlan:
    B, Tq, Hq, D = q_shape
    row_tiles = cdiv(Tq * (Hq // num_kv_heads), _C.attention_rows_per_cta())
    num_splits, split_len = plan_splits(B * num_kv_heads * row_tiles, capacity,
                                        _C.attention_chunk_keys(DTYPE_CODES[dtype]), device)
    out = torch.empty(q_shape, dtype=dtype, device=device)
    partial_out = partial_lse = None
    if num_splits > 1:
        partial_out = torch.empty((num_splits, B, Tq, Hq, D), dtype=torch.float32, device=device)
        partial_lse = torch.empty((num_splits, B, Tq, Hq), dtype=torch.float32, device=device)
    return AttentionPlan(tuple(q_shape), num_kv_heads, capacity, num_splits, split_len, out, partial_out, partial_lse)


@torch.library.custom_op("spd_engine::cuda_attention_with_kvcache",
                         mutates_args=("k_cache", "v_cache", "out", "partial_out", "partial_lse"), device_types="cuda")
def _attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                  rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], softmax_scale: float,
                  causal: bool, out: Tensor, partial_out: Optional[Tensor], partial_lse: Optional[Tensor],
                  num_splits: int, split_len: int) -> None:
    _check_device(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, out)
    _check_kv_shapes(k_cache, v_cache, k, v, cache_seqlens)
    B, Tq, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    if k.shape[1] != Tq or q.dtype != k.dtype or Hq % Hkv != 0:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not match k {tuple(k.shape)} {k.dtype}")
    if out.shape != q.shape or out.dtype != q.dtype or (num_splits > 1 and partial_out is None):
        raise ValueError("the attention plan does not match this call")
    # The kernel streams cache rows with 16-byte cp.async copies.
    vector = 16 // q.element_size()
    for cache in (k_cache, v_cache):
        if cache.data_ptr() % 16 or any(s % vector for s in _strides3(cache)):
            raise ValueError("the cuda backend needs 16-byte aligned KV-cache rows")
    partial_ptrs = (partial_out.data_ptr(), partial_lse.data_ptr()) if num_splits > 1 else (0, 0)
    _C.attention_with_kvcache(
        q=q.data_ptr(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
        cache_seqlens=cache_seqlens.data_ptr(), out=out.data_ptr(), partial_out=partial_ptrs[0],
        partial_lse=partial_ptrs[1], q_stride=_strides3(q), k_cache_stride=_strides3(k_cache),
        v_cache_stride=_strides3(v_cache), k_stride=_strides3(k), v_stride=_strides3(v), out_stride=_strides3(out),
        **_rotary_args(rotary_cos, rotary_sin, D),
        batch=B, tq=Tq, hq=Hq, hkv=Hkv, head_dim=D, s_max=S_max, softmax_scale=softmax_scale, causal=causal,
        num_splits=num_splits, split_len=split_len, dtype=_dtype_code(q), device=q.device.index,
        stream=_stream(q.device),
    )


@_attention_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, causal, out, partial_out,
      partial_lse, num_splits, split_len):
    return None


@torch.library.custom_op("spd_engine::cuda_append_kv_cache", mutates_args=("k_cache", "v_cache"),
                         device_types="cuda")
def _append_kv_cache_op(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                        rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor]) -> None:
    _check_device(k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    _check_kv_shapes(k_cache, v_cache, k, v, cache_seqlens)
    B, S_max, Hkv, D = k_cache.shape
    _C.append_kv_cache(
        k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), k=k.data_ptr(), v=v.data_ptr(),
        cache_seqlens=cache_seqlens.data_ptr(), k_cache_stride=_strides3(k_cache), v_cache_stride=_strides3(v_cache),
        k_stride=_strides3(k), v_stride=_strides3(v), **_rotary_args(rotary_cos, rotary_sin, D),
        batch=B, tq=k.shape[1], hkv=Hkv, head_dim=D, s_max=S_max, dtype=_dtype_code(k),
        device=k.device.index, stream=_stream(k.device),
    )


@_append_kv_cache_op.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin):
    return None


def _launch_rms_norm(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float):
    _check_device(x, residual, weight)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype")
    x_rows = x.reshape(-1, hidden)
    residual_rows = residual.reshape(-1, hidden) if residual is not None else None
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if residual is not None else None
    _C.rms_norm(
        x=x_rows.data_ptr(), residual=residual_rows.data_ptr() if residual is not None else 0,
        weight=weight.data_ptr(), out=out.data_ptr(),
        residual_out=residual_out.data_ptr() if residual is not None else 0,
        rows=x_rows.shape[0], hidden=hidden, x_row_stride=x_rows.stride(0),
        residual_row_stride=residual_rows.stride(0) if residual is not None else 0, out_row_stride=hidden,
        residual_out_row_stride=hidden if residual is not None else 0, eps=eps, x_dtype=_dtype_code(x),
        weight_dtype=_dtype_code(weight), device=x.device.index, stream=_stream(x.device),
    )
    return out, residual_out


@torch.library.custom_op("spd_engine::cuda_rms_norm", mutates_args=(), device_types="cuda")
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _launch_rms_norm(x, None, weight, eps)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("spd_engine::cuda_fused_add_rms_norm", mutates_args=(), device_types="cuda")
def _fused_add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _launch_rms_norm(x, residual, weight, eps)


@_fused_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape)


@torch.library.custom_op("spd_engine::cuda_aggregate_features", mutates_args=(), device_types="cuda")
def _aggregate_features_op(anchors: Tensor, weight_cat: Tensor, row_slots: Tensor, row_types: Tensor) -> Tensor:
    _check_device(anchors, weight_cat, row_slots, row_types)
    S, m, H = anchors.shape
    if weight_cat.shape != (H, H * m * (m + 1) // 2) or weight_cat.dtype != anchors.dtype:
        raise ValueError(f"weight_cat must be ({H}, {H * m * (m + 1) // 2}) in the anchors' dtype, "
                         f"got {tuple(weight_cat.shape)} {weight_cat.dtype}")
    if row_slots.dim() != 1 or row_slots.shape != row_types.shape:
        raise ValueError("row_slots and row_types must be matching 1-D index tensors")
    index_dtypes = (torch.int32, torch.int64)
    if row_slots.dtype not in index_dtypes or row_types.dtype not in index_dtypes:
        raise ValueError("row_slots and row_types must be int32 or int64")
    out = torch.empty((row_slots.shape[0], H), dtype=anchors.dtype, device=anchors.device)
    _C.aggregate_features(
        anchors=anchors.data_ptr(), weight_cat=weight_cat.data_ptr(), row_slots=row_slots.data_ptr(),
        slots_int64=row_slots.dtype == torch.int64, row_types=row_types.data_ptr(),
        types_int64=row_types.dtype == torch.int64, out=out.data_ptr(), num_slots=S, num_types=m, hidden=H,
        rows=row_slots.shape[0], anchor_stride_slot=anchors.stride(0), anchor_stride_type=anchors.stride(1),
        weight_row_stride=weight_cat.stride(0), out_row_stride=H, dtype=_dtype_code(anchors),
        device=anchors.device.index, stream=_stream(anchors.device),
    )
    return out


@_aggregate_features_op.register_fake
def _(anchors, weight_cat, row_slots, row_types):
    return anchors.new_empty((row_slots.shape[0], anchors.shape[2]))


def _kernel_dtypes(*tensors) -> bool:
    return all(t is None or t.dtype in DTYPE_CODES for t in tensors)


def _kernel_covers(q_dtype: torch.dtype, head_dim: int, caches) -> bool:
    """float32/16/bf16, head_dim 64 or 128, cache rows 16-byte aligned: what the CUDA kernel implements."""
    if q_dtype not in DTYPE_CODES or head_dim not in (64, 128):
        return False
    vector = 16 // caches[0].element_size()
    return all(c.data_ptr() % 16 == 0 and all(s % vector == 0 for s in _strides3(c)) for c in caches)


def plan_attention(q_shape, k_cache, v_cache):
    """The plan for attention calls of this q shape over these caches (see :class:`AttentionPlan`); inputs the
    kernel does not cover get the fallback backend's plan, or None."""
    if not _kernel_covers(k_cache.dtype, q_shape[-1], (k_cache, v_cache)):
        planner = getattr(_fallback, "plan_attention", None)
        return planner(q_shape, k_cache, v_cache) if planner else None
    return _plan(tuple(q_shape), k_cache.shape[2], k_cache.shape[1], k_cache.dtype, k_cache.device)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                           softmax_scale=None, causal=True, plan=None):
    """Inputs the CUDA kernel does not cover (float64, head_dim other than 64/128, caches whose rows are not
    16-byte aligned) go to the Triton backend, which hands its own gaps to the torch reference. ``plan`` (from
    :func:`plan_attention`) supplies the output and workspaces; without one they are planned for this call."""
    head_dim = q.shape[-1]
    if not (_kernel_covers(q.dtype, head_dim, (k_cache, v_cache)) and
            (rotary_cos is None or rotary_cos.dtype in DTYPE_CODES)):
        extra = {} if plan is None else {"plan": plan}
        return _fallback.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                                softmax_scale, causal, **extra)
    if plan is None:
        plan = _plan(tuple(q.shape), k_cache.shape[2], k_cache.shape[1], q.dtype, q.device)
    elif plan.q_shape != tuple(q.shape) or plan.capacity != k_cache.shape[1] or plan.num_kv_heads != k_cache.shape[2]:
        raise ValueError(f"this attention plan is for q {plan.q_shape}, capacity {plan.capacity}; got q "
                         f"{tuple(q.shape)}, capacity {k_cache.shape[1]}")
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    _attention_op(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, float(scale), bool(causal),
                  plan.out, plan.partial_out, plan.partial_lse, plan.num_splits, plan.split_len)
    return plan.out


def append_kv_cache(k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None):
    """Rotate k and write k, v at cache_seqlens[b] + [0, Tq) (the write half of attention_with_kvcache)."""
    _append_kv_cache_op(k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)


def rms_norm(x, weight, eps, residual=None):
    if not (_kernel_dtypes(x) and weight.dtype in (x.dtype, torch.float32)):
        return reference.rms_norm(x, weight, eps, residual)
    if residual is None:
        return _rms_norm_op(x, weight, float(eps)), x
    return _fused_add_rms_norm_op(x, residual, weight, float(eps))


def swiglu_mlp(x, gate_up_weight, down_weight):
    return _fallback.swiglu_mlp(x, gate_up_weight, down_weight)


def aggregate_features(anchors, weight_cat, row_slots, row_types):
    if not _kernel_dtypes(anchors):
        return reference.aggregate_features(anchors, weight_cat, row_slots, row_types)
    return _aggregate_features_op(anchors, weight_cat, row_slots, row_types)
