"""Pipeline simulator: predicted tokens/s and speedup of SPD with n stages on n (+1) devices.

    spd-engine simulate --acceptance 0.8 --stages 2-8 --link nvlink --plot speedup.png
    spd-engine simulate --trace eval.json --times h100.json --link pcie --json

Inputs:

* Acceptance: the per-prompt verification traces ('A'/'R', one per verification) of an ``spd-engine eval
  --out`` report, or a synthetic i.i.d. trace with per-draft acceptance p.
* Step times in ms (see :class:`StepTimes`): per target layer (or per stage of a given split), the head,
  the PDM's draft step and the controller's verify + resolve; read from a JSON file (a GPU benchmark writes
  the same fields), or measured here with the real model through ``forward_layers`` and the SPD cycle's own
  pieces.
* A link: each message costs latency + bytes / bandwidth; presets nvlink, pcie, ethernet and free.

Cycle counts come from replaying each trace through the engine's own schedule (``count_cycles``), so at the
recorded n they equal the engine's measured cycles exactly; replaying one run's trace at another n assumes a
draft's acceptance does not depend on n. The cycle time follows the schedule of
:mod:`spd_engine.runtime.distributed` (fixed shapes: every cycle costs the same):

* dedicated (n + 1 devices): max(PDM draft, slowest stage path) + verify/resolve, where a stage's path is the
  control message + its input + its layers + its anchors/output back to the controller;
* hosted (n devices): the controller also runs stage 1, after its draft.

Vanilla decoding runs on one device: all layers + the head per token. Predicted speedup is the ratio of the
two decode rates (prefill is left out of both). The paper's theoretical speedup, n × tokens / cycles, is
reported beside it and never mixed with it; with free links, equal stages and a free PDM and controller the
two coincide and approach n / (1 + (n − 1)(1 − p)) for i.i.d. acceptance p.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .jsonl import write_text_atomic
from .pdm import auto_anchors
from .spd import stage_anchor_layers
from .stages import partition_layers

CONTROL_BYTES = 3 * 8  # [command, cut, fill] as int64
LAYOUTS = ("dedicated", "hosted")


# ---------------------------------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    """One device-to-device message costs ``latency_us`` + bytes / ``bandwidth_gbs`` (GB/s, 1e9 bytes)."""
    name: str
    latency_us: float
    bandwidth_gbs: float | None  # None: size is free

    def message_ms(self, num_bytes: int) -> float:
        if not num_bytes:
            return 0.0
        transfer_ms = num_bytes / (self.bandwidth_gbs * 1e6) if self.bandwidth_gbs else 0.0
        return self.latency_us * 1e-3 + transfer_ms


# Point-to-point small-message latency and per-direction bandwidth, typical of NCCL send/recv between two
# GPUs (NVLink 4, PCIe 4.0 x16) and of TCP over 10 Gb Ethernet.
LINK_PRESETS = {
    "nvlink": Link("nvlink", latency_us=5.0, bandwidth_gbs=450.0),
    "pcie": Link("pcie", latency_us=15.0, bandwidth_gbs=25.0),
    "ethernet": Link("ethernet", latency_us=50.0, bandwidth_gbs=1.25),
    "free": Link("free", latency_us=0.0, bandwidth_gbs=None),
}


# ---------------------------------------------------------------------------------------------- step times
@dataclass
class StepTimes:
    """Decode-step times in milliseconds, for one token at the context length they were measured at.

    JSON fields (the same names): ``layer_ms`` (one per target layer), ``head_ms`` (final norm + LM head +
    argmax: vanilla's per-token tail), ``verify_ms`` (the SPD controller after the stages: verify, then
    resolve's commit/flush and the next token's embedding), ``pdm_ms`` (the draft step; a number, or
    {"n": ms} per stage count, as it grows with n), ``hidden_size`` and ``dtype_bytes`` (message sizes), and
    free-form ``device`` / ``model`` / ``source`` strings. A file may also hold them under "step_times", as the
    ``simulate --json`` output does. Optional ``stage_ms`` ({"n": [ms per stage]}) gives measured stage times
    for the even split into n stages, in place of sums of layer times (a fused or graphed stage costs less
    than its layers one by one).
    """
    layer_ms: list[float]
    head_ms: float
    verify_ms: float
    pdm_ms: float | dict[int, float]
    hidden_size: int
    dtype_bytes: int = 2
    device: str = ""
    model: str = ""
    source: str = ""
    stage_ms: dict[int, list[float]] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layer_ms)

    def pdm_ms_at(self, stages: int) -> float:
        if not isinstance(self.pdm_ms, dict):
            return self.pdm_ms
        if stages not in self.pdm_ms:
            raise UserError(f"the step times give the PDM's time for n in {sorted(self.pdm_ms)}, not for n={stages}")
        return self.pdm_ms[stages]

    def stage_times_ms(self, stage_bounds: list[tuple[int, int]]) -> list[float]:
        measured = self.stage_ms.get(len(stage_bounds))
        if measured is not None:
            if len(measured) != len(stage_bounds):
                raise UserError(f"stage_ms for n={len(stage_bounds)} lists {len(measured)} stages")
            return measured
        return [sum(self.layer_ms[a:e]) for a, e in stage_bounds]

    def vanilla_token_ms(self) -> float:
        return sum(self.layer_ms) + self.head_ms

    @classmethod
    def from_json(cls, path: str | Path) -> "StepTimes":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"step-times file '{path}' does not exist")
        try:
            raw = json.loads(path.read_text())
            raw = raw.get("step_times", raw)  # a `simulate --json` output or a bench record holds them here
            pdm = raw["pdm_ms"]
            times = cls(layer_ms=[float(t) for t in raw["layer_ms"]], head_ms=float(raw["head_ms"]),
                        verify_ms=float(raw["verify_ms"]),
                        pdm_ms={int(n): float(t) for n, t in pdm.items()} if isinstance(pdm, dict) else float(pdm),
                        hidden_size=int(raw["hidden_size"]), dtype_bytes=int(raw.get("dtype_bytes", 2)),
                        device=str(raw.get("device", "")), model=str(raw.get("model", "")),
                        source=str(raw.get("source", path)),
                        stage_ms={int(n): [float(t) for t in ts] for n, ts in raw.get("stage_ms", {}).items()})
        except json.JSONDecodeError as exc:
            raise UserError(f"step-times file '{path}' is not valid JSON: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"step-times file '{path}' lacks or mistypes a field ({exc}); needs layer_ms, "
                            f"head_ms, verify_ms, pdm_ms and hidden_size") from exc
        if not times.layer_ms:
            raise UserError(f"step-times file '{path}' has an empty layer_ms")
        return times

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_atomic(path, json.dumps(asdict(self), indent=1))
        return path


def busy_machine_warning(load: float | None = None, cores: int | None = None) -> str | None:
    """A warning when other work keeps the CPUs busy (1-minute load average above half the cores): step times
    measured then come out inflated, and so would every prediction made from them."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):  # not available on this platform: nothing to warn about
            return None
    cores = cores or os.cpu_count() or 1
    if load <= cores / 2:
        return None
    return (f"spd-engine: warning: this machine is busy (load average {load:.2f} on {cores} cores), so the step "
            "times measured now will be too slow; measure on an idle machine, or pass --times from one")


def measure_step_times(engine, stages: list[int], context: int = 256, repeats: int = 30, tower_layers: int = 1,
                       draft_vocab: int = 16384) -> StepTimes:
    """Time the real model's decode pieces on its device: every layer alone through ``forward_layers``, the
    head, and per n a PDM (``tower_layers`` layers, a ``draft_vocab``-row head, the n-stage anchors) drafting
    and the controller verifying + resolving, through SPDState itself. Caches are set to ``context`` entries
    without a prefill: every op is dense, so the time does not depend on what the entries hold."""
    import torch

    from .decode import cache_capacity
    from .pdm import PDM
    from .sampling import SamplingParams
    from .spd import SPDState

    model = engine.model
    cfg, device = model.config, model.device
    if not 1 <= context <= cfg.max_position_embeddings:
        raise UserError(f"--context must be in [1, {cfg.max_position_embeddings}] for this model, got {context}")
    capacity = cache_capacity(context, 2 * repeats + 8, extra=max(stages) + 2)

    def median_ms(step) -> float:
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for _ in range(3):  # warm-up: first calls pay allocation and dispatch setup
            step()
        samples = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            step()
            synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e3

    with torch.inference_mode():
        hidden = torch.randn(1, 1, cfg.hidden_size, dtype=model.dtype, device=device)
        cache = model.new_cache(capacity)
        cache.set_lengths(context)
        layer_ms = [median_ms(lambda i=i: model.forward_layers(hidden, i, i + 1, cache, advance=0))
                    for i in range(cfg.num_layers)]
        head_ms = median_ms(lambda: model.logits(hidden[:, -1]).argmax(-1))
        vocab = torch.arange(min(draft_vocab, cfg.vocab_size), device=device)
        pdm_ms, verify_ms = {}, []
        for n in stages:
            pdm = PDM.create(model, partition_layers(cfg.num_layers, n), tower_layers=tower_layers, draft_vocab=vocab)
            state = SPDState(model, pdm, capacity, SamplingParams())
            state.pdm_cache.set_lengths(context)
            state.start(torch.zeros(1, dtype=torch.long, device=device), context)
            pdm_ms[n] = median_ms(state.draft)  # drafting right after start() changes no state
            draft, q = state.draft()
            # Each resolve moves the pipeline on by one position at most; capacity leaves room for all of them.
            verify_ms.append(median_ms(lambda: state.resolve(draft, q, *state.verify(draft, q))))
    threads = f", threads: {torch.get_num_threads()}" if device.type == "cpu" else ""
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return StepTimes(layer_ms=layer_ms, head_ms=head_ms, verify_ms=statistics.median(verify_ms), pdm_ms=pdm_ms,
                     hidden_size=cfg.hidden_size, dtype_bytes=model.dtype.itemsize,
                     device=f"{device_name} ({str(model.dtype).replace('torch.', '')}{threads})",
                     model=engine.model_spec,
                     source=f"measured on the spot: context {context}, median of {repeats}, PDM L_s={tower_layers}, "
                            f"draft vocab {len(vocab)}")


# ---------------------------------------------------------------------------------------------- traces
@dataclass
class Traces:
    """Verification outcomes, one 'A'/'R' string per prompt; the recorded run's n and cycles when known."""
    traces: list[str]
    source: str
    recorded_stages: int | None = None
    recorded_cycles: int | None = None

    @property
    def verifications(self) -> int:
        return sum(len(t) for t in self.traces)

    @property
    def acceptance_rate(self) -> float:
        accepted = sum(t.count("A") for t in self.traces)
        return accepted / self.verifications if self.verifications else 0.0

    @property
    def tokens(self) -> int:
        """Committed tokens: the first comes from prefill, then one per verification."""
        return sum(len(t) + 1 for t in self.traces)


def count_cycles(trace: str, stages: int) -> int:
    """Cycles the engine runs for this sequence of verifications (SPDState.resolve's schedule): a cycle
    verifies only when the pipeline is full (fill == n); every other cycle fills it by one; an accept keeps it
    full and a reject restarts it at fill 1, as does the start."""
    cycles, fill = 0, 1
    for outcome in trace:
        cycles += stages - fill + 1  # the cycles that fill the pipeline, then the one that verifies
        fill = stages if outcome == "A" else 1
    return cycles


def iid_traces(acceptance: float, verifications: int = 100_000, seed: int = 0) -> Traces:
    if not 0.0 <= acceptance <= 1.0:
        raise UserError(f"--acceptance must be in [0, 1], got {acceptance}")
    if verifications < 1:
        raise UserError(f"--verifications must be >= 1, got {verifications}")
    rng = random.Random(seed)
    trace = "".join("A" if rng.random() < acceptance else "R" for _ in range(verifications))
    return Traces([trace], source=f"i.i.d. acceptance p={acceptance:g} ({verifications} verifications, seed {seed})")


def load_eval_traces(path: str | Path) -> Traces:
    """The per-prompt traces of an ``spd-engine eval --out`` report: ``{"stages": n, "datasets": {name:
    {"per_prompt": [{"trace": "AR..", "cycles": c, "new_tokens": t}, ...]}}}``. Each trace is replayed at the
    recorded n and must give the recorded cycles, or the file is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"trace file '{path}' does not exist")
    try:
        report = json.loads(path.read_text())
        stages = int(report["stages"])
        prompts = [(name, i, p) for name, d in report["datasets"].items() for i, p in enumerate(d["per_prompt"])]
    except json.JSONDecodeError as exc:
        raise UserError(f"trace file '{path}' is not valid JSON: {exc}") from exc
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"'{path}' is not an `spd-engine eval --out` report (missing {exc})") from exc
    traces, recorded = [], 0
    for name, index, prompt in prompts:
        trace = prompt.get("trace")
        where = f"'{path}', dataset {name}, prompt {index}"
        if not isinstance(trace, str) or set(trace) - {"A", "R"}:
            raise UserError(f"{where}: 'trace' must be a string of A and R")
        if prompt.get("new_tokens") is not None and len(trace) != prompt["new_tokens"] - 1:
            raise UserError(f"{where}: {len(trace)} verifications cannot make {prompt['new_tokens']} tokens")
        if prompt.get("cycles") is not None and count_cycles(trace, stages) != prompt["cycles"]:
            raise UserError(f"{where}: the trace replays to {count_cycles(trace, stages)} cycles at n={stages}, "
                            f"but {prompt['cycles']} were recorded")
        traces.append(trace)
        recorded += prompt.get("cycles") or 0
    if not traces:
        raise UserError(f"trace file '{path}' holds no prompts")
    return Traces(traces, source=str(path), recorded_stages=stages, recorded_cycles=recorded)


# ---------------------------------------------------------------------------------------------- the model
@dataclass
class Prediction:
    stages: int
    devices: int
    stage_layers: list[int]
    tokens: int
    cycles: int
    theoretical_speedup: float  # n × tokens / cycles (the paper's "equivalent accept length")
    closed_form_speedup: float  # n / (1 + (n − 1)(1 − p)), p = the traces' acceptance rate
    slowest_stage_ms: float
    pdm_ms: float
    cycle_ms: float
    tokens_per_s: float  # decode rate on n (+1) devices
    speedup: float  # over vanilla decoding on one device


@dataclass
class Simulation:
    link: Link
    layout: str
    times: StepTimes
    traces: Traces
    vanilla_tokens_per_s: float
    predictions: list[Prediction] = field(default_factory=list)

    def to_dict(self) -> dict:
        replayed = None
        if self.traces.recorded_stages is not None:
            replayed = sum(count_cycles(t, self.traces.recorded_stages) for t in self.traces.traces)
        return {
            "link": asdict(self.link),
            "layout": self.layout,
            "step_times": asdict(self.times),
            "acceptance": {"source": self.traces.source, "prompts": len(self.traces.traces),
                           "verifications": self.traces.verifications, "rate": self.traces.acceptance_rate,
                           "recorded_stages": self.traces.recorded_stages,
                           "recorded_cycles": self.traces.recorded_cycles, "replayed_cycles": replayed},
            "vanilla": {"devices": 1, "token_ms": self.times.vanilla_token_ms(),
                        "tokens_per_s": self.vanilla_tokens_per_s},
            "predictions": [asdict(p) for p in self.predictions],
        }


def closed_form_speedup(stages: int, acceptance: float) -> float:
    """The paper's toy formula: each reject costs a refill of n − 1 cycles."""
    return stages / (1 + (stages - 1) * (1 - acceptance))


def cycle_ms(times: StepTimes, link: Link, stage_bounds: list[tuple[int, int]], layout: str = "dedicated"):
    """One cycle of runtime/distributed.py: (cycle ms, slowest stage ms). Every stage rank waits for the
    control message and its input, runs its layers and returns its anchors (and stage n its output) to the
    controller, which drafts meanwhile and then verifies and resolves."""
    n, H, b = len(stage_bounds), times.hidden_size, times.dtype_bytes
    stage_ms = times.stage_times_ms(stage_bounds)
    returned_rows = [len(rows) for rows in stage_anchor_layers(auto_anchors(times.num_layers, n), stage_bounds)]
    returned_rows[-1] += 1  # stage n's output
    arrive = link.message_ms(CONTROL_BYTES) + link.message_ms(H * b)

    def path(s: int) -> float:
        return arrive + stage_ms[s] + link.message_ms(returned_rows[s] * H * b)

    controller = times.pdm_ms_at(n)
    remote = range(n)
    if layout == "hosted":
        controller += stage_ms[0]  # stage 1 runs on the controller, after the draft
        remote = range(1, n)
    busiest = max([controller] + [path(s) for s in remote])
    return busiest + times.verify_ms, max(stage_ms)


def simulate(traces: Traces, times: StepTimes, link: Link, stages: list[int],
             layout: str = "dedicated") -> Simulation:
    """Predict every n in ``stages`` (even splits of the layers, the first ones one larger where uneven)."""
    if layout not in LAYOUTS:
        raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    vanilla_token_ms = times.vanilla_token_ms()
    sim = Simulation(link, layout, times, traces, 1e3 / vanilla_token_ms)
    decode_tokens = traces.tokens - len(traces.traces)  # the first token of each prompt comes from prefill
    for n in stages:
        bounds = partition_layers(times.num_layers, n)
        cycles = sum(count_cycles(t, n) for t in traces.traces)
        per_cycle_ms, slowest = cycle_ms(times, link, bounds, layout)
        spd_ms = cycles * per_cycle_ms
        sim.predictions.append(Prediction(
            stages=n, devices=n + 1 if layout == "dedicated" else n, stage_layers=[e - a for a, e in bounds],
            tokens=traces.tokens, cycles=cycles,
            theoretical_speedup=n * traces.tokens / cycles if cycles else 0.0,
            closed_form_speedup=closed_form_speedup(n, traces.acceptance_rate),
            slowest_stage_ms=slowest, pdm_ms=times.pdm_ms_at(n), cycle_ms=per_cycle_ms,
            tokens_per_s=1e3 * decode_tokens / spd_ms if spd_ms else 0.0,
            speedup=decode_tokens * vanilla_token_ms / spd_ms if spd_ms else 0.0))
    return sim


# ---------------------------------------------------------------------------------------------- output
def format_table(sim: Simulation) -> str:
    t, tr = sim.times, sim.traces
    bandwidth = f"{sim.link.bandwidth_gbs:g} GB/s" if sim.link.bandwidth_gbs else "size free"
    lines = [
        f"SPD pipeline simulation: {t.model or 'model'} ({t.num_layers} layers), step times {t.device} "
        f"[{t.source}]",
        f"link {sim.link.name} ({sim.link.latency_us:g} us, {bandwidth}), {sim.layout} layout; acceptance "
        f"{tr.acceptance_rate:.3f} from {tr.source}",
        f"vanilla on 1 device: {sim.vanilla_tokens_per_s:.1f} tok/s ({t.vanilla_token_ms():.3f} ms/token)",
    ]
    if tr.recorded_stages is not None:
        replayed = sum(count_cycles(x, tr.recorded_stages) for x in tr.traces)
        lines.append(f"replay at the recorded n={tr.recorded_stages}: {replayed} cycles, recorded {tr.recorded_cycles}")
    header = ("n", "devices", "stage layers", "slowest stage ms", "PDM ms", "cycle ms", "cycles",
              "theoretical", "closed form", "tok/s", "speedup")
    rows = [header] + [(str(p.stages), str(p.devices), ",".join(map(str, p.stage_layers)), f"{p.slowest_stage_ms:.3f}",
                        f"{p.pdm_ms:.3f}", f"{p.cycle_ms:.3f}", str(p.cycles), f"{p.theoretical_speedup:.2f}",
                        f"{p.closed_form_speedup:.2f}", f"{p.tokens_per_s:.1f}", f"{p.speedup:.2f}")
                       for p in sim.predictions]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot(sim: Simulation, path: str | Path) -> Path:
    """Predicted wall-clock speedup against n, beside the theoretical speedup and the closed form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ns = [p.stages for p in sim.predictions]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.plot(ns, [p.theoretical_speedup for p in sim.predictions], "o-", label="theoretical (n × tokens / cycles)")
    ax.plot(ns, [p.closed_form_speedup for p in sim.predictions], "--", color="gray", zorder=3,
            label=f"n / (1 + (n−1)(1−p)), p = {sim.traces.acceptance_rate:.2f}")
    ax.plot(ns, [p.speedup for p in sim.predictions], "s-",
            label=f"predicted wall clock ({sim.link.name}, {sim.layout})")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xlabel("stages n")
    ax.set_ylabel("speedup over vanilla decoding")
    ax.set_xticks(ns)
    ax.set_title(f"{sim.times.model or 'model'}: step times {sim.times.device}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def parse_stage_counts(text: str) -> list[int]:
    """'2-8', '2,4,8' or '4'."""
    try:
        if "-" in text:
            low, high = (int(x) for x in text.split("-"))
            counts = list(range(low, high + 1))
        else:
            counts = [int(x) for x in text.split(",")]
    except ValueError as exc:
        raise UserError(f"--stages must look like 2-8, 2,4,8 or 4, got '{text}'") from exc
    if not counts or min(counts) < 1:
        raise UserError(f"--stages must name stage counts >= 1, got '{text}'")
    return counts


def resolve_link(name: str, latency_us: float | None, bandwidth_gbs: float | None) -> Link:
    if name not in LINK_PRESETS:
        raise UserError(f"--link must be one of {', '.join(LINK_PRESETS)}, got '{name}'")
    preset = LINK_PRESETS[name]
    if latency_us is None and bandwidth_gbs is None:
        return preset
    latency = preset.latency_us if latency_us is None else latency_us
    bandwidth = preset.bandwidth_gbs if bandwidth_gbs is None else bandwidth_gbs
    if latency < 0 or (bandwidth is not None and not bandwidth > 0):
        raise UserError("--link-latency-us must be >= 0 and --link-bandwidth-gbs > 0")
    return Link(f"{name}, custom", latency, bandwidth)


def add_arguments(p) -> None:
    from .cli import _add_model_args

    p.add_argument("--mode", default="spd",
                   help="the decoding mode to predict: spd (a sweep over n), or any other registered mode, whose "
                        "settings and traces come from its `spd-engine eval --mode M --out` report (--trace)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="EVAL_JSON", help="acceptance traces from `spd-engine eval --out`")
    source.add_argument("--acceptance", type=float, metavar="P", help="synthetic i.i.d. per-draft acceptance")
    p.add_argument("--verifications", type=int, default=100_000, help="length of the synthetic trace")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic trace")
    p.add_argument("--stages", default="2-8", help="stage counts to predict: 2-8, 2,4,8 or 4")
    p.add_argument("--layout", choices=LAYOUTS, default="dedicated",
                   help="dedicated: n+1 devices (one only controls); hosted: n (stage 1 on the controller)")
    p.add_argument("--link", default="nvlink", help=f"link preset: {', '.join(LINK_PRESETS)}")
    p.add_argument("--link-latency-us", type=float, default=None, help="override the preset's latency")
    p.add_argument("--link-bandwidth-gbs", type=float, default=None, help="override the preset's bandwidth")
    p.add_argument("--times", metavar="JSON", default=None,
                   help="step times from a file (e.g. a GPU benchmark); default: measure here with --model")
    _add_model_args(p)
    p.add_argument("--context", type=int, default=256, help="context length the step times are measured at")
    p.add_argument("--repeats", type=int, default=30, help="timed repeats per measurement (median)")
    p.add_argument("--tower-layers", type=int, default=1, help="PDM tower layers for the measured draft step")
    p.add_argument("--draft-vocab", type=int, default=16384, help="PDM draft vocabulary for the measured draft step")
    p.add_argument("--save-times", metavar="JSON", default=None, help="write the measured step times here")
    p.add_argument("--plot", metavar="PNG", default=None, help="write the speedup plot here")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def run(args) -> int:
    stages = parse_stage_counts(args.stages)
    link = resolve_link(args.link, args.link_latency_us, args.link_bandwidth_gbs)
    if args.mode != "spd":
        return run_other_mode(args, link)
    traces = load_eval_traces(args.trace) if args.trace else iid_traces(args.acceptance, args.verifications, args.seed)
    times = step_times(args, stages)
    sim = simulate(traces, times, link, stages, layout=args.layout)
    plotted = plot(sim, args.plot) if args.plot else None
    if args.json:
        print(json.dumps(dict(sim.to_dict(), plot=str(plotted) if plotted else None)))
    else:
        print(format_table(sim))
        if plotted:
            print(f"wrote {plotted}", file=sys.stderr)
    return 0


def step_times(args, stages: list[int]) -> StepTimes:
    """``--times``, or the model's step times measured here (``--save-times`` keeps them)."""
    if args.times:
        return StepTimes.from_json(args.times)
    from .engine import Engine

    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    busy = busy_machine_warning()  # before loading: the load average must not count this process's own work
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    if busy and engine.model.device.type == "cpu":
        print(busy, file=sys.stderr)
    print(f"measuring step times of {args.model} on {engine.model.device} ...", file=sys.stderr)
    times = measure_step_times(engine, stages, context=args.context, repeats=args.repeats,
                               tower_layers=args.tower_layers, draft_vocab=args.draft_vocab)
    if args.save_times:
        print(f"wrote {times.to_json(args.save_times)}", file=sys.stderr)
    return times


def run_other_mode(args, link: Link) -> int:
    """A mode other than SPD: its prediction (:meth:`DecodingMode.predict`) from an eval report's traces."""
    from .evaluate import report_sections
    from .modes import mode_class

    mode = mode_class(args.mode)  # an unknown name is the usual one-line error
    if not args.trace:
        raise UserError(f"--mode {args.mode} predicts from an eval report: add --trace EVAL_JSON "
                        f"(`spd-engine eval --mode {args.mode} --out EVAL_JSON`)")
    path = Path(args.trace)
    try:
        report = json.loads(path.read_text())
        sections = [(settings, d["per_prompt"]) for name, settings, _, d in report_sections(report)
                    if name == args.mode]
    except FileNotFoundError as exc:
        raise UserError(f"trace file '{path}' does not exist") from exc
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"'{path}' is not an `spd-engine eval --out` report ({exc})") from exc
    if not sections:
        raise UserError(f"'{path}' holds no {args.mode} results: make it with `spd-engine eval --mode {args.mode}`")
    settings = sections[0][0]
    per_prompt = [row for _, rows in sections for row in rows]
    times = step_times(args, [settings.get("stages", 2)])
    try:
        prediction = mode.predict(settings, per_prompt, times, link)
    except (KeyError, TypeError) as exc:
        raise UserError(f"'{path}' lacks what the {args.mode} prediction needs ({exc})") from exc
    if prediction is None:
        raise UserError(f"the simulator has no model of --mode {args.mode}")
    result = {"mode": args.mode, "settings": settings, "link": asdict(link), "step_times": asdict(times),
              "prompts": len(per_prompt), **prediction}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.mode} from {path} ({len(per_prompt)} prompts), step times {times.device} [{times.source}], "
              f"link {link.name}\nvanilla on 1 device: {prediction['vanilla_tokens_per_s']:.1f} tok/s\n"
              f"{args.mode} on {prediction['devices']} devices: {prediction['tokens_per_s']:.1f} tok/s, "
              f"speedup {prediction['speedup']:.2f}")
    return 0
