"""Shared benchmark helpers: CUDA-event timing, the device's measured copy bandwidth, the JSON record.

Every bench_<op>.py times each backend of one op in the same run (ratios, not numbers from different
runs), reports achieved GB/s against the copy bandwidth measured in that run, and writes one JSON record.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
L2_FLUSH_BYTES = 256 << 20  # larger than any current L2, so every timed call starts from DRAM


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, help="write the JSON record here (default: print only)")
    parser.add_argument("--warmup", type=int, default=25, help="untimed calls before timing (compile, autotune)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls; the median is reported")
    return parser.parse_args()


def start(doc: str, script: str) -> tuple[argparse.Namespace, torch.device, float]:
    """Every op benchmark's preamble: parse the common flags, insist on a GPU, measure the copy bandwidth that
    is the roofline denominator of this run."""
    args = parse_args(doc.splitlines()[0])
    device = require_cuda(script)
    copy_gbps = copy_bandwidth_gbps()
    print(f"device copy bandwidth: {copy_gbps:.0f} GB/s")
    return args, device, copy_gbps


def require_cuda(script: str) -> torch.device:
    if not torch.cuda.is_available():
        sys.exit(f"{script}: needs a CUDA GPU (kernels are timed with CUDA events); none is available here.")
    return torch.device("cuda")


def time_ms(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    """Median GPU time of one call in ms: CUDA events around each call, L2 flushed before each."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in zip(starts, ends))


def copy_bandwidth_gbps(warmup: int = 5, repeats: int = 20, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate (bytes read + written per second, in GB/s): the practical roofline."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup, repeats)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure(backends: dict[str, Callable[[], object]], nbytes: int, copy_gbps: float, warmup: int, repeats: int,
            **config) -> list[dict]:
    """Times every backend on one configuration; GB/s counts the op's compulsory DRAM traffic ``nbytes``."""
    rows = []
    for backend, fn in backends.items():
        ms = time_ms(fn, warmup, repeats)
        gbps = nbytes / (ms * 1e-3) / 1e9
        rows.append(dict(config, backend=backend, ms=ms, gb_per_s=gbps, pct_of_copy_bandwidth=100 * gbps / copy_gbps))
    torch_ms = next((r["ms"] for r in rows if r["backend"] == "torch"), None)
    for row in rows:
        row["speedup_vs_torch"] = torch_ms / row["ms"] if torch_ms else None
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def available_backends() -> list[str]:
    from spd_engine import ops

    return ["torch"] + [b for b in ("triton", "cuda") if ops.available(b)]


def write_record(out: Path | None, benchmark: str, copy_gbps: float, rows: list[dict]) -> None:
    if out is None:
        return
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    record = dict(
        benchmark=benchmark,
        device=torch.cuda.get_device_name(),
        git_commit=commit or None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        copy_bandwidth_gb_per_s=copy_gbps,
        results=rows,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")
