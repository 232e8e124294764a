"""Kernel launches per decoder layer in a one-token stage forward, per backend.

On a GPU the count is the profiler's (every CUDA kernel the stage launches). On the CPU it is reconstructed:
Triton kernel launches (interpreted) are counted at the launch site, and every other op that would launch a
kernel on a GPU (aten compute ops: GEMVs, adds, copies) is counted by a dispatch hook; views and metadata ops
launch nothing and are skipped.

    python bench/count_launches.py --model default --out bench/results/launches_cpu.json

Every backend is counted by default (torch, triton, cuda); one that cannot serve the device (the cuda backend
on a CPU, an extension that is not built) is listed under "skipped" with the reason.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

METADATA_OPS = {"view", "_unsafe_view", "reshape", "split", "split_with_sizes", "slice", "select", "unsqueeze",
                "squeeze", "expand", "as_strided", "t", "transpose", "permute", "detach", "alias", "lift_fresh",
                "empty", "empty_like", "empty_strided", "unbind", "chunk", "narrow", "promote_types", "result_type"}


class DispatchCounter(TorchDispatchMode):
    """Counts aten ops that do work (would launch a kernel), outside Triton launches."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and func.overloadpacket.__name__ not in METADATA_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_triton_launches(counter: DispatchCounter):
    """Wrap Triton's launch entry points (JIT and interpreter) so each launch counts once, and ops run by the
    interpreter inside a launch are not counted again."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    patched = []
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            counter.count += 1
            counter.paused += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                counter.paused -= 1

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


def count_cpu(model, layers: int) -> int:
    cache = model.new_cache(64)
    token = torch.tensor([[1]], device=model.device)
    with torch.inference_mode():
        hidden = model.embed(token)
        model.forward_layers(hidden, 0, layers, cache)  # warm-up (autotuning, compilation)
        cache.reset()
        counter = DispatchCounter()
        with count_triton_launches(counter), counter:
            model.forward_layers(hidden, 0, layers, cache)
    return counter.count


def count_gpu(model, layers: int) -> int:
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(64)
    token = torch.tensor([[1]], device=model.device)
    with torch.inference_mode():
        hidden = model.embed(token)
        model.forward_layers(hidden, 0, layers, cache)
        torch.cuda.synchronize()
        cache.reset()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.forward_layers(hidden, 0, layers, cache)
            torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--layers", type=int, default=4, help="run layers [0, N) for one token")
    parser.add_argument("--backends", nargs="+", default=["torch", "triton", "cuda"],
                        choices=["torch", "triton", "cuda"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu" and "triton" in args.backends:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from spd_engine import Engine, ops

    results = {"model": args.model, "device": args.device, "layers": args.layers, "per_layer": {}, "skipped": {}}
    for backend in args.backends:
        reason = ops.usable_reason(backend, torch.device(args.device))
        if reason:
            results["skipped"][backend] = reason
            print(f"{backend:>6}: skipped ({reason})", file=sys.stderr)
            continue
        model = Engine.load(args.model, device=args.device, dtype="float32" if args.device == "cpu" else "bfloat16",
                            backend=backend).model
        count = count_gpu(model, args.layers) if args.device == "cuda" else count_cpu(model, args.layers)
        results["per_layer"][backend] = count / args.layers
        print(f"{backend:>6}: {count} launches for {args.layers} layers = {count / args.layers:.1f} per layer",
              file=sys.stderr)
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
