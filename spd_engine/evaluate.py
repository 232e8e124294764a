"""Acceptance and losslessness of SPD over prompt sets (EAGLE ``question.jsonl`` format).

    spd-engine eval --stages 4 --pdm DIR --data mt_bench.jsonl gsm8k.jsonl --limit 10 --max-new-tokens 64 --out r.json

Each prompt is the record's first turn under the model's chat template. It runs in vanilla mode and in SPD
mode; at temperature 0 the two must produce the same token ids (``lossless``). Per dataset it reports the
acceptance rate (accepted / verified drafts), the equivalent accept length (n × new tokens / cycles, the
paper's "theoretical speedup"), both modes' tokens per second and their wall-clock ratio on this device.
Those two speedups are different numbers and are reported side by side, never mixed.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .decode import generate_vanilla
from .errors import UserError
from .jsonl import read_jsonl, write_text_atomic
from .sampling import SamplingParams
from .spd import generate_spd, resolve_pdm
from .teacher_forced import evaluate_teacher_forced, target_answers

METHODS = ("spd", "teacher-forced")
SAMPLE_PROMPTS = Path(__file__).parent / "prompts" / "sample.jsonl"  # `--data sample`: ships with the package
WARMUP_TOKENS = 8  # one short untimed run per mode first, so one-time setup costs do not land on prompt 1


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """``{"question_id", "turns": [first user turn, ...]}`` records; the first ``limit`` of them. ``sample``
    names the small prompt set shipped with the package (unless a file of that name exists)."""
    path = SAMPLE_PROMPTS if str(path) == "sample" and not Path(path).exists() else Path(path)
    if not path.is_file():
        raise UserError(f"prompt file '{path}' does not exist")
    questions = []
    for number, record in read_jsonl(path):
        turns = record.get("turns") if isinstance(record, dict) else None
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise UserError(f"{path}:{number}: expected an object with a non-empty 'turns' list of strings")
        questions.append({"question_id": record.get("question_id", number), "prompt": turns[0]})
        if limit is not None and len(questions) == limit:
            break
    if not questions:
        raise UserError(f"prompt file '{path}' holds no prompts")
    return questions


def _first_mismatch(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (or where the shorter list ends); None when the lists are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def evaluate_prompt(engine, pdm, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams,
                    graph: str = "auto") -> dict:
    """One prompt in both modes. ``lossless`` is checked at temperature 0 only (None otherwise)."""
    vanilla = generate_vanilla(engine.model, prompt_ids, max_new_tokens, params, engine.eos_ids, graph=graph)
    spd = generate_spd(engine.model, pdm, prompt_ids, max_new_tokens, params, engine.eos_ids, graph=graph)
    stats = spd.stats
    mismatch = _first_mismatch(vanilla.token_ids, spd.token_ids) if params.greedy else None
    return {
        "prompt_tokens": len(prompt_ids),
        "new_tokens": stats["new_tokens"],
        "cycles": stats["cycles"],
        "accepted": stats["accepted_drafts"],
        "rejected": stats["rejected_drafts"],
        "lossless": (mismatch is None) if params.greedy else None,
        "first_mismatch": mismatch,
        "trace": "".join("A" if accepted else "R" for accepted in spd.trace),
        "vanilla_new_tokens": vanilla.stats["new_tokens"],
        "vanilla_seconds": vanilla.stats["seconds"],
        "spd_seconds": stats["seconds"],
    }


def summarize(prompts: list[dict], stages: int) -> dict:
    """Dataset totals: rates are ratios of sums over prompts (not means of per-prompt rates). Speeds only
    where the prompts were timed (``--method spd``)."""
    accepted, rejected = sum(p["accepted"] for p in prompts), sum(p["rejected"] for p in prompts)
    new_tokens, cycles = sum(p["new_tokens"] for p in prompts), sum(p["cycles"] for p in prompts)
    checked = [p["lossless"] for p in prompts if p["lossless"] is not None]
    totals = {
        "prompts": len(prompts),
        "lossless": all(checked) if checked else None,
        "lossless_prompts": sum(checked),
        "new_tokens": new_tokens,
        "cycles": cycles,
        "accepted": accepted,
        "rejected": rejected,
        "acceptance_rate": accepted / (accepted + rejected) if accepted + rejected else 0.0,
        "equivalent_accept_length": stages * new_tokens / cycles if cycles else 0.0,
    }
    if prompts and "vanilla_seconds" in prompts[0]:
        vanilla_tokens = sum(p["vanilla_new_tokens"] for p in prompts)
        vanilla_seconds, spd_seconds = sum(p["vanilla_seconds"] for p in prompts), sum(p["spd_seconds"] for p in prompts)
        vanilla_tps = vanilla_tokens / vanilla_seconds if vanilla_seconds else 0.0
        spd_tps = new_tokens / spd_seconds if spd_seconds else 0.0
        totals.update(vanilla_tokens_per_s=vanilla_tps, spd_tokens_per_s=spd_tps,
                      wall_clock_ratio=spd_tps / vanilla_tps if vanilla_tps else 0.0)
    return totals


def _dataset_name(path: str, taken) -> str:
    name = Path(path).stem
    return str(path) if name in taken else name  # same file name in two folders: keep both


def _report_header(engine, draft, pdm_spec, method: str, params: SamplingParams, max_new_tokens: int) -> dict:
    return {"model": engine.model_spec, "device": str(engine.model.device),
            "dtype": str(engine.model.dtype).replace("torch.", ""), "pdm": str(pdm_spec) if pdm_spec else "default",
            "method": method, "stages": draft.config.stages,
            "stage_layers": [b - a for a, b in draft.config.stage_bounds], "anchors": draft.config.anchors,
            "tower_layers": draft.config.tower_layers, "draft_vocab": draft.config.draft_vocab_size,
            "temperature": params.temperature, "seed": params.seed, "max_new_tokens": max_new_tokens,
            "datasets": {}}


def _load_prompts(engine, datasets: list[str], limit: int | None, max_new_tokens: int):
    """{path: questions} and {path: prompt ids}; every file and prompt is checked before anything runs."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    question_sets = {path: load_questions(path, limit) for path in datasets}
    encoded = {path: [engine.encode_prompt(q["prompt"], chat=True) for q in questions]
               for path, questions in question_sets.items()}
    for prompts in encoded.values():
        for ids in prompts:
            engine.check_length(len(ids), max_new_tokens)
    return question_sets, encoded


def evaluate(engine, datasets: list[str], *, pdm=None, stages: int | None = None,
             stage_layers: list[int] | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
             seed: int | None = None, limit: int | None = None, method: str = "spd",
             answers_cache: str | Path | None = None, progress: bool = True, graph: str = "auto") -> dict:
    """Every dataset's prompts in vanilla and SPD mode (``method="spd"``), or teacher-forced; returns the full
    report (per prompt and per dataset). ``pdm`` is a PDM directory, ``"untrained"`` or None (the model's
    shipped PDM), as for generate. ``graph``: CUDA graphs for both modes, as for generate."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if method == "teacher-forced":
        return evaluate_teacher_forced_many(engine, datasets, [pdm], stages=stages, stage_layers=stage_layers,
                                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                            limit=limit, answers_cache=answers_cache, progress=progress)[0]
    if answers_cache is not None:
        raise UserError("--answers-cache is for --method teacher-forced")
    params = SamplingParams(temperature, seed=seed)
    question_sets, encoded = _load_prompts(engine, datasets, limit, max_new_tokens)
    draft = resolve_pdm(engine, pdm, stages=stages, stage_layers=stage_layers)
    n = draft.config.stages
    first = next(iter(encoded.values()))[0]
    evaluate_prompt(engine, draft, first, min(WARMUP_TOKENS, max_new_tokens), params, graph)

    report = _report_header(engine, draft, pdm, method, params, max_new_tokens)
    total = sum(len(prompts) for prompts in encoded.values())
    started = time.perf_counter()
    with tqdm(total=total, desc="eval", unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for path, questions in question_sets.items():
            results = []
            for question, ids in zip(questions, encoded[path]):
                results.append({"question_id": question["question_id"],
                                **evaluate_prompt(engine, draft, ids, max_new_tokens, params, graph)})
                bar.update(1)
                bar.set_postfix(accept=f"{summarize(results, n)['acceptance_rate']:.3f}")
            name = _dataset_name(path, report["datasets"])
            report["datasets"][name] = {"path": str(path), **summarize(results, n), "per_prompt": results}
    report["seconds"] = time.perf_counter() - started
    return report


def evaluate_teacher_forced_many(engine, datasets: list[str], pdms: list, *, stages: int | None = None,
                                 stage_layers: list[int] | None = None, max_new_tokens: int = 256,
                                 temperature: float = 0.0, seed: int | None = None, limit: int | None = None,
                                 answers_cache: str | Path | None = None, progress: bool = True) -> list[dict]:
    """One report per PDM spec, all from the same answers and teacher passes (:mod:`teacher_forced`).

    ``answers_cache``: a JSON file holding the target's answers for exactly these prompts and settings; read
    when it matches, else written (atomically) after generating them, so later runs over other PDMs skip the
    generation. At T > 0 the answers are one draw (``seed``) shared by every PDM evaluated against them."""
    params = SamplingParams(temperature, seed=seed)
    question_sets, encoded = _load_prompts(engine, datasets, limit, max_new_tokens)
    drafts = [resolve_pdm(engine, spec, stages=stages, stage_layers=stage_layers) for spec in pdms]
    started = time.perf_counter()
    answers = None
    if answers_cache is not None:
        key = {"model": engine.model_spec, "dtype": str(engine.model.dtype), "temperature": temperature,
               "seed": seed, "max_new_tokens": max_new_tokens, "prompts": encoded}
        cache = Path(answers_cache)
        if cache.is_file():
            try:
                stored = json.loads(cache.read_text(encoding="utf-8"))
            except ValueError as exc:  # bad JSON or bad UTF-8
                raise UserError(f"answers cache '{cache}' is not valid JSON ({exc}); delete it to regenerate") from exc
            answers = stored.get("answers") if isinstance(stored, dict) and stored.get("key") == key else None
            if answers is not None and not (isinstance(answers, dict) and all(
                    isinstance(answers.get(name), list) and len(answers[name]) == len(prompts)
                    and all(isinstance(a, list) and all(type(t) is int for t in a) for a in answers[name])
                    for name, prompts in encoded.items())):
                raise UserError(f"answers cache '{cache}' is damaged; delete it to regenerate")
        if answers is None:
            answers = target_answers(engine, encoded, max_new_tokens, params, params.generator(engine.model.device),
                                     progress)
            write_text_atomic(cache, json.dumps({"key": key, "answers": answers}))
    results = evaluate_teacher_forced(engine, encoded, drafts, max_new_tokens, params, progress, answers)
    seconds = time.perf_counter() - started
    reports = []
    for spec, draft, per_set in zip(pdms, drafts, results):
        report = _report_header(engine, draft, spec, "teacher-forced", params, max_new_tokens)
        for path, per_prompt in per_set.items():
            rows = [{"question_id": q["question_id"], **r} for q, r in zip(question_sets[path], per_prompt)]
            report["datasets"][_dataset_name(path, report["datasets"])] = {
                "path": str(path), **summarize(rows, draft.config.stages), "per_prompt": rows}
        report["seconds"] = seconds
        reports.append(report)
    return reports


def accept_length_meaning(stages: int) -> str:
    """What the equivalent accept length is worth, in the words every summary uses."""
    return (f"the speedup over vanilla that {stages} devices (one stage each) or the graphed GPU path would give at "
            "this acceptance, before draft and link costs")


# Why the eager run's own wall clock says nothing about SPD's speed.
EAGER_WALL_CLOCK = ("this eager single-process run executes the stages one after another, so its wall clock checks "
                    "correctness, not speed; SPD is fast only when the stages run at the same time")


def format_table(report: dict) -> str:
    timed = report.get("method", "spd") == "spd"
    header = ("dataset", "prompts", "lossless", "acceptance", "eq. accept len") + \
        (("vanilla tok/s", "spd tok/s", "wall ratio") if timed else ())
    rows = [header]
    for name, d in report["datasets"].items():
        lossless = "n/a" if d["lossless"] is None else f"{d['lossless_prompts']}/{d['prompts']}"
        speeds = (f"{d['vanilla_tokens_per_s']:.1f}", f"{d['spd_tokens_per_s']:.1f}",
                  f"{d['wall_clock_ratio']:.2f}") if timed else ()
        rows.append((name, str(d["prompts"]), lossless, f"{d['acceptance_rate']:.3f}",
                     f"{d['equivalent_accept_length']:.2f}") + speeds)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    caption = (f"SPD n={report['stages']} (stage layers {','.join(map(str, report['stage_layers']))}), "
               f"L_s={report['tower_layers']}, draft vocab {report['draft_vocab']}, T={report['temperature']}, "
               f"max {report['max_new_tokens']} new tokens, {report['device']}" +
               ("" if timed else "; teacher-forced: no pipeline ran, so no speeds and no lossless check"))
    notes = [f"eq. accept len: n x new tokens / cycles, {accept_length_meaning(report['stages'])}"]
    if timed:
        notes.append(f"wall ratio: spd tok/s / vanilla tok/s; {EAGER_WALL_CLOCK}")
    return "\n".join([caption, *lines, *notes])


def add_arguments(p) -> None:
    from .cli import _add_model_args, _add_spd_args

    _add_model_args(p)
    _add_spd_args(p)
    p.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                   help="prompt sets in EAGLE question.jsonl format (first turn is used); 'sample' is a "
                        "12-prompt set shipped with the package")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--method", choices=METHODS, default="spd",
                   help="spd: run vanilla and the real pipeline on every prompt (speeds, lossless check); "
                        "teacher-forced: the same acceptance trace from the target's answer and one forward "
                        "pass per prompt (fast; no speeds, no lossless check)")
    p.add_argument("--answers-cache", default=None, metavar="JSON",
                   help="teacher-forced: keep the target's answers in this file and reuse them when the prompts "
                        "and settings match (evaluating several PDMs then generates them once)")
    p.add_argument("--out", default=None, help="write the full report (per prompt, with traces) as JSON here")


def run(args) -> int:
    """Exit status 1 when any temperature-0 prompt was not lossless."""
    from .engine import Engine

    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    report = evaluate(engine, args.data, pdm=args.pdm, stages=args.stages, stage_layers=args.stage_layers,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                      limit=args.limit, method=args.method,
                      answers_cache=args.answers_cache, graph=args.graph)
    print(format_table(report))
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    failed = [name for name, d in report["datasets"].items() if d["lossless"] is False]
    if failed:
        print(f"spd-engine: SPD output differs from vanilla at temperature 0 in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
