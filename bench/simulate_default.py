"""Predicted multi-device SPD speed for the default model (SmolLM2-135M), from step times measured here.

    OMP_NUM_THREADS=1 python bench/simulate_default.py [--acceptance 0.8 | --trace eval.json] [--times t.json]

Measures the decode-step times on this machine (or reads --times, e.g. a GPU benchmark's), then predicts
n = 2..8 for every link preset and sweeps the link latency. Writes bench/results/simulate_default_<device>.json
(step times, predictions, device, commit, date) and a PNG of the nvlink predictions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from dataclasses import asdict, replace
from pathlib import Path

from spd_engine import Engine
from spd_engine.simulate import (LINK_PRESETS, StepTimes, format_table, iid_traces, load_eval_traces,
                                 measure_step_times, plot, simulate)

RESULTS = Path(__file__).parent / "results"
STAGES = list(range(2, 9))
LATENCIES_US = [0, 5, 15, 50, 200, 1000, 5000]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--acceptance", type=float, default=0.8, help="i.i.d. per-draft acceptance (default 0.8)")
    source.add_argument("--trace", help="an `spd-engine eval --out` report instead")
    parser.add_argument("--times", help="step times JSON instead of measuring here")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    if args.times:
        times = StepTimes.from_json(args.times)
    else:
        engine = Engine.load("default", device="cpu", dtype="float32")
        times = measure_step_times(engine, STAGES, context=args.context, repeats=args.repeats)
    traces = load_eval_traces(args.trace) if args.trace else iid_traces(args.acceptance)

    by_link = {name: simulate(traces, times, link, STAGES) for name, link in LINK_PRESETS.items()}
    for sim in by_link.values():
        print(format_table(sim), end="\n\n")
    sweep = {latency: [p.speedup for p in simulate(traces, times, replace(LINK_PRESETS["nvlink"],
                                                                          name=f"{latency} us",
                                                                          latency_us=latency), STAGES).predictions]
             for latency in LATENCIES_US}
    print("predicted speedup by link latency (nvlink bandwidth)")
    print("latency us " + " ".join(f"{f'n={n}':>5}" for n in STAGES))
    for latency, speedups in sweep.items():
        print(f"{latency:>10} " + " ".join(f"{s:5.2f}" for s in speedups))

    device = "cpu" if times.device.startswith("cpu") else "gpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    record = {"device": times.device, "commit": commit, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "step_times": asdict(times), "acceptance": {"source": traces.source, "rate": traces.acceptance_rate},
              "predictions": {name: sim.to_dict()["predictions"] for name, sim in by_link.items()},
              "vanilla_tokens_per_s": by_link["nvlink"].vanilla_tokens_per_s,
              "latency_sweep_us": {str(k): dict(zip(STAGES, v)) for k, v in sweep.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"simulate_default_{device}.json"
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out} and {plot(by_link['nvlink'], out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
