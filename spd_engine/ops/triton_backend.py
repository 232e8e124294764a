"""Triton backend of the op API: the kernels in kernels/, behind the reference signatures.

Importing this module imports Triton; on a machine without it the ImportError makes dispatch fall back.
"""
from __future__ import annotations

from kernels import aggregate as _aggregate
from kernels import attention as _attention
from kernels import rms_norm as _rms_norm
from kernels import swiglu as _swiglu


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                           softmax_scale=None, causal=True):
    return _attention.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
                                             softmax_scale, causal)


def rms_norm(x, weight, eps, residual=None):
    return _rms_norm.rms_norm(x, weight, eps, residual)


def swiglu_mlp(x, gate_up_weight, down_weight):
    return _swiglu.swiglu_mlp(x, gate_up_weight, down_weight)


def aggregate_features(anchors, weight_cat, row_slots, row_types):
    return _aggregate.aggregate_features(anchors, weight_cat, row_slots, row_types)
