"""Data-parallel ``train-pdm --cache`` on the CPU: 1 rank vs 2 ranks (gloo) on the same global batch.

    python bench/bench_ddp_train.py --cache bench/data/distill_v4 --out bench/results/ddp_train_cpu.json

Three launches of the same run (default model, n=4, the same seed, steps and global batch), all through
``torchrun ... train-pdm --distributed`` so only the rank and thread counts differ:

* 1 rank, 1 thread; 1 rank, 2 threads; 2 ranks, 1 thread each.

Reported per launch: the report's ``train_seconds`` (the steps alone: batch reads, forward, backward, gradient
all-reduce, optimiser; no model loading or validation), answer tokens per second over them, and the whole
launch's wall time. The load average is recorded before and after: on a shared machine it says how many other
processes competed for the same cores.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = (("1 rank, 1 thread", 1, 1), ("1 rank, 2 threads", 1, 2), ("2 ranks, 1 thread each", 2, 1))


def launch(ranks: int, threads: int, args, out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               "-m", "spd_engine", "train-pdm", "--distributed", "--model", args.model, "--cache", args.cache,
               "--out", str(out), "--stages", "4", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--max-rows", str(args.max_rows), "--draft-vocab", "8192", "--lr", "1e-3", "--fill-mix", "regime",
               "--normalize-anchors", "--val-fraction", "0.01", "--checkpoint-every", str(args.steps), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"launch failed ({ranks} ranks, {threads} threads):\n{done.stderr[-3000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"ranks": ranks, "threads_per_rank": threads, "train_seconds": report["train_seconds"],
            "seconds_per_step": report["train_seconds"] / report["steps"],
            "answer_tokens_per_s": report["answer_tokens_seen"] / report["train_seconds"],
            "answer_tokens_seen": report["answer_tokens_seen"], "wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="the global batch")
    parser.add_argument("--max-rows", type=int, default=128)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    results = {"what": "train-pdm --cache --distributed, 1 vs 2 ranks (gloo), same global batch",
               "commit": commit, "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
               "model": args.model, "steps": args.steps, "global_batch": args.batch_size, "max_rows": args.max_rows,
               "load_average_before": os.getloadavg(), "launches": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, ranks, threads in LAUNCHES:
            results["launches"][name] = launch(ranks, threads, args, Path(scratch) / name.replace(" ", "_"))
            print(name, json.dumps(results["launches"][name]), file=sys.stderr)
    results["load_average_after"] = os.getloadavg()
    one = results["launches"]["1 rank, 1 thread"]["answer_tokens_per_s"]
    results["speedup_vs_1_rank_1_thread"] = {name: r["answer_tokens_per_s"] / one
                                             for name, r in results["launches"].items()}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["speedup_vs_1_rank_1_thread"]))


if __name__ == "__main__":
    main()
