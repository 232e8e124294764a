"""The side-by-side figures of `spd-engine eval --modes` reports: a markdown table and a bar chart.

    python bench/plot_modes.py bench/results/modes_t0.json bench/results/modes_t1.json \
        --out bench/results/modes_table.png --markdown bench/results/modes_table.md

One row per (temperature, mode, dataset): acceptance, tokens per target pass (each method's equivalent accept
length, README "Decoding modes"), the theoretical speedup its paper defines, the simulator's predicted
multi-device speedup, and losslessness (T=0). The chart shows tokens per target pass and the predicted speedup
per mode and dataset, one panel per temperature.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows_of(report: dict) -> list[dict]:
    rows = []
    for mode, section in report["modes"].items():
        for name, d in section["datasets"].items():
            predicted = d.get("predicted") or {}
            rows.append({"T": report["temperature"], "mode": mode, "dataset": name, "prompts": d["prompts"],
                         "lossless": d["lossless"], "lossless_prompts": d["lossless_prompts"],
                         "acceptance": d["acceptance_rate"], "tokens_per_target_pass": d["tokens_per_target_pass"],
                         "theoretical_speedup": d["theoretical_speedup"], "predicted": predicted.get("speedup"),
                         "devices": predicted.get("devices")})
    return rows


def markdown(reports: list[dict]) -> str:
    first = reports[0]
    lines = [f"Default model, {first['device']}, max {first['max_new_tokens']} new tokens; predicted: the simulator's speedup over vanilla on one "
             f"device ({first.get('prediction', {}).get('link', {}).get('name', 'no')} link, step times "
             f"{first.get('prediction', {}).get('step_times', {}).get('device', 'n/a')})", "",
             "| T | mode | dataset | prompts | lossless | acceptance | tok / target pass | theoretical speedup | "
             "predicted (devices) |", "|---|---|---|---|---|---|---|---|---|"]
    for report in reports:
        for r in rows_of(report):
            lossless = "n/a" if r["lossless"] is None else f"{r['lossless_prompts']}/{r['prompts']}"
            acceptance = "n/a" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
            predicted = "n/a" if r["predicted"] is None else f"{r['predicted']:.2f}x ({r['devices']})"
            lines.append(f"| {r['T']:g} | {r['mode']} | {r['dataset']} | {r['prompts']} | {lossless} | {acceptance} | "
                         f"{r['tokens_per_target_pass']:.2f} | {r['theoretical_speedup']:.2f} | {predicted} |")
    return "\n".join(lines) + "\n"


def plot(reports: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(6 * len(reports), 4), squeeze=False, sharey=True)
    for ax, report in zip(axes[0], reports):
        rows = rows_of(report)
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        datasets = list(dict.fromkeys(r["dataset"] for r in rows))
        width = 0.8 / len(modes)
        for m, mode in enumerate(modes):
            mine = {r["dataset"]: r for r in rows if r["mode"] == mode}
            xs = [d + m * width for d in range(len(datasets))]
            bars = ax.bar(xs, [mine[d]["tokens_per_target_pass"] for d in datasets], width, label=mode)
            predicted = [mine[d]["predicted"] for d in datasets]
            if all(p is not None for p in predicted):
                ax.scatter(xs, predicted, color=bars.patches[0].get_facecolor(), edgecolor="black", marker="D",
                           zorder=3, s=25)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks([d + 0.4 - width / 2 for d in range(len(datasets))], datasets)
        ax.set_title(f"T = {report['temperature']:g}")
        if ax is axes[0][0]:
            ax.set_ylabel("bars: tokens per target pass\ndiamonds: predicted speedup")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the chart (PNG)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = p.parse_args()
    reports = []
    for path in args.reports:
        try:
            report = json.loads(path.read_text())
            report["modes"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            print(f"plot_modes: {path}: not an `spd-engine eval --modes` report ({exc})", file=sys.stderr)
            return 2
        reports.append(report)
    plot(reports, args.out)
    table = markdown(reports)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
