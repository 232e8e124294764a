"""Small Triton helpers shared by the kernels in this package."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_options(dtype: torch.dtype) -> tuple[str, bool]:
    """(input_precision, upcast) for tl.dot on operands of ``dtype``.

    fp32 operands use "ieee": TF32 would miss the fp32 tolerance. The CPU interpreter multiplies bf16
    operands as their raw uint16 storage, so there (and only there) bf16 operands are upcast to fp32 first.
    """
    upcast = interpreted() and dtype == torch.bfloat16
    return ("ieee" if dtype == torch.float32 or upcast else "tf32"), upcast


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def rotate_half(x1, x2, COS, SIN, offsets, mask):
    """HF non-interleaved rotary on the two halves of a head: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).

    ``offsets`` index the (positions, head_dim / 2) cos/sin tables; masked-off entries stay unrotated.
    """
    c = tl.load(COS + offsets, mask=mask, other=1.0).to(tl.float32)
    s = tl.load(SIN + offsets, mask=mask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s
