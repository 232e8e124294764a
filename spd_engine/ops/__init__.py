"""The op API: one signature per op, three backends (torch reference | triton | cuda).

``backend="auto"`` picks the CUDA extension when it is built and the tensors live on a GPU, else Triton on a
GPU, else the torch reference. Backends are imported lazily so a machine without Triton or the compiled
extension still runs everything on torch.
"""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

from . import reference

BACKENDS = ("auto", "torch", "triton", "cuda")
OPS = ("attention_with_kvcache", "rms_norm", "swiglu_mlp", "aggregate_features")


class BackendUnavailable(RuntimeError):
    pass


@lru_cache(maxsize=None)
def _load(backend: str):
    if backend == "torch":
        return reference
    module = {"triton": "spd_engine.ops.triton_backend", "cuda": "spd_engine.ops.cuda_backend"}[backend]
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # missing triton, missing extension, or backend not written yet
        raise BackendUnavailable(f"backend '{backend}' is not available: {exc}") from exc


def available(backend: str) -> bool:
    try:
        _load(backend)
        return True
    except BackendUnavailable:
        return False


def resolve(backend: str, device: torch.device) -> str:
    """Turn ``auto`` into a concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        for candidate in ("cuda", "triton"):
            if available(candidate):
                return candidate
    return "torch"


def usable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot serve tensors on ``device`` (None when it can): a check made once, up front,
    so a user gets one clear line instead of a failure deep inside a kernel launch."""
    if backend in ("auto", "torch"):
        return None
    if not available(backend):
        return f"--backend {backend} is not available on this machine"
    if backend == "cuda" and device.type != "cuda":
        return "--backend cuda needs a CUDA device (--device cuda)"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "--backend triton on the CPU runs only under the Triton interpreter: set TRITON_INTERPRET=1"
    return None


def _impl(name: str, backend: str, device: torch.device):
    return getattr(_load(resolve(backend, device)), name)


def plan_attention(q_shape, k_cache, v_cache, backend="auto"):
    """Plan (host side, once) for attention calls with queries of ``q_shape`` over these caches: the backend's
    split-KV grid from the cache capacity, and output and workspace buffers it allocates now so that a call
    with ``plan=`` only launches (FlashInfer's plan/run). None where the backend needs no plan (torch)."""
    planner = getattr(_load(resolve(backend, k_cache.device)), "plan_attention", None)
    return planner(tuple(q_shape), k_cache, v_cache) if planner else None


def attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos=None, rotary_sin=None,
                           softmax_scale=None, causal=True, backend="auto", plan=None):
    impl = _impl("attention_with_kvcache", backend, q.device)
    if plan is None:
        return impl(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, causal)
    return impl(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, softmax_scale, causal, plan=plan)


def _planned(impl, args, plan):
    return impl(*args) if plan is None else impl(*args, plan=plan)


def _plan_with(name: str, backend: str, device: torch.device, *args):
    planner = getattr(_load(resolve(backend, device)), name, None)
    return planner(*args) if planner else None


def plan_rms_norm(x_shape, dtype, weight, with_residual=True, backend="auto"):
    """Plan (host side, once) for rms_norm calls on x of ``x_shape`` and ``dtype`` by weights shaped and typed
    like ``weight`` (any layer's: the plan holds no weight), with or without a residual: the outputs, allocated
    now, and on the cuda backend the kernel's argument struct. A call with ``plan=`` writes into them and
    allocates nothing. The outputs are the plan's, so the next run overwrites them. None where the backend
    needs no plan (torch, or inputs its kernels do not cover)."""
    return _plan_with("plan_rms_norm", backend, weight.device, tuple(x_shape), dtype, weight, with_residual)


def rms_norm(x, weight, eps, residual=None, backend="auto", plan=None):
    return _planned(_impl("rms_norm", backend, x.device), (x, weight, eps, residual), plan)


def plan_swiglu_mlp(x_shape, gate_up_weight, down_weight, backend="auto"):
    """Plan for swiglu_mlp calls on x of ``x_shape`` with weights like these (see :func:`plan_rms_norm`): the
    gate/up activation and the output. None where the backend needs no plan (torch; more rows than the fused
    GEMV serves)."""
    return _plan_with("plan_swiglu_mlp", backend, gate_up_weight.device, tuple(x_shape), gate_up_weight,
                      down_weight)


def swiglu_mlp(x, gate_up_weight, down_weight, backend="auto", plan=None):
    return _planned(_impl("swiglu_mlp", backend, x.device), (x, gate_up_weight, down_weight), plan)


def plan_aggregate_features(rows, anchors, weight_cat, backend="auto"):
    """Plan for aggregate_features calls of ``rows`` output rows over anchors like ``anchors`` (see
    :func:`plan_rms_norm`): the (rows, H) output, and on the cuda backend the argument struct."""
    return _plan_with("plan_aggregate_features", backend, anchors.device, int(rows), anchors, weight_cat)


def aggregate_features(anchors, weight_cat, row_slots, row_types, backend="auto", plan=None):
    return _planned(_impl("aggregate_features", backend, anchors.device), (anchors, weight_cat, row_slots, row_types),
                    plan)


attention_with_kvcache.__doc__ = reference.attention_with_kvcache.__doc__
rms_norm.__doc__ = reference.rms_norm.__doc__
swiglu_mlp.__doc__ = reference.swiglu_mlp.__doc__
aggregate_features.__doc__ = reference.aggregate_features.__doc__
