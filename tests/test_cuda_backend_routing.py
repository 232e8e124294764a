"""The cuda backend's routing of inputs its kernels do not cover, checked on the CPU.

The CUDA kernels take float32/float16/bfloat16 and head dims 64/128; everything else must reach an
implementation that accepts it (the Triton backend, whose own gaps go to the torch reference) instead of a raw
kernel that does not compile for it. The routing runs before any launch, so a stand-in for the compiled
extension is enough to import the backend here.
"""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from spd_engine import ops
from spd_engine.ops import reference


@pytest.fixture(scope="module")
def cuda_backend():
    pytest.importorskip("triton")
    if ops.available("cuda"):  # the extension is built (nvcc was present at install time)
        yield ops._load("cuda")
        return
    sys.modules["spd_engine._C"] = types.ModuleType("spd_engine._C")
    try:
        yield importlib.import_module("spd_engine.ops.cuda_backend")
    finally:
        # Never leave the stand-in visible: dispatch must keep finding the cuda backend unavailable here.
        del sys.modules["spd_engine._C"]
        sys.modules.pop("spd_engine.ops.cuda_backend", None)
        ops._load.cache_clear()
        assert not ops.available("cuda")


def attention_inputs(dtype, head_dim, Tq=1, lengths=(5, 2)):
    B, S, Hq, Hkv = len(lengths), 16, 4, 2
    q = torch.randn(B, Tq, Hq, head_dim, dtype=dtype)
    k, v = torch.randn(B, Tq, Hkv, head_dim, dtype=dtype), torch.randn(B, Tq, Hkv, head_dim, dtype=dtype)
    k_cache, v_cache = torch.randn(B, S, Hkv, head_dim, dtype=dtype), torch.randn(B, S, Hkv, head_dim, dtype=dtype)
    positions = torch.arange(S, dtype=torch.float32)[:, None] * torch.rand(head_dim // 2)
    return q, k_cache, v_cache, k, v, torch.tensor(lengths, dtype=torch.int32), positions.cos(), positions.sin()


@pytest.mark.parametrize("dtype,head_dim", [(torch.float64, 64), (torch.float32, 16), (torch.float64, 24)],
                         ids=["float64", "head_dim16", "float64_head_dim24"])
def test_attention_outside_the_kernels_matches_the_reference(cuda_backend, dtype, head_dim):
    inputs = attention_inputs(dtype, head_dim)
    expected_inputs = [t.clone() for t in inputs]
    out = cuda_backend.attention_with_kvcache(*inputs)
    expected = reference.attention_with_kvcache(*expected_inputs)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(inputs[1], expected_inputs[1])  # the new k was appended the same way


def test_swiglu_in_float64_matches_the_reference(cuda_backend):
    x = torch.randn(3, 1, 40, dtype=torch.float64)
    gate_up, down = torch.randn(2 * 24, 40, dtype=torch.float64), torch.randn(40, 24, dtype=torch.float64)
    torch.testing.assert_close(cuda_backend.swiglu_mlp(x, gate_up, down), reference.swiglu_mlp(x, gate_up, down))


def test_rms_norm_and_aggregate_in_float64_match_the_reference(cuda_backend):
    x, residual = torch.randn(3, 40, dtype=torch.float64), torch.randn(3, 40, dtype=torch.float64)
    weight = torch.randn(40, dtype=torch.float64)
    got, want = cuda_backend.rms_norm(x, weight, 1e-5, residual), reference.rms_norm(x, weight, 1e-5, residual)
    for actual, expected in zip(got, want):
        torch.testing.assert_close(actual, expected)
    anchors, weight_cat = torch.randn(4, 2, 8, dtype=torch.float64), torch.randn(8, 24, dtype=torch.float64)
    slots, types_ = torch.tensor([0, 3, 1]), torch.tensor([1, 0, 1])
    torch.testing.assert_close(cuda_backend.aggregate_features(anchors, weight_cat, slots, types_),
                               reference.aggregate_features(anchors, weight_cat, slots, types_))

