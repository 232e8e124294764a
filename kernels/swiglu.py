"""SwiGLU MLP for batch-1 decoding (Triton): down(silu(x Wg^T) * (x Wu^T)) with Wg | Wu stacked (2F, H).

Up to MAX_GEMV_ROWS rows, one kernel reads each gate row and its matching up row once, accumulates both
GEMVs in fp32 and applies SiLU·mul in registers, so the (rows, 2F) gate/up activation never goes to memory.
The down projection stays with torch (cuBLAS): it is a plain GEMV with nothing to fuse, and cuBLAS's
GEMV already runs near copy bandwidth at these shapes, so a Triton copy of it would not beat it. More rows
are GEMM territory, where cuBLAS wins outright, so the whole op goes to the torch reference.

``plan`` allocates the activation and the output once (host side); ``run`` launches into them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from spd_engine.ops import reference

from .common import dot_precision

MAX_GEMV_ROWS = 8
BLOCK_ROWS = 16  # tl.dot needs 16 rows; the padding rows are masked and cost no memory traffic
BLOCK_F = 16  # output features per program: F / 16 programs keep every SM busy for small models
BLOCK_K = 128


@triton.jit
def _gate_up_silu_kernel(
    X, W, ACT, rows, hidden, ffn, stride_x, stride_w, stride_act,
    BLOCK_ROWS: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_r = tl.arange(0, BLOCK_ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    f_valid = offs_f < ffn
    gate = tl.zeros([BLOCK_ROWS, BLOCK_F], dtype=tl.float32)
    up = tl.zeros([BLOCK_ROWS, BLOCK_F], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + offs_k
        k_valid = k < hidden
        x = tl.load(X + offs_r[:, None] * stride_x + k[None, :],
                    mask=(offs_r < rows)[:, None] & k_valid[None, :], other=0.0)
        w_mask = k_valid[:, None] & f_valid[None, :]
        w_gate = tl.load(W + offs_f[None, :].to(tl.int64) * stride_w + k[:, None], mask=w_mask, other=0.0)
        w_up = tl.load(W + (offs_f + ffn)[None, :].to(tl.int64) * stride_w + k[:, None], mask=w_mask, other=0.0)
        gate += tl.dot(x, w_gate, input_precision=DOT_PRECISION)
        up += tl.dot(x, w_up, input_precision=DOT_PRECISION)
    act = gate * tl.sigmoid(gate) * up
    tl.store(ACT + offs_r[:, None] * stride_act + offs_f[None, :], act.to(ACT.dtype.element_ty),
             mask=(offs_r < rows)[:, None] & f_valid[None, :])


@dataclass(frozen=True)
class SwigluPlan:
    """The (rows, F) activation and the output for inputs of ``x_shape`` (at most MAX_GEMV_ROWS rows),
    allocated once (plan); ``run`` launches the fused kernel and the down projection (torch.mm ``out=``) into
    them."""
    x_shape: tuple[int, ...]
    dtype: torch.dtype
    act: torch.Tensor
    out: torch.Tensor


def covers(x_shape) -> bool:
    """Whether the fused kernel serves inputs of this shape (else the whole op is the torch reference's)."""
    hidden = x_shape[-1]
    rows = math.prod(x_shape[:-1]) if hidden else 0
    return 0 < rows <= MAX_GEMV_ROWS


def _check(x, gate_up_weight, down_weight):
    hidden = x.shape[-1]
    two_ffn, w_hidden = gate_up_weight.shape
    if w_hidden != hidden or two_ffn % 2 or down_weight.shape[1] != two_ffn // 2:
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, gate_up {tuple(gate_up_weight.shape)}, "
                         f"down {tuple(down_weight.shape)}")
    if gate_up_weight.dtype != x.dtype:
        raise ValueError("gate_up_weight must have x's dtype")


def plan(x_shape, ffn: int, out_features: int, dtype: torch.dtype, device) -> SwigluPlan:
    x_shape = tuple(x_shape)
    rows = math.prod(x_shape[:-1])
    act = torch.empty((rows, ffn), dtype=dtype, device=device)
    out = torch.empty((*x_shape[:-1], out_features), dtype=dtype, device=device)
    return SwigluPlan(x_shape, dtype, act, out)


def run(swiglu_plan: SwigluPlan, x, gate_up_weight, down_weight):
    """swiglu_mlp into ``swiglu_plan.out`` (returned)."""
    _check(x, gate_up_weight, down_weight)
    p = swiglu_plan
    ffn = gate_up_weight.shape[0] // 2
    if (p.x_shape != tuple(x.shape) or p.dtype != x.dtype or p.act.shape[1] != ffn
            or p.out.shape[-1] != down_weight.shape[0] or down_weight.dtype != x.dtype):
        raise ValueError(f"this swiglu plan is for x {p.x_shape} {p.dtype}, F {p.act.shape[1]}, "
                         f"{p.out.shape[-1]} outputs; got x {tuple(x.shape)} {x.dtype}, F {ffn}, "
                         f"{down_weight.shape[0]} outputs")
    hidden = x.shape[-1]
    rows = p.act.shape[0]
    x_rows = x.reshape(rows, hidden)
    x_rows = x_rows if x_rows.stride(-1) == 1 else x_rows.contiguous()
    weight = gate_up_weight if gate_up_weight.stride(-1) == 1 else gate_up_weight.contiguous()
    _gate_up_silu_kernel[(triton.cdiv(ffn, BLOCK_F),)](
        x_rows, weight, p.act, rows, hidden, ffn, x_rows.stride(0), weight.stride(0), p.act.stride(0),
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_F=BLOCK_F, BLOCK_K=BLOCK_K, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=4,
    )
    torch.mm(p.act, down_weight.t(), out=p.out.view(rows, down_weight.shape[0]))
    return p.out


def swiglu_mlp(x, gate_up_weight, down_weight):
    """See spd_engine.ops.reference.swiglu_mlp. One plan and one run (the reference past MAX_GEMV_ROWS rows)."""
    if not covers(x.shape):
        return reference.swiglu_mlp(x, gate_up_weight, down_weight)
    _check(x, gate_up_weight, down_weight)
    return run(plan(x.shape, gate_up_weight.shape[0] // 2, down_weight.shape[0], x.dtype, x.device), x,
               gate_up_weight, down_weight)
