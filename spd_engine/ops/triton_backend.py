"""Triton backend of the op API: the kernels in kernels/, behind the reference signatures.

The kernels cover float32/float16/bfloat16 (and head dims that are powers of two in [32, 256] for
attention); anything else, e.g. float64, runs the torch reference. Importing this module imports Triton;
on a machine without it the ImportError makes dispatch fall back.
"""
from __future__ import annotations

import torch

from spd_engine.kernels import aggregate as _aggregate
from spd_engine.kernels import attention as _attention
from spd_engine.kernels import rms_norm as _rms_norm
from spd_engine.kernels import swiglu as _swiglu

from . import reference

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _attention_kernel_covers(dtype: torch.dtype, head_dim: int) -> bool:
    return dtype in KERNEL_DTYPES and 32 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def plan_attention(q_shape, k_cache, v_cache):
    """The kernel's split-KV plan and workspaces for this q shape over these caches (None where the torch
    reference runs instead: it needs none)."""
    if not _attention_kernel_covers(k_cache.dtype, q_shape[-1]):
        return None
    return _attention.plan(tuple(q_shape), k_cache.shape[2], k_cache.shape[1], k_cache.dtype, k_cache.device)


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                           softmax_scale=None, causal=True, plan=None):
    if not _attention_kernel_covers(q.dtype, q.shape[-1]):
        return reference.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                                softmax_scale, causal)
    if plan is None:
        return _attention.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                                 softmax_scale, causal)
    return _attention.run(plan, q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale,
                          causal)


def plan_rms_norm(x_shape, dtype, weight, with_residual=True):
    """Outputs for rms_norm of x (``x_shape``, ``dtype``) by ``weight`` (None where the reference runs)."""
    if dtype not in KERNEL_DTYPES:
        return None
    return _rms_norm.plan(x_shape, dtype, weight.dtype, with_residual, weight.device)


def rms_norm(x, weight, eps, residual=None, plan=None):
    if x.dtype not in KERNEL_DTYPES:
        return reference.rms_norm(x, weight, eps, residual)
    if plan is None:
        return _rms_norm.rms_norm(x, weight, eps, residual)
    return _rms_norm.run(plan, x, weight, eps, residual)


def plan_swiglu_mlp(x_shape, gate_up_weight, down_weight):
    """The fused kernel's activation and output buffers for x of ``x_shape`` (None where the reference runs:
    other dtypes, or more rows than a GEMV)."""
    if gate_up_weight.dtype not in KERNEL_DTYPES or not _swiglu.covers(tuple(x_shape)):
        return None
    return _swiglu.plan(x_shape, gate_up_weight.shape[0] // 2, down_weight.shape[0], gate_up_weight.dtype,
                        gate_up_weight.device)


def swiglu_mlp(x, gate_up_weight, down_weight, plan=None):
    if x.dtype not in KERNEL_DTYPES:
        return reference.swiglu_mlp(x, gate_up_weight, down_weight)
    if plan is None:
        return _swiglu.swiglu_mlp(x, gate_up_weight, down_weight)
    return _swiglu.run(plan, x, gate_up_weight, down_weight)


def plan_aggregate_features(rows, anchors, weight_cat):
    """The (rows, H) output for aggregate_features over anchors like ``anchors`` (None where the reference runs)."""
    if anchors.dtype not in KERNEL_DTYPES:
        return None
    return _aggregate.plan(rows, anchors.shape[2], anchors.dtype, anchors.device)


def aggregate_features(anchors, weight_cat, row_slots, row_types, plan=None):
    if anchors.dtype not in KERNEL_DTYPES:
        return reference.aggregate_features(anchors, weight_cat, row_slots, row_types)
    if plan is None:
        return _aggregate.aggregate_features(anchors, weight_cat, row_slots, row_types)
    return _aggregate.run(plan, anchors, weight_cat, row_slots, row_types)
