"""Decode speed, one run, every variant side by side: eager and graphed vanilla, Hugging Face generate (static
cache), torch.compile (reduce-overhead) vanilla, and SPD (eager or graphed) at chosen stage counts.

    python bench/bench_decode.py --model default --device cpu --variants eager hf --out bench/results/decode_cpu.json
    python bench/bench_decode.py --random llama-3.2-1b --device cuda --variants eager graph hf compile spd \\
        --stages 2 4 8 --force-acceptance 1.0 0.0 trace.json --out decode_gpu.json

``--random CONFIG`` times a random-weights model of that shape (bench/random_model.py), built on the device.

``--force-acceptance {p | TRACE.json}`` (benchmark only; the engine has no such option) overrides verify's
decision so the SPD cycle can be timed at a chosen acceptance pattern: i.i.d. with probability p, or a
recorded trace replayed in order (a JSON list of booleans, an object with a "trace" list, or an
``spd-engine eval --out`` report, whose per-prompt traces are joined). The tokens are
then not the model's. Every record it touches says so in "forced_acceptance" and "label".

Projected SPD tokens/s = 1 / (measured cycle time x cycles per token), the cycles per token coming from
``--cycles-per-token`` (the real model's CPU-measured figure) or else from the forced pattern's own run. The
JSON states this method next to the figure.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_model  # noqa: E402  (bench/ is not a package)

from spd_engine.decode import cache_capacity, generate_vanilla, prefill  # noqa: E402
from spd_engine.pdm import PDM  # noqa: E402
from spd_engine.sampling import SamplingParams  # noqa: E402
from spd_engine.modes.base import run_decoder  # noqa: E402
from spd_engine.modes.vanilla import VanillaStep  # noqa: E402
from spd_engine.spd import SPDState  # noqa: E402
from spd_engine.stages import partition_layers  # noqa: E402

VARIANTS = ("eager", "graph", "hf", "compile", "spd")
FORCED_LABEL = "FORCED ACCEPTANCE (benchmark only): verify's decision is overridden; the tokens are not the model's"
GREEDY = SamplingParams()


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class ForcedAcceptance(SPDState):
    """An SPD state whose verification accepts by a fixed device-side pattern instead of by the target.
    Lives here, not in the engine: it exists only to time the cycle at a given acceptance."""

    def __init__(self, *args, pattern: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.pattern = pattern.to(self.target.device)
        self.verified = torch.zeros(1, dtype=torch.long, device=self.target.device)

    def verify(self, draft, q):
        verifying, _, target_token, candidate = super().verify(draft, q)
        accept = self.pattern.index_select(0, self.verified % self.pattern.shape[0])
        self.verified += verifying
        return verifying, accept, target_token, candidate


def acceptance_pattern(spec: str, seed: int = 0, length: int = 4096) -> tuple[torch.Tensor, str]:
    """(pattern of booleans, its label) from ``p`` or ``TRACE.json``."""
    try:
        p = float(spec)
    except ValueError:
        raw = json.loads(Path(spec).read_text())
        if isinstance(raw, dict) and "datasets" in raw:  # an eval report: every prompt's trace ("AR..."), in order
            trace = [t == "A" for d in raw["datasets"].values() for prompt in d["per_prompt"] for t in prompt["trace"]]
        else:
            trace = [bool(t) for t in (raw["trace"] if isinstance(raw, dict) else raw)]
        if not trace:
            raise SystemExit(f"bench_decode: error: trace '{spec}' is empty")
        return torch.tensor(trace), f"trace {Path(spec).name} ({sum(trace)}/{len(trace)} accepted)"
    if not 0.0 <= p <= 1.0:
        raise SystemExit(f"bench_decode: error: --force-acceptance p must be in [0, 1], got {p}")
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(length, generator=generator) < p, f"p={p:g}"


def weight_bytes(model) -> int:
    tensors = [model.embed_weight, model.norm_weight] + [w for layer in model.layers for w in vars(layer).values()
                                                        if w is not None]
    if model.lm_head_weight is not model.embed_weight:
        tensors.append(model.lm_head_weight)
    return sum(t.numel() * t.element_size() for t in tensors)


def time_vanilla(model, prompt_ids, tokens, graph: str) -> dict:
    out = generate_vanilla(model, prompt_ids, tokens, GREEDY, eos_ids=(), graph=graph)
    return {"tokens_per_s": out.stats.decode_tokens_per_s, "graph": out.stats.graph}


def time_compiled(model, prompt_ids, tokens, backend: str) -> dict:
    """Our static decode step under torch.compile (mode reduce-overhead: inductor + CUDA graphs on a GPU)."""
    cache = model.new_cache(cache_capacity(len(prompt_ids), tokens + 8))
    step = VanillaStep(model, cache, GREEDY)
    compiled = torch.compile(step.step, backend=backend, fullgraph=True,
                             **({"mode": "reduce-overhead"} if backend == "inductor" else {}))
    with torch.inference_mode():
        step.start(prefill(model, cache, prompt_ids).argmax(-1), len(prompt_ids))
        for _ in range(3):  # compile + record
            compiled()
        synchronize(model.device)
        start = time.perf_counter()
        for _ in range(tokens):
            compiled()
        synchronize(model.device)
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "compile_backend": backend}


def time_hf(hf, prompt_ids, tokens, device) -> dict:
    """transformers generate with its static cache: generate(n) - generate(1) isolates the per-token cost."""
    ids = torch.tensor([prompt_ids], device=device)

    def run(n):
        synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                        cache_implementation="static")
        synchronize(device)
        return time.perf_counter() - start

    run(2)
    return {"tokens_per_s": (tokens - 1) / max(run(tokens) - run(1), 1e-9)}


def time_spd(model, prompt_ids, tokens, stages: int, graph: str, pattern=None) -> dict:
    from spd_engine.runtime.graph import readback_every, use_graphs

    pdm = PDM.create(model, partition_layers(model.config.num_layers, stages))
    graphed = use_graphs(graph, model.device)
    readback = readback_every(graphed)
    capacity = cache_capacity(len(prompt_ids), tokens, extra=stages + 2 + readback)
    state = (ForcedAcceptance(model, pdm, capacity, GREEDY, pattern=pattern) if pattern is not None
             else SPDState(model, pdm, capacity, GREEDY))
    s = run_decoder(state, "spd", prompt_ids, tokens, GREEDY, eos_ids=(), graphed=graphed, readback=readback).stats
    return {"stages": stages, "graph": graphed, "cycle_seconds": s.step_seconds, "cycles": s.cycles,
            "new_tokens": s.new_tokens, "acceptance_rate": s.acceptance_rate,
            "cycles_per_token": s.cycles / max(s.new_tokens - 1, 1)}


def median_of(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    best = dict(runs[0])
    for key in ("tokens_per_s", "cycle_seconds"):
        if key in best:
            samples = [r[key] for r in runs]
            best[key], best[key + "_samples"] = statistics.median(samples), samples
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="default | HF directory (real weights)")
    source.add_argument("--random", default=None, metavar="CONFIG",
                        help=f"random weights of this shape: {' | '.join(random_model.CONFIGS)} | config.json")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cuda"])
    parser.add_argument("--variants", nargs="+", default=["eager", "hf"], choices=VARIANTS)
    parser.add_argument("--graph", default="auto", choices=["auto", "on", "off"], help="for the spd variant")
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--force-acceptance", nargs="+", default=[], metavar="P|TRACE.json")
    parser.add_argument("--cycles-per-token", type=float, default=None,
                        help="the real model's CPU-measured SPD cycles per token, for the projection")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile variant")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from spd_engine.engine import Engine, pick_dtype

    device = torch.device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.random:
        model = random_model.random_model(args.random, device, dtype, backend=args.backend)
        label, model_dir = f"random:{args.random}", None
    else:
        engine = Engine.load(args.model or "default", device=args.device, dtype=str(dtype).removeprefix("torch."),
                             backend=args.backend)
        model, label, model_dir = engine.model, args.model or "default", engine.model_dir
    vocab = model.config.vocab_size
    prompt_ids = [(7 * i + 11) % vocab for i in range(args.prompt_tokens)]
    forced = [acceptance_pattern(spec) for spec in args.force_acceptance]

    result = {
        "benchmark": "decode: vanilla (eager, graphed, compiled), HF static-cache generate, SPD",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "commit": git_commit(), "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": label, "dtype": str(dtype).removeprefix("torch."), "backend": args.backend,
        "prompt_tokens": len(prompt_ids), "new_tokens": args.tokens, "weight_bytes": weight_bytes(model),
        "results": [],
    }
    if device.type == "cuda":
        import _timing

        result["copy_bandwidth_gb_per_s"] = _timing.copy_bandwidth_gbps()
    if forced:
        result["label"] = FORCED_LABEL
        print(f"bench_decode: {FORCED_LABEL}", file=sys.stderr)

    def record(variant: str, row: dict) -> None:
        row = {"variant": variant, **row}
        if "tokens_per_s" in row and "copy_bandwidth_gb_per_s" in result:
            achieved = result["weight_bytes"] * row["tokens_per_s"] / 1e9
            row["pct_of_copy_bandwidth"] = 100 * achieved / result["copy_bandwidth_gb_per_s"]
        result["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_samples")}), file=sys.stderr, flush=True)

    time_vanilla(model, prompt_ids, 4, "off")  # warm-up
    for variant in args.variants:
        if variant in ("eager", "graph"):
            record(variant, median_of(lambda: time_vanilla(model, prompt_ids, args.tokens,
                                                           "off" if variant == "eager" else "auto"), args.repeats))
        elif variant == "compile":
            record(variant, median_of(lambda: time_compiled(model, prompt_ids, args.tokens, args.compile_backend),
                                      args.repeats))
        elif variant == "hf":
            import transformers

            if model_dir is not None:
                hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
            else:
                config = transformers.AutoConfig.for_model(**random_model.load_config(args.random))
                with torch.device(device):
                    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
            hf.generation_config.eos_token_id = None
            record(variant, median_of(lambda: time_hf(hf, prompt_ids, args.tokens, device), args.repeats))
            del hf
        else:
            for stages in args.stages:
                for pattern, pattern_label in forced or [(None, None)]:
                    row = median_of(lambda: time_spd(model, prompt_ids, args.tokens, stages, args.graph, pattern),
                                    args.repeats)
                    if pattern_label:
                        row.update(forced_acceptance=pattern_label, label=FORCED_LABEL)
                    per_token = args.cycles_per_token or row["cycles_per_token"]
                    cycle = row["cycle_seconds"]
                    row["projected_tokens_per_s"] = 1.0 / (cycle * per_token) if cycle else 0.0
                    row["projection_method"] = (
                        "1 / (measured median cycle time x cycles per token); cycles per token "
                        + ("from --cycles-per-token (the real model's CPU-measured figure)" if args.cycles_per_token
                           else "from this run's own acceptance pattern"))
                    record("spd", row)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
