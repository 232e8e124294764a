"""How the default exit layer of PPSD for --model default was chosen (spd_engine/modes/ppsd.py, DEFAULT_EXIT_LAYER).

    OMP_NUM_THREADS=1 python bench/ppsd_exit_layer.py [--prompts 3] [--tokens 40] [--adapter DIR]

The target (SmolLM2-135M-Instruct, float32 on the CPU) answers the first turn of the first ``--prompts`` prompts
of each /work/shared/data/eval set greedily (chat template). Teacher-forced on those answers, the plain early
exit's verification trace at every exit layer E (``modes.ppsd.exit_traces``: exactly greedy PPSD's) replays
to PPSD's cycles, and the predicted two-device speedup is

    tokens × (L + h) / (cycles × (max(E, L − E) + h))

(vanilla: all L layers + the head per token; a PPSD cycle: the slower of the two stages, each with a head), h
= the LM head's weight bytes in layer-equivalents: batch-1 decoding is memory-bound, so that is what it
costs. The best E by predicted speedup is the default. Writes bench/results/ppsd_exit_layer.json.

With ``--adapter DIR`` (``spd-engine train-exit-adapter``) it measures instead, on the same prompts, the adapter's
exit layer with and without it (the adapter's cost left out of the prediction: a rank-r map is ~r/H of a layer's
attention projection) and writes bench/results/ppsd_exit_adapter.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path

from spd_engine import Engine
from spd_engine.decode import generate_batch
from spd_engine.exit_adapter import ExitAdapter
from spd_engine.jsonl import read_jsonl, write_text_atomic
from spd_engine.modes.ppsd import exit_traces
from spd_engine.simulate import count_cycles

EVAL_DIR = Path("/work/shared/data/eval")
RESULTS = Path(__file__).parent / "results"


def head_in_layers(model) -> float:
    """The LM head's weights over one decoder layer's (what a batch-1 step reads)."""
    layer = model.layers[0]
    layer_params = sum(w.numel() for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
    return model.lm_head_weight.numel() / layer_params


def first_turns(per_set: int) -> list[str]:
    prompts = []
    for path in sorted(EVAL_DIR.glob("*.jsonl")):
        rows = [row for _, row in read_jsonl(path)][:per_set]
        prompts += [row["turns"][0] for row in rows]
    return prompts


def summary(traces: list[str], exit_layer: int, L: int, h: float) -> dict:
    """Acceptance, cycles and the two speedups of one exit layer's traces."""
    tokens = sum(len(t) for t in traces)
    cycles = sum(count_cycles(t, 2) for t in traces)
    accepted = sum(t.count("A") for t in traces)
    slower = max(exit_layer, L - exit_layer)
    return {"exit_layer": exit_layer, "acceptance": accepted / tokens, "cycles": cycles, "tokens": tokens,
            "theoretical_speedup": tokens * L / (cycles * slower),
            "predicted_speedup_with_heads": tokens * (L + h) / (cycles * (slower + h))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3, help="first-turn prompts per eval set")
    parser.add_argument("--tokens", type=int, default=40, help="greedy answer tokens per prompt")
    parser.add_argument("--adapter", default=None, help="measure this exit adapter instead of choosing E")
    args = parser.parse_args()
    started = time.perf_counter()
    engine = Engine.load("default", device="cpu", dtype="float32")
    model = engine.model
    L = model.config.num_layers
    prompts = [engine.encode_prompt(text, chat=True) for text in first_turns(args.prompts)]
    answers = generate_batch(model, prompts, args.tokens, engine.eos_ids)
    sequences = [(p + a, len(p)) for p, a in zip(prompts, answers)]
    h = head_in_layers(model)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = {"model": "default (SmolLM2-135M-Instruct)", "layers": L, "head_in_layer_equivalents": h,
              "prompts": len(prompts), "answer_tokens": sum(map(len, answers)), "per_set": args.prompts}
    if args.adapter:
        adapter = ExitAdapter.load(args.adapter, model, None)
        E = adapter.config.exit_layer
        plain = summary(exit_traces(model, sequences, [E])[E], E, L, h)
        adapted = summary(exit_traces(model, sequences, [E], {E: adapter})[E], E, L, h)
        record = {**common, "adapter": args.adapter, "rank": adapter.config.rank, "plain_exit": plain,
                  "with_adapter": adapted, "seconds": time.perf_counter() - started, "commit": commit,
                  "date": datetime.date.today().isoformat()}
        RESULTS.mkdir(exist_ok=True)
        write_text_atomic(RESULTS / "ppsd_exit_adapter.json", json.dumps(record, indent=1) + "\n")
        for name, row in (("plain exit", plain), ("with adapter", adapted)):
            print(f"E={E} {name}: acceptance {row['acceptance']:.3f}, theoretical {row['theoretical_speedup']:.3f}, "
                  f"with heads {row['predicted_speedup_with_heads']:.3f}")
        return
    traces = exit_traces(model, sequences, list(range(1, L)))
    rows = [summary(traces[E], E, L, h) for E in range(1, L)]
    best = max(rows, key=lambda row: row["predicted_speedup_with_heads"])
    record = {**common, "chosen_exit_layer": best["exit_layer"], "rule": "max predicted_speedup_with_heads",
              "by_exit_layer": rows, "seconds": time.perf_counter() - started, "commit": commit,
              "date": datetime.date.today().isoformat()}
    RESULTS.mkdir(exist_ok=True)
    write_text_atomic(RESULTS / "ppsd_exit_layer.json", json.dumps(record, indent=1) + "\n")
    for row in rows:
        print(f"E={row['exit_layer']:2d}  acceptance {row['acceptance']:.3f}"
              f"  theoretical {row['theoretical_speedup']:.3f}  with heads {row['predicted_speedup_with_heads']:.3f}")
    print(f"chosen exit layer: {best['exit_layer']} (head = {h:.2f} layers)")


if __name__ == "__main__":
    main()
