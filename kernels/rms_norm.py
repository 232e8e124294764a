"""Fused residual add + RMSNorm (Triton), HF numerics: the sum is rounded to x's dtype (it is the new
residual stream), the mean of squares and the scaling run in fp32, the normalised value is rounded to x's
dtype before the weight multiply, and the product is rounded once to torch.promote_types(weight, x).

One program per row, the whole row in registers: one read of x (+ residual), one write of the new
residual and of the output.

``plan`` allocates the outputs once (host side); ``run`` launches into them without allocating.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    X, RESIDUAL, WEIGHT, OUT, RESIDUAL_OUT, hidden, eps,
    stride_x, stride_residual, stride_out, stride_residual_out,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(RESIDUAL + row * stride_residual + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(X.dtype.element_ty)
        tl.store(RESIDUAL_OUT + row * stride_residual_out + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
    normed = (x * inv_rms).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(WEIGHT + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_out + offs, (w * normed).to(OUT.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    t = t.reshape(-1, hidden)
    return t if t.stride(-1) == 1 else t.contiguous()


@dataclass(frozen=True)
class RmsNormPlan:
    """Outputs for inputs of ``x_shape``, allocated once (plan); ``run`` launches into them."""
    x_shape: tuple[int, ...]
    dtype: torch.dtype
    weight_dtype: torch.dtype
    out: torch.Tensor
    residual_out: torch.Tensor | None  # None: the plan serves calls without a residual only


def plan(x_shape, dtype: torch.dtype, weight_dtype: torch.dtype, with_residual: bool, device) -> RmsNormPlan:
    x_shape = tuple(x_shape)
    out = torch.empty(x_shape, dtype=torch.promote_types(weight_dtype, dtype), device=device)
    residual_out = torch.empty(x_shape, dtype=dtype, device=device) if with_residual else None
    return RmsNormPlan(x_shape, dtype, weight_dtype, out, residual_out)


def run(rms_plan: RmsNormPlan, x, weight, eps, residual=None):
    """rms_norm into ``rms_plan.out`` (and ``residual_out``): returns (normed, new_residual), as rms_norm."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be ({hidden},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype")
    p = rms_plan
    if (p.x_shape != tuple(x.shape) or p.dtype != x.dtype or p.weight_dtype != weight.dtype
            or (residual is not None and p.residual_out is None)):
        raise ValueError(f"this rms_norm plan is for x {p.x_shape} {p.dtype}, weight {p.weight_dtype}"
                         f"{'' if p.residual_out is not None else ', no residual'}; got x {tuple(x.shape)} {x.dtype}, "
                         f"weight {weight.dtype}{', residual' if residual is not None else ''}")
    x_rows = _rows(x, hidden)
    new_residual = p.residual_out if residual is not None else x
    residual_rows = _rows(residual, hidden) if residual is not None else x_rows
    residual_out_rows = new_residual.view(-1, hidden) if residual is not None else x_rows
    block = triton.next_power_of_2(hidden)
    if x_rows.shape[0] > 0:
        _rms_norm_kernel[(x_rows.shape[0],)](
            x_rows, residual_rows, weight.contiguous(), p.out.view(-1, hidden), residual_out_rows, hidden, float(eps),
            x_rows.stride(0), residual_rows.stride(0), hidden, residual_out_rows.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        )
    return p.out, new_residual


def rms_norm(x, weight, eps, residual=None):
    """See spd_engine.ops.reference.rms_norm: returns (normed, new_residual). One plan and one run."""
    return run(plan(x.shape, x.dtype, weight.dtype, residual is not None, x.device), x, weight, eps, residual)
