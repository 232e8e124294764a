"""Small Triton helpers shared by the kernels in this package."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision for operands of ``dtype``: fp32 needs "ieee" (TF32 would miss the fp32
    tolerance); 16-bit operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def rotate_half(x1, x2, COS, SIN, offsets, mask):
    """HF non-interleaved rotary on the two halves of a head: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s).

    ``offsets`` index the (positions, head_dim / 2) cos/sin tables; masked-off entries stay unrotated.
    """
    c = tl.load(COS + offsets, mask=mask, other=1.0).to(tl.float32)
    s = tl.load(SIN + offsets, mask=mask, other=0.0).to(tl.float32)
    return x1 * c - x2 * s, x2 * c + x1 * s
