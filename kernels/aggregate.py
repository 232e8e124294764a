"""Multi-depth feature aggregation of the draft module (Triton), every row in one launch.

Layout (docs/ARCHITECTURE.md, "The draft module"; spd_engine/ops/reference.py):
  anchors    (S, m, H): anchors[s, j] = h_{b_j} of token slot s; read in place, any slot/type stride,
             contiguous along H.
  weight_cat (H, H m (m+1) / 2): W_0 | W_1 | ... | W_{m-1} side by side; W_i is (H, (i+1) H) and starts at
             column H i (i+1) / 2, so W_i[:, j H : (j+1) H] multiplies anchor j.
  row_slots, row_types (R,) int32/int64: the slot and the aggregation type t of each output row.
  out (R, H): out[r] = W_t . concat(anchors[slot, 0], ..., anchors[slot, t]), fp32 accumulation.

Grid (ceil(H / BLOCK_N), R): each program computes BLOCK_N output features of one row as a GEMV over the
t + 1 anchor vectors of its slot against the matching column blocks of weight_cat; rows of different types
run side by side in the same launch, and no concatenated copy of the anchors is made.

``plan`` allocates the output once (host side); ``run`` launches into it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_N = 32


@triton.jit
def _aggregate_features_kernel(
    ANCHORS, WEIGHT, ROW_SLOTS, ROW_TYPES, OUT, hidden,
    stride_anchor_slot, stride_anchor_type, stride_weight, stride_out,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1)
    n_valid = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    slot = tl.load(ROW_SLOTS + row).to(tl.int64)
    row_type = tl.load(ROW_TYPES + row).to(tl.int32)
    first_column = (row_type * (row_type + 1) // 2).to(tl.int64) * hidden
    weight_rows = WEIGHT + offs_n[:, None].to(tl.int64) * stride_weight
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(0, row_type + 1):
        anchor = ANCHORS + slot * stride_anchor_slot + j * stride_anchor_type
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + offs_k
            k_valid = k < hidden
            a = tl.load(anchor + k, mask=k_valid, other=0.0).to(tl.float32)
            w = tl.load(weight_rows + (first_column + j * hidden + k)[None, :],
                        mask=n_valid[:, None] & k_valid[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * a[None, :], 1)
    tl.store(OUT + row * stride_out + offs_n, acc.to(OUT.dtype.element_ty), mask=n_valid)


@dataclass(frozen=True)
class AggregatePlan:
    """The (rows, H) output, allocated once (plan); ``run`` launches into it."""
    rows: int
    dtype: torch.dtype
    out: torch.Tensor


def plan(rows: int, hidden: int, dtype: torch.dtype, device) -> AggregatePlan:
    return AggregatePlan(int(rows), dtype, torch.empty((int(rows), hidden), dtype=dtype, device=device))


def run(aggregate_plan: AggregatePlan, anchors, weight_cat, row_slots, row_types):
    """aggregate_features into ``aggregate_plan.out`` (returned)."""
    S, m, H = anchors.shape
    if weight_cat.shape != (H, H * m * (m + 1) // 2):
        raise ValueError(f"weight_cat must be ({H}, {H * m * (m + 1) // 2}), got {tuple(weight_cat.shape)}")
    if weight_cat.dtype != anchors.dtype:
        raise ValueError("weight_cat must have the anchors' dtype")
    if row_slots.shape != row_types.shape or row_slots.dim() != 1:
        raise ValueError("row_slots and row_types must be matching 1-D index tensors")
    if anchors.stride(-1) != 1 or weight_cat.stride(-1) != 1:
        raise ValueError("anchors and weight_cat must be contiguous along their last dimension")
    rows = row_slots.shape[0]
    out = aggregate_plan.out
    if out.shape != (rows, H) or out.dtype != anchors.dtype:
        raise ValueError(f"this aggregate plan is for {tuple(out.shape)} {out.dtype}; got {rows} rows of "
                         f"{H} {anchors.dtype}")
    if rows == 0 or H == 0:
        return out
    _aggregate_features_kernel[(triton.cdiv(H, BLOCK_N), rows)](
        anchors, weight_cat, row_slots, row_types, out, H,
        anchors.stride(0), anchors.stride(1), weight_cat.stride(0), out.stride(0),
        BLOCK_N=BLOCK_N, BLOCK_K=min(128, triton.next_power_of_2(H)), num_warps=4,
    )
    return out


def aggregate_features(anchors, weight_cat, row_slots, row_types):
    """See spd_engine.ops.reference.aggregate_features and the module docstring for the layout. One plan and
    one run."""
    return run(plan(row_slots.shape[0], anchors.shape[2], anchors.dtype, anchors.device), anchors, weight_cat,
               row_slots, row_types)
