"""Acceptance, losslessness and speed of the decoding modes over prompt sets (EAGLE ``question.jsonl`` format).

    spd-engine eval --stages 4 --pdm DIR --data mt_bench.jsonl gsm8k.jsonl --limit 10 --max-new-tokens 64 --out r.json
    spd-engine eval --modes vanilla,spd --stages 4 --data sample --limit 4 --out modes.json

Each prompt is the record's first turn under the model's chat template. It runs in vanilla mode (the reference)
and in each mode evaluated; at temperature 0 a mode must produce vanilla's token ids (``lossless``). Per dataset
it reports the acceptance rate (accepted / verified drafts), tokens per target pass and the mode's theoretical
speedup (for SPD both are the equivalent accept length, n × new tokens / cycles), both runs' tokens per second
and their wall-clock ratio on this device. Those speedups are different numbers and are reported side by side,
never mixed.

``--mode M`` (default spd) writes M's report: its settings, then per dataset the totals and every prompt
(trace included). ``--modes A,B,...`` runs several modes on the same prompts and writes one section per mode.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .errors import UserError
from .jsonl import read_jsonl, write_text_atomic
from .modes import MODE_NAMES, REFERENCE_MODE, check_options, mode_class
from .modes.spd import EAGER_WALL_CLOCK, accept_length_meaning, describe_pdm, spd_totals
from .sampling import SamplingParams
from .spd import resolve_pdm
from .teacher_forced import evaluate_teacher_forced, target_answers

METHODS = ("spd", "teacher-forced")
TEACHER_FORCED_MODE = "spd"  # teacher forcing replays SPD's cycle from the target's answer (teacher_forced.py)
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


def evaluate_prompt(engine, modes: dict[str, dict], prompt_ids: list[int], max_new_tokens: int,
                    params: SamplingParams, graph: str = "auto") -> dict[str, dict]:
    """One prompt in vanilla decoding and in each of ``modes`` ({name: its options}): one row per mode.
    ``lossless`` is checked at temperature 0 only (None otherwise)."""
    def run(name: str, options: dict):
        return engine.generate(prompt_ids=prompt_ids, mode=name, max_new_tokens=max_new_tokens,
                               temperature=params.temperature, seed=params.seed, graph=graph, **options)

    reference = run(REFERENCE_MODE, {})
    rows = {}
    for name, options in modes.items():
        result = reference if name == REFERENCE_MODE else run(name, options)
        stats = result.stats
        mismatch = _first_mismatch(reference.token_ids, result.token_ids) if params.greedy else None
        accepted = sum(result.trace)
        rows[name] = {
            "prompt_tokens": len(prompt_ids),
            "new_tokens": stats.new_tokens,
            **engine.decoding_mode(name, **options).eval_row(stats),
            "accepted": accepted,
            "rejected": len(result.trace) - accepted,
            "tokens_per_target_pass": stats.tokens_per_target_pass,
            "theoretical_speedup": stats.theoretical_speedup,
            "lossless": (mismatch is None) if params.greedy else None,
            "first_mismatch": mismatch,
            "trace": "".join("A" if verdict else "R" for verdict in result.trace),
            "vanilla_new_tokens": reference.stats.new_tokens,
            "vanilla_seconds": reference.stats.seconds,
            f"{name}_seconds": stats.seconds,
        }
    return rows


def _tokens_per_cost(prompts: list[dict], rate: str) -> float:
    """A per-token rate (tokens per target pass, a speedup) over a dataset: all tokens over all cost, a
    prompt's cost being its tokens / its rate (so it is a ratio of sums, as every dataset rate here)."""
    tokens = sum(p["new_tokens"] for p in prompts)
    cost = sum(p["new_tokens"] / p[rate] for p in prompts if p[rate])
    return tokens / cost if cost else 0.0


def summarize(prompts: list[dict], mode: str) -> dict:
    """``mode``'s dataset totals: rates are ratios of sums over prompts (not means of per-prompt rates).
    Speeds only where the prompts were timed (not teacher-forced)."""
    accepted, rejected = sum(p["accepted"] for p in prompts), sum(p["rejected"] for p in prompts)
    new_tokens = sum(p["new_tokens"] for p in prompts)
    checked = [p["lossless"] for p in prompts if p["lossless"] is not None]
    totals = {
        "prompts": len(prompts),
        "lossless": all(checked) if checked else None,
        "lossless_prompts": sum(checked),
        "new_tokens": new_tokens,
        "accepted": accepted,
        "rejected": rejected,
        "acceptance_rate": accepted / (accepted + rejected) if accepted + rejected else None,  # None: no drafts
    }
    if prompts and "tokens_per_target_pass" in prompts[0]:
        totals.update(tokens_per_target_pass=_tokens_per_cost(prompts, "tokens_per_target_pass"),
                      theoretical_speedup=_tokens_per_cost(prompts, "theoretical_speedup"))
    if prompts and "vanilla_seconds" in prompts[0]:
        vanilla_tokens = sum(p["vanilla_new_tokens"] for p in prompts)
        vanilla_seconds = sum(p["vanilla_seconds"] for p in prompts)
        mode_seconds = sum(p[f"{mode}_seconds"] for p in prompts)
        vanilla_tps = vanilla_tokens / vanilla_seconds if vanilla_seconds else 0.0
        mode_tps = new_tokens / mode_seconds if mode_seconds else 0.0
        totals.update({"vanilla_tokens_per_s": vanilla_tps, f"{mode}_tokens_per_s": mode_tps,
                       "wall_clock_ratio": mode_tps / vanilla_tps if vanilla_tps else 0.0})
    return totals


def _dataset_name(path: str, taken) -> str:
    name = Path(path).stem
    return str(path) if name in taken else name  # same file name in two folders: keep both


def _report_header(engine, method: str, params: SamplingParams, max_new_tokens: int, settings: dict) -> dict:
    return {"model": engine.model_spec, "device": str(engine.model.device),
            "dtype": str(engine.model.dtype).replace("torch.", ""), "method": method, **settings,
            "temperature": params.temperature, "seed": params.seed, "max_new_tokens": max_new_tokens}


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


def _selected_modes(engine, names: list[str], options: dict) -> dict[str, dict]:
    """{mode: its own options (those given)}. An option no selected mode takes is the one-line error naming
    the mode it belongs to; every mode is made (its drafts loaded and checked) before anything runs."""
    classes = {name: mode_class(name) for name in names}
    given = {keyword: value for keyword, value in options.items() if value is not None}
    for keyword in given:
        if not any(keyword in mode.options for mode in classes.values()):
            check_options(next(iter(classes.values())), [keyword])  # raises
    selected = {name: {keyword: value for keyword, value in given.items() if keyword in mode.options}
                for name, mode in classes.items()}
    for name, own in selected.items():
        engine.decoding_mode(name, **own)
    return selected


def _run_modes(engine, modes: dict[str, dict], question_sets: dict, encoded: dict, max_new_tokens: int,
               params: SamplingParams, graph: str, progress: bool) -> dict[str, dict[str, list[dict]]]:
    """{mode: {path: per-prompt rows}}: every prompt runs once in vanilla decoding and once in each mode."""
    first = next(iter(encoded.values()))[0]
    evaluate_prompt(engine, modes, first, min(WARMUP_TOKENS, max_new_tokens), params, graph)
    rows: dict[str, dict[str, list[dict]]] = {name: {path: [] for path in encoded} for name in modes}
    total = sum(len(prompts) for prompts in encoded.values())
    with tqdm(total=total, desc="eval", unit="prompt", disable=not progress, file=sys.stderr) as bar:
        for path, questions in question_sets.items():
            for question, ids in zip(questions, encoded[path]):
                for name, row in evaluate_prompt(engine, modes, ids, max_new_tokens, params, graph).items():
                    rows[name][path].append({"question_id": question["question_id"], **row})
                bar.update(1)
                bar.set_postfix({f"{name} accept": _acceptance_cell(summarize(rows[name][path], name))
                                 for name in modes})
    return rows


def _datasets(engine, name: str, options: dict, rows: dict[str, list[dict]]) -> dict:
    """One mode's section of a report, per dataset: the totals, then every prompt."""
    mode = engine.decoding_mode(name, **options)
    datasets: dict[str, dict] = {}
    for path, prompts in rows.items():
        datasets[_dataset_name(path, datasets)] = {
            "path": str(path), **summarize(prompts, name), **mode.eval_totals(prompts), "per_prompt": prompts}
    return datasets


def evaluate(engine, datasets: list[str], *, mode: str = "spd", max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int | None = None, limit: int | None = None, method: str = "spd",
             answers_cache: str | Path | None = None, progress: bool = True, graph: str = "auto",
             **mode_options) -> dict:
    """Every dataset's prompts in vanilla decoding and in ``mode`` (``method="spd"``: really run), or
    teacher-forced (SPD only); returns the full report (per prompt and per dataset). ``mode_options`` are
    the mode's own, as for :meth:`Engine.generate` (SPD: ``pdm`` a PDM directory, ``"untrained"`` or None for
    the model's shipped PDM; ``stages``; ``stage_layers``). ``graph``: CUDA graphs for both runs."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got '{method}'")
    if method == "teacher-forced":
        if mode != TEACHER_FORCED_MODE:
            raise UserError(f"--method teacher-forced replays SPD's cycle: use it with --mode {TEACHER_FORCED_MODE}")
        check_options(mode_class(mode), [keyword for keyword, value in mode_options.items() if value is not None])
        return evaluate_teacher_forced_many(engine, datasets, [mode_options.get("pdm")],
                                            stages=mode_options.get("stages"),
                                            stage_layers=mode_options.get("stage_layers"),
                                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                                            limit=limit, answers_cache=answers_cache, progress=progress)[0]
    if answers_cache is not None:
        raise UserError("--answers-cache is for --method teacher-forced")
    params = SamplingParams(temperature, seed=seed)
    question_sets, encoded = _load_prompts(engine, datasets, limit, max_new_tokens)
    modes = _selected_modes(engine, [mode], mode_options)
    started = time.perf_counter()
    rows = _run_modes(engine, modes, question_sets, encoded, max_new_tokens, params, graph, progress)
    settings = {"mode": mode, **engine.decoding_mode(mode, **modes[mode]).describe()}
    report = _report_header(engine, method, params, max_new_tokens, settings)
    report["datasets"] = _datasets(engine, mode, modes[mode], rows[mode])
    report["seconds"] = time.perf_counter() - started
    return report


def evaluate_modes(engine, datasets: list[str], modes: list[str], *, max_new_tokens: int = 256,
                   temperature: float = 0.0, seed: int | None = None, limit: int | None = None,
                   progress: bool = True, graph: str = "auto", **mode_options) -> dict:
    """Several modes on the same prompts (each prompt also once in vanilla decoding, the reference): one
    report with a section per mode, each as :func:`evaluate` reports that mode alone."""
    params = SamplingParams(temperature, seed=seed)
    question_sets, encoded = _load_prompts(engine, datasets, limit, max_new_tokens)
    selected = _selected_modes(engine, list(dict.fromkeys(modes)), mode_options)
    started = time.perf_counter()
    rows = _run_modes(engine, selected, question_sets, encoded, max_new_tokens, params, graph, progress)
    report = _report_header(engine, "spd", params, max_new_tokens, {"modes": {}})
    for name, options in selected.items():
        report["modes"][name] = {**engine.decoding_mode(name, **options).describe(),
                                 "datasets": _datasets(engine, name, options, rows[name])}
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
        settings = {"mode": TEACHER_FORCED_MODE, **describe_pdm(spec, draft)}
        report = _report_header(engine, "teacher-forced", params, max_new_tokens, settings)
        report["datasets"] = {}
        for path, per_prompt in per_set.items():
            rows = [{"question_id": q["question_id"], **r} for q, r in zip(question_sets[path], per_prompt)]
            report["datasets"][_dataset_name(path, report["datasets"])] = {
                "path": str(path), **summarize(rows, TEACHER_FORCED_MODE), **spd_totals(rows, draft.config.stages),
                "per_prompt": rows}
        report["seconds"] = seconds
        reports.append(report)
    return reports


def report_sections(report: dict):
    """(mode, its settings, dataset name, dataset section) for every dataset of a one-mode or a --modes report."""
    if "modes" in report:
        for mode, section in report["modes"].items():
            settings = {k: v for k, v in section.items() if k != "datasets"}
            for name, d in section["datasets"].items():
                yield mode, settings, name, d
    else:
        settings = {k: v for k, v in report.items() if k != "datasets"}
        for name, d in report["datasets"].items():
            yield report.get("mode", TEACHER_FORCED_MODE), settings, name, d


def add_predictions(report: dict, times, link) -> dict:
    """Every dataset's ``predicted``: the simulator's multi-device speed for its mode from its traces
    (:meth:`DecodingMode.predict`), with the step times and link recorded once in ``report["prediction"]``."""
    from dataclasses import asdict

    for mode, settings, _, d in report_sections(report):
        d["predicted"] = mode_class(mode).predict(settings, d["per_prompt"], times, link)
    report["prediction"] = {"link": asdict(link), "step_times": {"device": times.device, "model": times.model,
                                                                 "source": times.source}}
    return report


def _predicted_cell(d: dict) -> str:
    predicted = d.get("predicted")
    return "n/a" if not predicted else f"{predicted['speedup']:.2f}x on {predicted['devices']}"


def _aligned(rows: list[tuple]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows]


def _lossless_cell(d: dict) -> str:
    return "n/a" if d["lossless"] is None else f"{d['lossless_prompts']}/{d['prompts']}"


def _acceptance_cell(d: dict) -> str:
    return "n/a" if d["acceptance_rate"] is None else f"{d['acceptance_rate']:.3f}"


def format_table(report: dict) -> str:
    """One mode's report (:func:`evaluate`): a row per dataset."""
    mode = report.get("mode", TEACHER_FORCED_MODE)
    timed = report.get("method", "spd") == "spd"
    spd_pipeline = "equivalent_accept_length" in next(iter(report["datasets"].values()))
    rates = ("eq. accept len",) if spd_pipeline else ("tok/target pass", "theor. speedup")
    # The reference mode's own report has one speed: its run is the reference run.
    speed_columns = ("vanilla tok/s",) + (() if mode == REFERENCE_MODE else (f"{mode} tok/s", "wall ratio"))
    predicted = any("predicted" in d for d in report["datasets"].values())
    header = ("dataset", "prompts", "lossless", "acceptance", *rates) + (speed_columns if timed else ()) + \
        (("predicted",) if predicted else ())
    rows = [header]
    for name, d in report["datasets"].items():
        rate_cells = (f"{d['equivalent_accept_length']:.2f}",) if spd_pipeline else \
            (f"{d['tokens_per_target_pass']:.2f}", f"{d['theoretical_speedup']:.2f}")
        speeds = (f"{d['vanilla_tokens_per_s']:.1f}", f"{d[f'{mode}_tokens_per_s']:.1f}",
                  f"{d['wall_clock_ratio']:.2f}")[:len(speed_columns)] if timed else ()
        rows.append((name, str(d["prompts"]), _lossless_cell(d), _acceptance_cell(d), *rate_cells) + speeds +
                    ((_predicted_cell(d),) if predicted else ()))
    settings = f"T={report['temperature']}, max {report['max_new_tokens']} new tokens, {report['device']}"
    if "stages" in report:  # an SPD pipeline (real or teacher-forced)
        caption = (f"SPD n={report['stages']} (stage layers {','.join(map(str, report['stage_layers']))}), "
                   f"L_s={report['tower_layers']}, draft vocab {report['draft_vocab']}, {settings}" +
                   ("" if timed else "; teacher-forced: no pipeline ran, so no speeds and no lossless check"))
    else:
        caption = f"{mode}, {settings}"
    notes = [f"eq. accept len: n x new tokens / cycles, {accept_length_meaning(report['stages'])}"] if spd_pipeline \
        else [TOKENS_PER_TARGET_PASS]
    if timed and mode != REFERENCE_MODE:
        notes.append(f"wall ratio: {mode} tok/s / vanilla tok/s" + (f"; {EAGER_WALL_CLOCK}" if spd_pipeline else ""))
    if predicted:
        notes.append(_prediction_note(report))
    return "\n".join([caption, *_aligned(rows), *notes])


def _prediction_note(report: dict) -> str:
    how = report["prediction"]
    return (f"predicted: the simulator's speedup over vanilla on one device, with the mode's work on that many "
            f"devices (step times: {how['step_times']['device']}, {how['step_times']['source']}; link "
            f"{how['link']['name']})")


TOKENS_PER_TARGET_PASS = ("tok/target pass: new tokens per full pass of the target's layers (vanilla 1, SPD n x new "
                          "tokens / cycles); theor. speedup: the mode's paper's own measure, from these counts")


def format_modes_table(report: dict) -> str:
    """Several modes' report (:func:`evaluate_modes`): a row per mode and dataset, side by side."""
    predicted = "prediction" in report
    header = ("mode", "dataset", "prompts", "lossless", "acceptance", "tok/target pass", "theor. speedup", "tok/s",
              "wall ratio") + (("predicted",) if predicted else ())
    rows = [header]
    for mode, section in report["modes"].items():
        for name, d in section["datasets"].items():
            rows.append((mode, name, str(d["prompts"]), _lossless_cell(d), _acceptance_cell(d),
                         f"{d['tokens_per_target_pass']:.2f}", f"{d['theoretical_speedup']:.2f}",
                         f"{d[f'{mode}_tokens_per_s']:.1f}", f"{d['wall_clock_ratio']:.2f}") +
                        ((_predicted_cell(d),) if predicted else ()))
    caption = (f"{', '.join(report['modes'])} on the same prompts, T={report['temperature']}, "
               f"max {report['max_new_tokens']} new tokens, {report['device']}")
    notes = [TOKENS_PER_TARGET_PASS,
             "wall ratio: the mode's tok/s / vanilla tok/s in this process, on this device (lossless: same tokens "
             "as vanilla at T=0)"] + ([_prediction_note(report)] if predicted else [])
    return "\n".join([caption, *_aligned(rows), *notes])


def modes_arg(text: str) -> list[str]:
    """``--modes vanilla,spd``: registered mode names, comma-separated."""
    import argparse

    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in MODE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated modes out of {', '.join(MODE_NAMES)}, got '{text}'")
    return names


def add_arguments(p) -> None:
    from .cli import _add_model_args, add_decoding_args

    _add_model_args(p)
    add_decoding_args(p, default_mode=TEACHER_FORCED_MODE)
    p.add_argument("--modes", type=modes_arg, default=None, metavar="A,B,...",
                   help="run several modes on the same prompts and report them side by side (instead of --mode)")
    p.add_argument("--data", nargs="+", required=True, metavar="JSONL",
                   help="prompt sets in EAGLE question.jsonl format (first turn is used); 'sample' is a "
                        "12-prompt set shipped with the package")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each set")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--method", choices=METHODS, default="spd",
                   help="spd: run vanilla decoding and the mode itself on every prompt (speeds, lossless check); "
                        "teacher-forced (--mode spd only): SPD's acceptance trace from the target's answer and one "
                        "forward pass per prompt (fast; no speeds, no lossless check)")
    p.add_argument("--answers-cache", default=None, metavar="JSON",
                   help="teacher-forced: keep the target's answers in this file and reuse them when the prompts "
                        "and settings match (evaluating several PDMs then generates them once)")
    p.add_argument("--out", default=None, help="write the full report (per prompt, with traces) as JSON here")
    p.add_argument("--times", default=None, metavar="JSON",
                   help="step times for the predicted multi-device speed (`spd-engine simulate --save-times`, or "
                        "a GPU benchmark's); default: measured here after the runs")
    p.add_argument("--link", default="nvlink", help="link between devices for the prediction (a simulate preset)")
    p.add_argument("--no-predict", dest="predict", action="store_false",
                   help="leave out the predicted multi-device speed (and the step-time measurement it needs)")


def _measured_step_times(engine, report: dict):
    """The step times measured here, with the PDM's time at the report's SPD n (if any)."""
    from .simulate import busy_machine_warning, measure_step_times

    stages = sorted({settings["stages"] for mode, settings, _, _ in report_sections(report) if "stages" in settings})
    busy = busy_machine_warning()
    if busy and engine.model.device.type == "cpu":
        print(busy, file=sys.stderr)
    print(f"measuring step times on {engine.model.device} for the prediction (--no-predict skips this) ...",
          file=sys.stderr)
    return measure_step_times(engine, stages or [2])


def run(args) -> int:
    """Exit status 1 when any temperature-0 prompt was not lossless."""
    from .cli import mode_options
    from .engine import Engine

    if args.modes and (args.method != "spd" or args.answers_cache):
        raise UserError("--modes runs every mode for real: drop --method teacher-forced and --answers-cache")
    if args.predict:  # a bad preset or times file fails now, not after the runs
        from .simulate import StepTimes, resolve_link

        link = resolve_link(args.link, None, None)
        times = StepTimes.from_json(args.times) if args.times else None
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype, backend=args.backend)
    settings = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                    limit=args.limit, graph=args.graph, **mode_options(args))
    if args.modes:
        report = evaluate_modes(engine, args.data, args.modes, **settings)
    else:
        report = evaluate(engine, args.data, mode=args.mode, method=args.method, answers_cache=args.answers_cache,
                          **settings)
    if args.predict:
        add_predictions(report, times or _measured_step_times(engine, report), link)
    print(format_modes_table(report) if args.modes else format_table(report))
    sections = {f"{mode} on {name}" if args.modes else name: d for mode, _, name, d in report_sections(report)}
    if args.out:
        write_text_atomic(args.out, json.dumps(report, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    failed = [name for name, d in sections.items() if d["lossless"] is False]
    if failed:
        print(f"spd-engine: output differs from vanilla decoding at temperature 0 in: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0
