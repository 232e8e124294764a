"""Benchmark rms_norm with the fused residual add on every backend.

GB/s counts x, residual and weight read once and the output and new residual written once.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _timing  # noqa: E402

HIDDEN_SIZES = (576, 2048, 4096)
ROWS = (1, 5, 64)


def main():
    args, device, copy_gbps = _timing.start(__doc__, Path(__file__).name)
    from spd_engine import ops

    dtype = torch.bfloat16
    rows = []
    for hidden in HIDDEN_SIZES:
        weight = torch.randn(hidden, dtype=dtype, device=device)
        for n in ROWS:
            x = torch.randn(n, hidden, dtype=dtype, device=device)
            residual = torch.randn_like(x)
            calls = {b: (lambda b=b: ops.rms_norm(x, weight, 1e-5, residual, backend=b))
                     for b in _timing.available_backends()}
            nbytes = x.element_size() * (4 * n * hidden + hidden)
            rows += _timing.measure(calls, nbytes, copy_gbps, args.warmup, args.repeats, hidden=hidden, rows=n,
                                    dtype=str(dtype))
    _timing.write_record(args.out, "rms_norm", copy_gbps, rows)


if __name__ == "__main__":
    main()
