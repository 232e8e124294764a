"""Benchmark aggregate_features (the draft module's multi-depth aggregation) on every backend.

Rows mimic one SPD cycle: one row per in-flight depth plus the committed row, types spread over all m.
GB/s counts each distinct type's weight block read once plus the anchors and the output.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import _timing  # noqa: E402

SHAPES = {"smollm2-135m": (576, 5), "llama3.2-1b": (2048, 5)}  # (H, m)
ROWS = (1, 5, 9)
SLOTS = 64


def main():
    args, device, copy_gbps = _timing.start(__doc__, Path(__file__).name)
    from spd_engine import ops

    dtype = torch.bfloat16
    rows = []
    for model, (hidden, m) in SHAPES.items():
        anchors = torch.randn(SLOTS, m, hidden, dtype=dtype, device=device)
        weight_cat = torch.randn(hidden, hidden * m * (m + 1) // 2, dtype=dtype, device=device) * 0.02
        for n in ROWS:
            row_slots = torch.arange(n, dtype=torch.int32, device=device)
            row_types = torch.arange(n, dtype=torch.int32, device=device).remainder(m).flip(0).contiguous()
            calls = {b: (lambda b=b: ops.aggregate_features(anchors, weight_cat, row_slots, row_types, backend=b))
                     for b in _timing.available_backends()}
            types = row_types.unique().tolist()
            weight_elements = sum((t + 1) * hidden * hidden for t in types)
            anchor_elements = sum((t + 1) * hidden for t in row_types.tolist())
            nbytes = anchors.element_size() * (weight_elements + anchor_elements + n * hidden)
            rows += _timing.measure(calls, nbytes, copy_gbps, args.warmup, args.repeats, model=model, rows=n,
                                    dtype=str(dtype))
    _timing.write_record(args.out, "aggregate_features", copy_gbps, rows)


if __name__ == "__main__":
    main()
