"""PDM training throughput, before and after the feature cache, measured in one run on the same rows.

    OMP_NUM_THREADS=1 python bench/bench_train_throughput.py --cache bench/data/distill_v4 \\
        --out bench/results/train_throughput_cpu.json

* **before** (train-pdm --data): every step runs the frozen target over the batch (:func:`train.target_pass`)
  for the anchors and the teacher's logits, then the PDM with every position scored, fills 50/50;
* **after** (train-pdm --cache): the anchors and the last layer's output come from the memory-mapped cache, the
  teacher is recomputed through the frozen norm and head over the draft vocabulary only, the queries start at
  the first answer token, fills per position; float32 and ``--bf16`` autocast.

Same PDM shape (n = --stages, default 4; anchors at 0 and the stage ends; L_s=1; draft vocab --draft-vocab,
default 8192), the same conversations (one batch of 8, cut to their first ``--rows`` rows so the old
fixed-length layout applies), medians of ``--repeats`` steps.
Reported: rows/s (every position the step computes) and scored tokens/s (positions that carry loss), per
thread.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spd_engine import train  # noqa: E402
from spd_engine.engine import Engine  # noqa: E402
from spd_engine.feature_cache import FeatureCache  # noqa: E402
from spd_engine.pdm import PDM  # noqa: E402
from spd_engine.stages import partition_layers  # noqa: E402


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--model", default="default", help="the target the cache was built with")
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    engine = Engine.load(args.model)
    target = engine.model
    bounds = partition_layers(target.config.num_layers, args.stages, None)
    anchors = train.boundary_anchors(bounds)
    cache = FeatureCache(args.cache, target.config, anchors)
    picked = [i for i, s in enumerate(cache.sequences) if s.rows >= args.rows][:8]
    if len(picked) < 8:
        raise SystemExit(f"bench_train_throughput: error: the cache has {len(picked)} conversations of "
                         f">= {args.rows} tokens; 8 are needed (lower --rows)")
    batch = cache.batch(picked, args.rows)
    # the same conversations' first `rows` tokens, for the old path's fixed-length sequences
    window = [cache.sequences[i].tokens[cache.sequences[i].rows - args.rows: cache.sequences[i].rows] for i in picked]
    ids = torch.tensor(window)
    pdm = PDM.create(target, bounds, anchors, 1, torch.arange(min(args.draft_vocab, target.config.vocab_size)),
                     seed=0)
    train._set_trainable(pdm, pdm.state_dict())
    optimizer = torch.optim.AdamW(pdm.trainable(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rows, scored = ids.numel(), int(batch.scored.sum())
    generator = torch.Generator().manual_seed(0)

    old = train.Distiller(target, pdm)

    def before():
        outputs = train.target_pass(target, ids, anchors, pdm.draft_vocab)
        train._train_step(old, optimizer, scheduler, [(outputs, None)], train.pick_fill(generator, args.stages))

    new = train.CacheDistiller(target, pdm, 1.0 / cache.channel_rms())
    probabilities = train.fill_probabilities(args.stages, "regime", 0.6)

    def after():
        fill = train._fills(generator, probabilities, batch.anchors.shape[1], True)
        train._train_step(new, optimizer, scheduler, [(new.outputs(cache.batch(picked, args.rows)), batch.scored)],
                          fill)

    results = {}
    for name, step, counted in (("before_target_per_step", before, rows), ("after_cache_fp32", after, scored)):
        seconds = median_seconds(step, args.repeats)
        results[name] = {"seconds_per_step": seconds, "rows_per_s": rows / seconds,
                         "scored_tokens_per_s": counted / seconds}
    new.autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    seconds = median_seconds(after, args.repeats)
    results["after_cache_bf16"] = {"seconds_per_step": seconds, "rows_per_s": rows / seconds,
                                   "scored_tokens_per_s": scored / seconds}
    base = results["before_target_per_step"]["scored_tokens_per_s"]
    for record in results.values():
        record["speedup_scored_tokens"] = record["scored_tokens_per_s"] / base
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"device": "cpu", "threads": torch.get_num_threads(), "commit": commit,
              "date": datetime.date.today().isoformat(), "model": args.model, "stages": args.stages,
              "draft_vocab": int(pdm.draft_vocab.numel()), "batch": len(picked), "rows_per_sequence": args.rows,
              "scored_tokens_per_step": scored, "rows_per_step": rows, "results": results,
              "note": "before scores every position (the old loss); after scores answer tokens only"}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
