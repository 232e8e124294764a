#!/usr/bin/env bash
# The side-by-side table of issue 17: every decoding mode on the same prompts of the three eval sets, default
# model, T=0 and T=1, one `spd-engine eval --modes` run per temperature, then the markdown table and the plot.
#
#   bench/modes_table.sh [LIMIT] [MAX_NEW_TOKENS]     # defaults: 10 prompts per set, 128 new tokens
#
# Writes bench/results/modes_t{0,1}.json (per prompt: traces, counts, losslessness), modes_table.md and
# modes_table.png. Each mode runs with its defaults (the shipped PDM at its n; PPSD's measured exit layer;
# PipeSpec's measured self-draft chain). Predicted multi-device speeds use step times measured on this machine
# (eval measures them after the runs) and an NVLink-class link; the eager wall clock here checks correctness,
# not speed. Rate on this 2-core CPU: about 10 minutes per temperature at the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LIMIT=${1:-10}
TOKENS=${2:-128}
EVAL=${EVAL:-../shared/data/eval}
MODES=${MODES:-vanilla,spd,pipespec,ppsd}
SETS=("$EVAL/mt_bench.jsonl" "$EVAL/gsm8k.jsonl" "$EVAL/humaneval.jsonl")
for t in 0 1; do
  python -m spd_engine eval --model default --device cpu --modes "$MODES" --data "${SETS[@]}" --limit "$LIMIT" \
    --max-new-tokens "$TOKENS" --temperature "$t" --seed 0 --out "bench/results/modes_t$t.json"
done
python bench/plot_modes.py bench/results/modes_t0.json bench/results/modes_t1.json \
  --out bench/results/modes_table.png --markdown bench/results/modes_table.md
