"""Vanilla decoding vs Hugging Face transformers ``generate``: same model, prompt, dtype and device, one run.

Measures decode throughput (tokens/s after prefill, median of --repeats) for both, and reports the ratio.
On a GPU the GPU suite measures graphed paths; this script is the CPU baseline.

    python bench/bench_decode.py --model default --dtype float32 --out bench/results/decode_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from spd_engine import Engine


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_ours(engine: Engine, prompt_ids: list[int], tokens: int) -> float:
    """Decode tokens/s: the prefill is timed apart by the engine, so it is excluded here."""
    out = engine.generate(prompt_ids=prompt_ids, max_new_tokens=tokens, ignore_eos=True)
    return out.stats["decode_tokens_per_s"]


def time_transformers(model, prompt_ids: list[int], tokens: int) -> float:
    """Decode tokens/s for HF: generate(n) - generate(1) isolates the per-token cost from the prefill."""
    ids = torch.tensor([prompt_ids])

    def run(n):
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    return (tokens - 1) / max(run(tokens) - run(1), 1e-9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", default="Once upon a time, in a kingdom by the sea,")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        print("bench_decode: transformers is needed for the comparison (pip install transformers)", file=sys.stderr)
        return 2

    engine = Engine.load(args.model, device="cpu", dtype=args.dtype)
    prompt_ids = engine.encode_prompt(args.prompt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=getattr(torch, args.dtype))
    hf.generation_config.eos_token_id = None  # run to the token limit, like ours (ignore_eos)
    time_ours(engine, prompt_ids, 4)  # warm-up
    ours = [time_ours(engine, prompt_ids, args.tokens) for _ in range(args.repeats)]
    theirs = [time_transformers(hf, prompt_ids, args.tokens) for _ in range(args.repeats)]
    result = {
        "benchmark": "vanilla decode vs transformers generate",
        "device": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model, "dtype": args.dtype, "prompt_tokens": len(prompt_ids), "new_tokens": args.tokens,
        "ours_tokens_per_s": statistics.median(ours), "transformers_tokens_per_s": statistics.median(theirs),
        "ours_samples": ours, "transformers_samples": theirs,
    }
    result["ratio_ours_over_transformers"] = result["ours_tokens_per_s"] / result["transformers_tokens_per_s"]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
