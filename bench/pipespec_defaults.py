"""Choose PipeSpec's default chain and window for --model default (CPU, a few minutes).

    python bench/pipespec_defaults.py [--out bench/results/pipespec_defaults.json]

1. Screening: on the first user turn of the first prompts of each /work/shared/data/eval/*.jsonl (chat template),
   the target's own greedy answer is fed back once, and at every depth m the truncated self-draft's greedy token
   (final norm + LM head after m layers) is compared with the target's: its teacher-forced agreement.
2. Chains of two models (shallow depths 1, L/4, L/2 and the two most agreeing depths) and of three (a shallow
   draft under the most agreeing one) run PipeSpec for real, greedy, at the first window; the best chain then
   runs at the other windows. The score is the predicted speedup on one
   device per model with a free link and step times proportional to cost (predict_pipespec), from the pooled
   tokens per target pass: what the chain would gain where each model has its own device.
The winner's depth fractions and window become DEFAULT_DRAFT_FRACTIONS / DEFAULT_WINDOW in
spd_engine/modes/pipespec.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import time
from pathlib import Path

import torch

from spd_engine.decode import generate_vanilla
from spd_engine.engine import Engine
from spd_engine.modes.pipespec import generate_pipespec, predict_pipespec, truncated_draft
from spd_engine.sampling import SamplingParams
from spd_engine.simulate import LINK_PRESETS

EVAL_DIR = "/work/shared/data/eval"
GREEDY = SamplingParams()


def first_turns(per_file: int) -> list[str]:
    prompts = []
    for path in sorted(glob.glob(os.path.join(EVAL_DIR, "*.jsonl"))):
        with open(path) as f:
            prompts += [json.loads(next(f))["turns"][0] for _ in range(per_file)]
    return prompts


def depth_agreement(model, prompt_ids: list[int], answer: list[int]) -> list[float]:
    """Per depth m = 1..L, the fraction of answer positions where the m-layer self-draft's argmax is the target's
    token, with the target's answer as context (one pass, layer by layer)."""
    L = model.config.num_layers
    cache = model.new_cache(len(prompt_ids) + len(answer) + 64)
    hidden = model.embed(torch.tensor([prompt_ids + answer]))
    targets = torch.tensor(answer)
    agreement = []
    for layer in range(L):
        hidden = model.forward_layers(hidden, layer, layer + 1, cache)
        guesses = model.logits(hidden[0, len(prompt_ids) - 1:-1]).argmax(-1)
        agreement.append(float((guesses == targets).float().mean()))
    return agreement


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/pipespec_defaults.json")
    parser.add_argument("--screen-tokens", type=int, default=48)
    parser.add_argument("--run-tokens", type=int, default=24)
    parser.add_argument("--windows", default="4,2,8")
    args = parser.parse_args()
    started = time.perf_counter()
    engine = Engine.load("default", device="cpu")
    model = engine.model
    L = model.config.num_layers
    prompts = [engine.encode_prompt(text, chat=True) for text in first_turns(2)]

    with torch.inference_mode():
        answers = [generate_vanilla(model, ids, args.screen_tokens, GREEDY, eos_ids=()).token_ids for ids in prompts]
        per_prompt = [depth_agreement(model, ids, answer) for ids, answer in zip(prompts, answers)]
    agreement = {m: sum(row[m - 1] for row in per_prompt) / len(per_prompt) for m in range(1, L + 1)}
    print("teacher-forced agreement by depth:", {m: round(a, 2) for m, a in agreement.items()}, flush=True)
    # Shallow drafts run ahead fast but rarely agree; deep ones agree but barely outpace the target.
    best = sorted(range(1, L - 1), key=lambda m: -agreement[m])[:2]
    shallow = [1, L // 4, L // 2]
    chains = [[m] for m in sorted(set(shallow + best))] + [[m, best[0]] for m in shallow[:2]]
    windows = [int(w) for w in args.windows.split(",")]  # the first for every chain, the rest for the best

    def measure(layers: list[int], window: int) -> dict:
        drafts = [truncated_draft(model, m) for m in layers]
        kept = passes = draft_passes = 0
        accepted = rejected = None
        for ids in prompts[::2]:  # one prompt per eval set
            result = generate_pipespec(model, drafts, ids, args.run_tokens, GREEDY, eos_ids=(), window=window)
            stats = result.stats
            kept += len(result.token_ids) - 1
            passes += stats.target_passes
            draft_passes += sum(stats.draft_passes)
            accepted = [a + b for a, b in zip(accepted or [0] * len(stats.accepted), stats.accepted)]
            rejected = [a + b for a, b in zip(rejected or [0] * len(stats.rejected), stats.rejected)]
        pooled = dataclasses.replace(stats, tokens_per_target_pass=kept / passes)
        prediction = predict_pipespec(pooled, target_step_ms=1.0, link=LINK_PRESETS["free"])
        run = {"draft_layers": layers, "window": window, "periods": stats.periods,
               "tokens_per_target_pass": kept / passes, "predicted_speedup": prediction.speedup,
               "draft_passes_per_target_pass": draft_passes / passes,
               "level_acceptance": [None] + [a / (a + r) if a + r else None
                                             for a, r in zip(accepted[1:], rejected[1:])],
               "accepted": accepted, "rejected": rejected}
        print(json.dumps(run), flush=True)
        return run

    # Speedups are compared to 0.1: on about 70 tokens a smaller difference is noise. Ties go to the chain that
    # runs fewer draft forwards per target pass (less work, on one device or many), then to the smaller window
    # (a wider one only costs verification work).
    def rank(run):
        return round(run["predicted_speedup"], 1), -round(run["draft_passes_per_target_pass"], 1), -run["window"]

    runs = [measure(layers, windows[0]) for layers in chains]
    best_chain = max(runs, key=rank)["draft_layers"]
    runs += [measure(best_chain, window) for window in windows[1:]]
    chosen = max(runs, key=rank)
    report = {
        "model": "default (SmolLM2-135M-Instruct)", "layers": L, "device": "cpu",
        "prompts": len(prompts), "screen_tokens": args.screen_tokens, "run_tokens": args.run_tokens,
        "teacher_forced_agreement": {str(m): round(a, 4) for m, a in agreement.items()},
        "runs": runs, "chosen": {"draft_layers": chosen["draft_layers"], "window": chosen["window"],
                                 "draft_fractions": [f"{m}/{L}" for m in chosen["draft_layers"]]},
        "seconds": round(time.perf_counter() - started, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["chosen"]), f"in {report['seconds']}s")


if __name__ == "__main__":
    main()
