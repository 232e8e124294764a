"""CUDA backend of the op API: the kernels of ``spd_engine._C`` (csrc/) as ``torch.library`` custom ops.

The extension takes raw device pointers, strides, dtype codes and a stream handle, so it is independent of
the torch build. Its argument structs are bound classes (``_C.AttentionArgs``, ``_C.RmsNormArgs``,
``_C.AggregateArgs``, ``_C.AppendKVArgs``): a plan (``plan_attention``, ``plan_rms_norm``,
``plan_aggregate_features``) allocates its outputs and workspaces and fills one struct, once, on the host; each
run then passes that prebuilt struct and only the per-call pointers (``_C.run_*``). The struct is refilled only
when a call's layout (strides, rotary tables, eps, output addresses) differs from the one it holds, which in
decoding happens on the first call alone. A call without a plan plans and runs inside one op. Each op is registered with
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

import itertools
import weakref
from dataclasses import dataclass, field
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

from spd_engine.kernels.split_kv import cdiv, plan_splits

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


class _Binding:
    """A plan's argument struct (``_C.*Args``), filled once on the host, and the layout it was filled for.

    ``layout`` is what the struct holds besides the plan's own buffers and the per-call pointers: strides,
    rotary table geometry, eps. A call whose layout matches launches the prebuilt struct with only its
    pointers (``_C.run_*``); another layout refills the struct first (once per new layout, not per call)."""

    __slots__ = ("args", "layout")

    def __init__(self, args):
        self.args, self.layout = args, None


def _fill(args, **fields):
    for name, value in fields.items():
        setattr(args, name, value)
    return args


# Plans are found again inside the custom ops (whose schema takes tensors and scalars, not Python objects) by
# a number; the table holds them weakly, so a plan lives exactly as long as its owner keeps it.
_PLANS: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_plan_ids = itertools.count(1)


def _register(plan):
    _PLANS[plan.plan_id] = plan
    return plan


def _planned(plan_id: int):
    try:
        return _PLANS[plan_id]
    except KeyError:
        raise RuntimeError(f"cuda backend: plan {plan_id} no longer exists") from None


@dataclass(frozen=True, eq=False)
class AttentionPlan:
    """The CUDA kernel's split-KV grid for one q shape at one capacity, its output and split workspaces,
    allocated once, and its argument struct, filled once (host side: FlashInfer's plan);
    :func:`attention_with_kvcache` with ``plan`` only launches into them (run). One plan serves every layer of
    a stage, which run one after another on one stream."""
    q_shape: tuple[int, int, int, int]
    num_kv_heads: int
    capacity: int
    num_splits: int
    split_len: int
    out: Tensor
    partial_out: Optional[Tensor]
    partial_lse: Optional[Tensor]
    binding: _Binding = field(repr=False)
    plan_id: int = field(default_factory=lambda: next(_plan_ids))


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
    args = _fill(_C.AttentionArgs(), out=out.data_ptr(), out_stride=_strides3(out),
                 partial_out=partial_out.data_ptr() if partial_out is not None else 0,
                 partial_lse=partial_lse.data_ptr() if partial_lse is not None else 0,
                 batch=B, tq=Tq, hq=Hq, hkv=num_kv_heads, head_dim=D, s_max=capacity, num_splits=num_splits,
                 split_len=split_len, dtype=DTYPE_CODES[dtype], device=out.device.index or 0)
    return _register(AttentionPlan(tuple(q_shape), num_kv_heads, capacity, num_splits, split_len, out,
                                   partial_out, partial_lse, _Binding(args)))


def _table_layout(table: Optional[Tensor]):
    return None if table is None else (table.dtype, table.shape, table.stride())


def _attention_layout(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, softmax_scale, causal):
    return (q.stride(), k.stride(), v.stride(), k_cache.stride(), v_cache.stride(), _table_layout(rotary_cos),
            _table_layout(rotary_sin), softmax_scale, causal)


def _run_attention(plan: AttentionPlan, q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                   softmax_scale: float, causal: bool, out, partial_out, partial_lse) -> None:
    _check_device(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, out)
    _check_kv_shapes(k_cache, v_cache, k, v, cache_seqlens)
    B, Tq, Hq, D = q.shape
    if k.shape[1] != Tq or q.dtype != k.dtype or Hq % k_cache.shape[2] != 0:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not match k {tuple(k.shape)} {k.dtype}")
    if out.shape != q.shape or out.dtype != q.dtype or (plan.num_splits > 1 and partial_out is None):
        raise ValueError("the attention plan does not match this call")
    # The kernel streams cache rows with 16-byte cp.async copies.
    vector = 16 // q.element_size()
    for cache in (k_cache, v_cache):
        if cache.data_ptr() % 16 or any(s % vector for s in _strides3(cache)):
            raise ValueError("the cuda backend needs 16-byte aligned KV-cache rows")
    binding = plan.binding
    # The outputs are the plan's own except under functionalization (torch.compile), which hands in copies.
    outputs = (out.data_ptr(), partial_out.data_ptr() if partial_out is not None else 0,
               partial_lse.data_ptr() if partial_lse is not None else 0)
    layout = (_attention_layout(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, softmax_scale, causal),
              outputs)
    if layout != binding.layout:  # a new layout: refill the struct once; every later call reuses it
        rotary = _rotary_args(rotary_cos, rotary_sin, D)
        _fill(binding.args, out=outputs[0], partial_out=outputs[1], partial_lse=outputs[2], out_stride=_strides3(out),
              q_stride=_strides3(q), k_stride=_strides3(k), v_stride=_strides3(v),
              k_cache_stride=_strides3(k_cache), v_cache_stride=_strides3(v_cache),
              rotary_dtype=rotary["rotary_dtype"], rotary_row_stride=rotary["rotary_row_stride"],
              rotary_len=rotary["rotary_len"], softmax_scale=softmax_scale, causal=causal)
        binding.layout = layout
    _C.run_attention(binding.args, q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(),
                     v.data_ptr(), cache_seqlens.data_ptr(), rotary_cos.data_ptr() if rotary_cos is not None else 0,
                     rotary_sin.data_ptr() if rotary_sin is not None else 0, _stream(q.device))


@torch.library.custom_op("spd_engine::cuda_attention_with_kvcache",
                         mutates_args=("k_cache", "v_cache", "out", "partial_out", "partial_lse"), device_types="cuda")
def _attention_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                  rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], softmax_scale: float,
                  causal: bool, out: Tensor, partial_out: Optional[Tensor], partial_lse: Optional[Tensor],
                  plan_id: int) -> None:
    """Run: launch a plan's prebuilt struct into its buffers."""
    _run_attention(_planned(plan_id), q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                   softmax_scale, causal, out, partial_out, partial_lse)


@_attention_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, causal, out, partial_out,
      partial_lse, plan_id):
    return None


@torch.library.custom_op("spd_engine::cuda_attention_with_kvcache_fresh", mutates_args=("k_cache", "v_cache"),
                         device_types="cuda")
def _attention_fresh_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                        rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor], softmax_scale: float,
                        causal: bool) -> Tensor:
    """One plan and one run, both inside the op (a call without a plan; opaque to torch.compile)."""
    plan = _plan(tuple(q.shape), k_cache.shape[2], k_cache.shape[1], q.dtype, q.device)
    _run_attention(plan, q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, causal,
                   plan.out, plan.partial_out, plan.partial_lse)
    return plan.out


@_attention_fresh_op.register_fake
def _(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, causal):
    return torch.empty_like(q)


@torch.library.custom_op("spd_engine::cuda_append_kv_cache", mutates_args=("k_cache", "v_cache"),
                         device_types="cuda")
def _append_kv_cache_op(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor,
                        rotary_cos: Optional[Tensor], rotary_sin: Optional[Tensor]) -> None:
    _check_device(k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)
    _check_kv_shapes(k_cache, v_cache, k, v, cache_seqlens)
    B, S_max, Hkv, D = k_cache.shape
    args = _fill(_C.AppendKVArgs(), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(), k=k.data_ptr(),
                 v=v.data_ptr(), cache_seqlens=cache_seqlens.data_ptr(), k_cache_stride=_strides3(k_cache),
                 v_cache_stride=_strides3(v_cache), k_stride=_strides3(k), v_stride=_strides3(v),
                 **_rotary_args(rotary_cos, rotary_sin, D), batch=B, tq=k.shape[1], hkv=Hkv, head_dim=D,
                 s_max=S_max, dtype=_dtype_code(k), device=k.device.index)
    _C.append_kv_cache(args, _stream(k.device))


@_append_kv_cache_op.register_fake
def _(k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin):
    return None


@dataclass(frozen=True, eq=False)
class RmsNormPlan:
    """Outputs of rms_norm for inputs of ``x_shape`` (``out`` and, with a residual, ``residual_out``) and the
    kernel's argument struct, made once; a run launches into them."""
    x_shape: tuple[int, ...]
    dtype: torch.dtype
    weight_dtype: torch.dtype
    with_residual: bool
    out: Tensor
    residual_out: Optional[Tensor]
    binding: _Binding = field(repr=False)
    plan_id: int = field(default_factory=lambda: next(_plan_ids))


def _plan_rms_norm(x_shape, dtype: torch.dtype, weight_dtype: torch.dtype, with_residual: bool,
                   device: torch.device) -> RmsNormPlan:
    x_shape = tuple(x_shape)
    hidden = x_shape[-1]
    out = torch.empty(x_shape, dtype=torch.promote_types(weight_dtype, dtype), device=device)
    residual_out = torch.empty(x_shape, dtype=dtype, device=device) if with_residual else None
    args = _fill(_C.RmsNormArgs(), out=out.data_ptr(), residual_out=residual_out.data_ptr() if with_residual else 0,
                 rows=out.numel() // hidden if hidden else 0, hidden=hidden, out_row_stride=hidden,
                 residual_out_row_stride=hidden if with_residual else 0, x_dtype=DTYPE_CODES[dtype],
                 weight_dtype=DTYPE_CODES[weight_dtype], device=out.device.index or 0)
    return _register(RmsNormPlan(x_shape, dtype, weight_dtype, with_residual, out, residual_out, _Binding(args)))


def _run_rms_norm(plan: RmsNormPlan, x, residual, weight, eps: float, out, residual_out) -> None:
    _check_device(x, residual, weight, out)
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype")
    x_rows = x.reshape(-1, hidden)
    residual_rows = residual.reshape(-1, hidden) if residual is not None else None
    binding = plan.binding
    if out.shape != x.shape or (residual is not None and (residual_out is None or residual_out.shape != x.shape)):
        raise ValueError("the rms_norm plan does not match this call")
    residual_out_ptr = residual_out.data_ptr() if residual_out is not None else 0
    # Without a residual the kernel reads neither residual stride nor residual_out: keep what is bound, so a
    # plan serving both kinds of call (a stage's first layer has no residual yet) is not refilled for it.
    if residual is not None:
        residual_stride = residual_rows.stride(0)
    else:
        residual_stride = binding.layout[1] if binding.layout is not None else 0
        residual_out_ptr = binding.layout[4] if binding.layout is not None else residual_out_ptr
    layout = (x_rows.stride(0), residual_stride, eps, out.data_ptr(), residual_out_ptr)
    if layout != binding.layout:
        _fill(binding.args, x_row_stride=layout[0], residual_row_stride=layout[1], eps=eps, out=out.data_ptr(),
              residual_out=residual_out_ptr)
        binding.layout = layout
    _C.run_rms_norm(binding.args, x_rows.data_ptr(), residual_rows.data_ptr() if residual is not None else 0,
                    weight.data_ptr(), _stream(x.device))


@torch.library.custom_op("spd_engine::cuda_rms_norm", mutates_args=("out", "residual_out"), device_types="cuda")
def _rms_norm_op(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, out: Tensor,
                 residual_out: Optional[Tensor], plan_id: int) -> None:
    _run_rms_norm(_planned(plan_id), x, residual, weight, eps, out, residual_out)


@_rms_norm_op.register_fake
def _(x, residual, weight, eps, out, residual_out, plan_id):
    return None


def _rms_norm_fresh(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float):
    plan = _plan_rms_norm(x.shape, x.dtype, weight.dtype, residual is not None, x.device)
    _run_rms_norm(plan, x, residual, weight, eps, plan.out, plan.residual_out)
    return plan.out, plan.residual_out


@torch.library.custom_op("spd_engine::cuda_rms_norm_fresh", mutates_args=(), device_types="cuda")
def _rms_norm_fresh_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _rms_norm_fresh(x, None, weight, eps)[0]


@_rms_norm_fresh_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


@torch.library.custom_op("spd_engine::cuda_fused_add_rms_norm_fresh", mutates_args=(), device_types="cuda")
def _fused_add_rms_norm_fresh_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _rms_norm_fresh(x, residual, weight, eps)


@_fused_add_rms_norm_fresh_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype)), x.new_empty(x.shape)


@dataclass(frozen=True, eq=False)
class AggregatePlan:
    """The (rows, hidden) output of aggregate_features and the kernel's argument struct, made once."""
    rows: int
    anchors_shape: tuple[int, int, int]
    dtype: torch.dtype
    out: Tensor
    binding: _Binding = field(repr=False)
    plan_id: int = field(default_factory=lambda: next(_plan_ids))


def _plan_aggregate(rows: int, anchors_shape, dtype: torch.dtype, device: torch.device) -> AggregatePlan:
    S, m, H = anchors_shape
    out = torch.empty((rows, H), dtype=dtype, device=device)
    args = _fill(_C.AggregateArgs(), out=out.data_ptr(), num_slots=S, num_types=m, hidden=H, rows=rows,
                 out_row_stride=H, dtype=DTYPE_CODES[dtype], device=out.device.index or 0)
    return _register(AggregatePlan(rows, tuple(anchors_shape), dtype, out, _Binding(args)))


def _run_aggregate(plan: AggregatePlan, anchors, weight_cat, row_slots, row_types, out) -> None:
    _check_device(anchors, weight_cat, row_slots, row_types, out)
    S, m, H = anchors.shape
    if weight_cat.shape != (H, H * m * (m + 1) // 2) or weight_cat.dtype != anchors.dtype:
        raise ValueError(f"weight_cat must be ({H}, {H * m * (m + 1) // 2}) in the anchors' dtype, "
                         f"got {tuple(weight_cat.shape)} {weight_cat.dtype}")
    if row_slots.dim() != 1 or row_slots.shape != row_types.shape:
        raise ValueError("row_slots and row_types must be matching 1-D index tensors")
    index_dtypes = (torch.int32, torch.int64)
    if row_slots.dtype not in index_dtypes or row_types.dtype not in index_dtypes:
        raise ValueError("row_slots and row_types must be int32 or int64")
    if out.shape != (row_slots.shape[0], H) or out.dtype != anchors.dtype:
        raise ValueError("the aggregate_features plan does not match this call")
    binding = plan.binding
    layout = (anchors.shape, anchors.stride(0), anchors.stride(1), weight_cat.stride(0), row_slots.dtype,
              row_types.dtype, out.data_ptr())
    if layout != binding.layout:
        _fill(binding.args, out=out.data_ptr(), num_slots=S, num_types=m, anchor_stride_slot=layout[1],
              anchor_stride_type=layout[2], weight_row_stride=layout[3],
              slots_int64=row_slots.dtype == torch.int64, types_int64=row_types.dtype == torch.int64)
        binding.layout = layout
    _C.run_aggregate_features(binding.args, anchors.data_ptr(), weight_cat.data_ptr(), row_slots.data_ptr(),
                              row_types.data_ptr(), _stream(anchors.device))


@torch.library.custom_op("spd_engine::cuda_aggregate_features", mutates_args=("out",), device_types="cuda")
def _aggregate_features_op(anchors: Tensor, weight_cat: Tensor, row_slots: Tensor, row_types: Tensor, out: Tensor,
                           plan_id: int) -> None:
    _run_aggregate(_planned(plan_id), anchors, weight_cat, row_slots, row_types, out)


@_aggregate_features_op.register_fake
def _(anchors, weight_cat, row_slots, row_types, out, plan_id):
    return None


@torch.library.custom_op("spd_engine::cuda_aggregate_features_fresh", mutates_args=(), device_types="cuda")
def _aggregate_features_fresh_op(anchors: Tensor, weight_cat: Tensor, row_slots: Tensor, row_types: Tensor) -> Tensor:
    plan = _plan_aggregate(row_slots.shape[0], tuple(anchors.shape), anchors.dtype, anchors.device)
    _run_aggregate(plan, anchors, weight_cat, row_slots, row_types, plan.out)
    return plan.out


@_aggregate_features_fresh_op.register_fake
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


def _fallback_plan(name: str, *args):
    planner = getattr(_fallback, name, None)
    return planner(*args) if planner else None


def plan_attention(q_shape, k_cache, v_cache):
    """The plan for attention calls of this q shape over these caches (see :class:`AttentionPlan`); inputs the
    kernel does not cover get the fallback backend's plan, or None."""
    if not _kernel_covers(k_cache.dtype, q_shape[-1], (k_cache, v_cache)):
        return _fallback_plan("plan_attention", q_shape, k_cache, v_cache)
    return _plan(tuple(q_shape), k_cache.shape[2], k_cache.shape[1], k_cache.dtype, k_cache.device)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                           softmax_scale=None, causal=True, plan=None):
    """Inputs the CUDA kernel does not cover (float64, head_dim other than 64/128, caches whose rows are not
    16-byte aligned) go to the Triton backend, which hands its own gaps to the torch reference. ``plan`` (from
    :func:`plan_attention`) supplies the output, workspaces and argument struct; without one they are planned
    for this call."""
    head_dim = q.shape[-1]
    if not (_kernel_covers(q.dtype, head_dim, (k_cache, v_cache)) and
            (rotary_cos is None or rotary_cos.dtype in DTYPE_CODES)):
        extra = {} if plan is None else {"plan": plan}
        return _fallback.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                                softmax_scale, causal, **extra)
    scale = float(softmax_scale if softmax_scale is not None else head_dim ** -0.5)
    if plan is None:
        return _attention_fresh_op(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, scale,
                                   bool(causal))
    if (not isinstance(plan, AttentionPlan) or plan.q_shape != tuple(q.shape) or plan.capacity != k_cache.shape[1]
          or plan.num_kv_heads != k_cache.shape[2]):
        raise ValueError(f"this attention plan does not fit q {tuple(q.shape)}, capacity {k_cache.shape[1]}: {plan}")
    _attention_op(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, scale, bool(causal),
                  plan.out, plan.partial_out, plan.partial_lse, plan.plan_id)
    return plan.out


def append_kv_cache(k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None):
    """Rotate k and write k, v at cache_seqlens[b] + [0, Tq) (the write half of attention_with_kvcache)."""
    _append_kv_cache_op(k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin)


def _rms_kernel_covers(dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    return dtype in DTYPE_CODES and weight_dtype in (dtype, torch.float32)


def plan_rms_norm(x_shape, dtype, weight, with_residual=True):
    """Outputs and argument struct for rms_norm of x (``x_shape``, ``dtype``) by ``weight`` (see
    :class:`RmsNormPlan`); None where the kernel does not cover the dtypes (the reference runs, unplanned)."""
    if not _rms_kernel_covers(dtype, weight.dtype):
        return None
    return _plan_rms_norm(x_shape, dtype, weight.dtype, with_residual, weight.device)


def rms_norm(x, weight, eps, residual=None, plan=None):
    if not _rms_kernel_covers(x.dtype, weight.dtype):
        return reference.rms_norm(x, weight, eps, residual)
    if plan is None:
        if residual is None:
            return _rms_norm_fresh_op(x, weight, float(eps)), x
        return _fused_add_rms_norm_fresh_op(x, residual, weight, float(eps))
    if (not isinstance(plan, RmsNormPlan) or plan.x_shape != tuple(x.shape) or plan.dtype != x.dtype
          or plan.weight_dtype != weight.dtype or (residual is not None and not plan.with_residual)):
        raise ValueError(f"this rms_norm plan does not fit x {tuple(x.shape)} {x.dtype}, weight {weight.dtype}"
                         f"{', residual' if residual is not None else ''}: {plan}")
    _rms_norm_op(x, residual, weight, float(eps), plan.out, plan.residual_out, plan.plan_id)
    return plan.out, (plan.residual_out if residual is not None else x)


def plan_swiglu_mlp(x_shape, gate_up_weight, down_weight):
    """No CUDA-C kernel: the fallback backend's plan (Triton's), or None."""
    return _fallback_plan("plan_swiglu_mlp", x_shape, gate_up_weight, down_weight)


def swiglu_mlp(x, gate_up_weight, down_weight, plan=None):
    extra = {} if plan is None else {"plan": plan}
    return _fallback.swiglu_mlp(x, gate_up_weight, down_weight, **extra)


def plan_aggregate_features(rows, anchors, weight_cat):
    """The (rows, H) output and argument struct for aggregate_features over anchors shaped like ``anchors``
    (see :class:`AggregatePlan`); None where the kernel does not cover the dtype."""
    if not _kernel_dtypes(anchors):
        return None
    return _plan_aggregate(int(rows), tuple(anchors.shape), anchors.dtype, anchors.device)


def aggregate_features(anchors, weight_cat, row_slots, row_types, plan=None):
    if not _kernel_dtypes(anchors):
        return reference.aggregate_features(anchors, weight_cat, row_slots, row_types)
    rows = row_slots.shape[0]
    if plan is None:
        return _aggregate_features_fresh_op(anchors, weight_cat, row_slots, row_types)
    if not isinstance(plan, AggregatePlan) or plan.rows != rows or plan.dtype != anchors.dtype:
        raise ValueError(f"this aggregate_features plan does not fit {rows} rows of {anchors.dtype}: {plan}")
    _aggregate_features_op(anchors, weight_cat, row_slots, row_types, plan.out, plan.plan_id)
    return plan.out
