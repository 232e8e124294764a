"""Held-out acceptance against answer tokens seen, from train-pdm --cache reports (their ``history``).

    python bench/plot_pdm_history.py bench/results/pdm_v4_n4_train.json ... --out bench/results/pdm_v4_history.png

Each report's history holds, at every checkpoint, the answer tokens trained on so far and the held-out
acceptance at every pipeline fill (the PDM's agreement with the target's next token on conversations never
trained on). The plot shows fill 1 (right after a flush: most drafts at low acceptance) solid and the full
pipeline dashed, one colour per report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--start", action="append", default=[], metavar="REPORT=TOKENS",
                   help="a run that continued another (train-pdm --init): answer tokens already seen when it "
                        "started, so its curve continues the other's")
    args = p.parse_args()
    starts = {}
    for item in args.start:
        path, _, tokens = item.rpartition("=")
        try:
            starts[Path(path)] = float(tokens) / 1e3
        except ValueError:
            print(f"plot_pdm_history: --start wants REPORT=TOKENS, got '{item}'", file=sys.stderr)
            return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for index, path in enumerate(args.reports):
        try:
            report = json.loads(path.read_text())
            history = report["history"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            print(f"plot_pdm_history: {path}: not a train-pdm --cache report ({exc})", file=sys.stderr)
            return 2
        name = path.stem.removeprefix("pdm_").removesuffix("_train")
        n = str(report["stages"])
        start = starts.get(path, 0.0)
        seen = [start] + [start + h["answer_tokens_seen"] / 1e3 for h in history]
        for fill, style in (("1", "-"), (n, "--")):
            values = [report["val_initial"]["acceptance_by_fill"][fill]] + \
                [h["val"]["acceptance_by_fill"][fill] for h in history]
            ax.plot(seen, values, style, color=f"C{index}", marker=".",
                    label=f"{name} (n={n}) fill {fill}" + (" = full" if fill == n else ""))
    ax.set_xlabel("answer tokens trained on (thousands)")
    ax.set_ylabel("held-out acceptance (agreement with the target)")
    ax.set_title("PDM acceptance vs training tokens, SmolLM2-135M-Instruct (CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
