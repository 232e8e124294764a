"""The paper-style PDM evaluation table: every given PDM on MT-Bench, GSM8K and HumanEval, teacher-forced.

    python bench/pdm_eval_table.py --pdm v3=/tmp/pdm_v3 n3=/tmp/pdm_n3 ... --temperatures 0 1 \\
        --limit 80 --max-new-tokens 256 --out-dir bench/results --work /tmp/pdm_eval

Teacher-forced evaluation (``spd_engine.teacher_forced``) gives each PDM exactly the acceptance trace the real
pipeline would produce at T=0 (and the same distribution at T>0) from one batched generation of the target's
answers per temperature plus one forward per prompt, so the full 80-prompt x 256-token table fits a CPU.
It does not run the pipeline, so it neither times it nor checks losslessness: ``spd-engine eval`` (the
default ``--method spd``) does both.

Writes ``<out-dir>/pdm_tf_<name>_t<T>.json`` (the report ``spd-engine eval --out`` writes), then the Markdown
table ``<out-dir>/pdm_tf_table.md`` and a bar chart ``<out-dir>/pdm_tf_table.png`` over every such report
there (with the steps and validation top-1 of ``<out-dir>/pdm_<name>_train.json`` where one exists, and the
lossless and trace-agreement counts of the real-pipeline T=0 runs ``<out-dir>/pdm_real_<name>_t0_<N>tok.json``);
keeps the target's answers in ``<work>/answers_t<T>.json`` so a rerun with more PDMs skips generating them.
Without ``--pdm`` it only rebuilds the table and the chart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spd_engine.engine import Engine  # noqa: E402
from spd_engine.errors import UserError  # noqa: E402
from spd_engine.evaluate import evaluate_teacher_forced_many  # noqa: E402
from spd_engine.jsonl import write_text_atomic  # noqa: E402

EVAL_DIR = "/work/shared/data/eval"
SETS = ("mt_bench", "gsm8k", "humaneval")


def parse_pdms(items: list[str]) -> dict[str, str]:
    pdms = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--pdm takes NAME=DIR (or NAME=default), got '{item}'")
        pdms[name] = None if path == "default" else path
    return pdms


def lossless_column(real: list[dict], teacher_forced: dict) -> str:
    """'6/6 (32 tok), traces 6/6': prompts whose real-pipeline T=0 output equalled vanilla, over every real run of a
    PDM, and prompts whose real acceptance trace is a prefix of the teacher-forced one (the exactness check)."""
    if not real:
        return "-"
    forced = {(name, p["question_id"]): p["trace"]
              for name, d in teacher_forced["datasets"].items() for p in d["per_prompt"]}
    prompts = [(name, p) for r in real for name, d in r["datasets"].items() for p in d["per_prompt"]]
    equal = sum(p["lossless"] for _, p in prompts)
    same_trace = sum(forced.get((name, p["question_id"]), "").startswith(p["trace"]) for name, p in prompts)
    tokens = "/".join(sorted({str(r["max_new_tokens"]) for r in real}))
    return f"{equal}/{len(prompts)} ({tokens} tok), traces {same_trace}/{len(prompts)}"


def fill_split(report: dict) -> list[float]:
    """Acceptance at each pipeline fill 1..n over every set, from the traces: a draft is made at fill
    min(tokens since the last restart, n), and the first answer token restarts the pipeline."""
    n = report["stages"]
    hits, seen = [0] * n, [0] * n
    for data in report["datasets"].values():
        for prompt in data["per_prompt"]:
            since = 1
            for outcome in prompt["trace"]:
                fill = min(since, n) - 1
                seen[fill] += 1
                hits[fill] += outcome == "A"
                since = since + 1 if outcome == "A" else 1
    return [h / s if s else float("nan") for h, s in zip(hits, seen)]


def vocab_coverage(pdm_dir: str | None, answers_path: Path) -> float | None:
    """Fraction of the target's committed answer tokens that the PDM's draft vocabulary holds (a token outside
    it is a certain rejection)."""
    from safetensors.torch import load_file

    from spd_engine.spd import default_pdm_dir

    if not answers_path.is_file():
        return None
    weights = Path(pdm_dir or default_pdm_dir("default")) / "pdm.safetensors"
    vocab = set(load_file(str(weights))["draft_vocab"].tolist())
    cached = json.loads(answers_path.read_text())
    tokens = [t for answers in cached["answers"].values() for answer in answers for t in answer[1:]]
    return sum(t in vocab for t in tokens) / max(len(tokens), 1)


def table(reports: dict[tuple[str, float], dict], trained: dict[str, dict], real: dict[str, list[dict]]) -> str:
    """One row per (PDM, T); ``trained`` maps PDM names to their train-pdm reports (steps, val top-1), ``real``
    to their real-pipeline T=0 reports (the lossless check teacher-forced evaluation cannot make)."""
    lines = ["| PDM | n (stage layers) | L_s | anchors | steps | val top-1 | T | "
             + " | ".join(f"{s} acc / eq. len" for s in SETS)
             + " | mean acc | mean eq. accept len | acc by fill 1..n | vocab coverage "
             "| real pipeline T=0: lossless, trace = teacher-forced |",
             "|---|---|---|---|---|---|---|" + "---|" * (len(SETS) + 5)]
    for (name, temperature), r in reports.items():
        d = r["datasets"]
        acc = [d[s]["acceptance_rate"] for s in SETS]
        eal = [d[s]["equivalent_accept_length"] for s in SETS]
        train = trained.get(name)
        steps, top1 = "-", "-"
        if train:  # a cache-trained PDM reports held-out acceptance per fill instead of top-1
            val = train["val"]
            steps, top1 = str(train["steps"]), f"{val.get('top1', val.get('acceptance_full_pipeline')):.3f}"
        coverage = f"{r['vocab_coverage']:.3f}" if r.get("vocab_coverage") is not None else "-"
        lines.append(f"| {name} | {r['stages']} ({'/'.join(map(str, r['stage_layers']))}) | {r['tower_layers']} | "
                     f"{','.join(map(str, r['anchors']))} | {steps} | {top1} | {temperature:g} | " +
                     " | ".join(f"{a:.3f} / {e:.2f}" for a, e in zip(acc, eal)) +
                     f" | {sum(acc) / len(acc):.3f} | **{sum(eal) / len(eal):.2f}** | "
                     f"{' / '.join(f'{a:.2f}' for a in fill_split(r))} | {coverage} | "
                     f"{lossless_column(real.get(name, []), r) if temperature == 0 else 'n/a'} |")
    return "\n".join(lines)


def plot(reports: dict[tuple[str, float], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(reports)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4))
    width = 0.8 / len(SETS)
    for i, name in enumerate(SETS):
        ax.bar([k + (i - 1) * width for k in range(len(keys))],
               [reports[key]["datasets"][name]["equivalent_accept_length"] for key in keys], width, label=name)
    ax.set_xticks(range(len(keys)), [f"{name}\nn={reports[(name, t)]['stages']} T={t:g}" for name, t in keys],
                  fontsize=8)
    ax.axhline(3.39, color="grey", linestyle="--", linewidth=1, label="paper, 4B, n=8 (3.39)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_ylabel("equivalent accept length (n x tokens / cycles)")
    ax.set_title("SPD draft modules on SmolLM2-135M-Instruct, teacher-forced")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pdm", nargs="*", default=[], metavar="NAME=DIR",
                   help="PDMs to evaluate; none: only rebuild the table and plot from the reports in --out-dir")
    p.add_argument("--data", nargs="+", default=[f"{EVAL_DIR}/{s}.jsonl" for s in SETS])
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--limit", type=int, default=80)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="draws the T>0 answers and outcomes")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--work", default="/tmp/pdm_eval", help="keeps the target's answers between runs")
    args = p.parse_args()
    try:
        pdms = parse_pdms(args.pdm)
        out_dir, work = Path(args.out_dir), Path(args.work)
        reports = {}
        if pdms:
            engine = Engine.load(args.model, device=args.device)
            for temperature in args.temperatures:
                runs = evaluate_teacher_forced_many(
                    engine, args.data, list(pdms.values()), max_new_tokens=args.max_new_tokens,
                    temperature=temperature, seed=args.seed, limit=args.limit,
                    answers_cache=work / f"answers_t{temperature:g}.json")
                for name, report in zip(pdms, runs):
                    report["vocab_coverage"] = vocab_coverage(pdms[name], work / f"answers_t{temperature:g}.json")
                    write_text_atomic(out_dir / f"pdm_tf_{name}_t{temperature:g}.json", json.dumps(report, indent=1))
                    reports[(name, temperature)] = report
    except UserError as exc:
        print(f"pdm_eval_table: {exc}", file=sys.stderr)
        return 2
    # The table covers every report in out-dir, so PDMs evaluated in earlier runs stay in it.
    for path in sorted(out_dir.glob("pdm_tf_*_t*.json")):
        report = json.loads(path.read_text())
        name = path.stem[len("pdm_tf_"): path.stem.rindex("_t")]
        reports.setdefault((name, report["temperature"]), report)
    reports = dict(sorted(reports.items(), key=lambda item: (item[0][1], item[1]["stages"], item[0][0])))
    names = {name for name, _ in reports}
    trained = {name: json.loads(path.read_text()) for name in names
               if (path := out_dir / f"pdm_{name}_train.json").is_file()}
    real = {name: [json.loads(path.read_text()) for path in sorted(out_dir.glob(f"pdm_real_{name}_t0_*tok.json"))]
            for name in names}
    text = table(reports, trained, real)
    write_text_atomic(out_dir / "pdm_tf_table.md", text + "\n")
    plot(reports, out_dir / "pdm_tf_table.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
