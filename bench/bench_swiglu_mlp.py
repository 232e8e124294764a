"""Benchmark swiglu_mlp at batch-1 decode shapes on every backend.

GB/s counts the gate/up and down weights read once (activations are negligible at these row counts).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _timing  # noqa: E402

SHAPES = {"smollm2-135m": (576, 1536), "llama3.2-1b": (2048, 8192), "llama3-8b": (4096, 14336)}  # (H, F)
ROWS = (1, 5)


def main():
    args, device, copy_gbps = _timing.start(__doc__, Path(__file__).name)
    from spd_engine import ops

    dtype = torch.bfloat16
    rows = []
    for model, (hidden, ffn) in SHAPES.items():
        gate_up = torch.randn(2 * ffn, hidden, dtype=dtype, device=device) * hidden ** -0.5
        down = torch.randn(hidden, ffn, dtype=dtype, device=device) * ffn ** -0.5
        for n in ROWS:
            x = torch.randn(n, hidden, dtype=dtype, device=device)
            calls = {b: (lambda b=b: ops.swiglu_mlp(x, gate_up, down, backend=b)) for b in _timing.available_backends()}
            nbytes = gate_up.element_size() * (3 * ffn * hidden)
            rows += _timing.measure(calls, nbytes, copy_gbps, args.warmup, args.repeats, model=model, rows=n,
                                    dtype=str(dtype))
    _timing.write_record(args.out, "swiglu_mlp", copy_gbps, rows)


if __name__ == "__main__":
    main()
