#!/usr/bin/env bash
# Train and evaluate every PDM configuration for SmolLM2-135M-Instruct (the default model) on the CPU.
#
#   bench/pdm_sweep.sh                 # everything: data, two lanes of train + eval, default T=1 eval
#   bench/pdm_sweep.sh data            # only the self-distillation data
#   bench/pdm_sweep.sh lane 8:1 2:1    # train + eval the given n:L_s configurations, one after another
#
# Work files (data, PDM directories, logs) go under $WORK (default /tmp/pdmw); the reports land in
# bench/results/pdm_*.json. Every process runs single-threaded (OMP_NUM_THREADS=1): on a small shared CPU,
# several single-threaded jobs beat one oversubscribed multi-threaded job by a wide margin.
#
# Scale (CPU budget, see bench/results/pdm_eval.md): 64 prompts x 128 answer tokens of data; each PDM trains
# STEPS steps of BATCH sequences of SEQ tokens; eval uses the first LIMIT prompts of each set, NEW tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/pdmw}
CORPORA="/work/shared/data/corpora/austen.txt /work/shared/data/corpora/kjv.txt"
EVAL="/work/shared/data/eval/mt_bench.jsonl /work/shared/data/eval/gsm8k.jsonl /work/shared/data/eval/humaneval.jsonl"
PROMPTS=${PROMPTS:-64} ANSWER=${ANSWER:-128}
STEPS=${STEPS:-} BATCH=${BATCH:-2} SEQ=${SEQ:-128} LR=${LR:-1e-3} VOCAB=${VOCAB:-8192}
LIMIT=${LIMIT:-2} NEW=${NEW:-32}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mkdir -p "$WORK" bench/results

# Four anchors for every n (so the agg weight stays H*H*10 and an L_s=1 PDM fits 25 MB in bf16):
# 0, the end of stage 1, the end of the middle stage, L-1. For n=2,3 the auto rule already gives four.
anchors() {
  case $1 in
    2) echo 0,15,29,30 ;; 3) echo 0,10,29,30 ;; 4) echo 0,8,16,29 ;;
    5) echo 0,6,12,29 ;; 6) echo 0,5,15,29 ;; 8) echo 0,4,16,29 ;;
  esac
}

data() {
  python bench/build_distill_data.py $CORPORA --out "$WORK/data.jsonl" --prompts "$PROMPTS" \
    --answer-tokens "$ANSWER" --seed 0 --batch 32
}

# Steps as run for bench/results: 60 for n=8 L_s=1, n=4 L_s=1, n=4 L_s=2; 40 for the rest (set STEPS to override).
steps_for() { case $1:$2 in 8:1|4:1|4:2) echo 60 ;; *) echo 40 ;; esac; }

one() {  # n L_s: train, then T=0 eval
  local n=$1 ls=$2 name="pdm_n$1_ls$2" out="$WORK/pdm_n$1_ls$2"
  local steps=${STEPS:-$(steps_for "$1" "$2")}
  spd-engine train-pdm --model default --device cpu --stages "$n" --tower-layers "$ls" \
    --anchors "$(anchors "$n")" --draft-vocab "$VOCAB" --data "$WORK/data.jsonl" --seq-len "$SEQ" \
    --batch-size "$BATCH" --steps "$steps" --lr "$LR" --val-fraction 0.03 --checkpoint-every 1000 \
    --seed 0 --out "$out" --json > "$WORK/$name.train.json" 2> "$WORK/$name.train.log"
  cp "$out/train_report.json" "bench/results/${name}_train.json"
  spd-engine eval --model default --device cpu --pdm "$out" --data $EVAL --limit "$LIMIT" \
    --max-new-tokens "$NEW" --temperature 0 --out "bench/results/${name}_t0.json" \
    > "$WORK/$name.eval.log" 2>&1 || echo "eval $name: exit $?" >> "$WORK/$name.eval.log"
}

lane() { for cfg in "$@"; do one "${cfg%%:*}" "${cfg##*:}"; done; }

default_t1() {  # the shipped default, T=1 (sampling: acceptance only, losslessness is distributional)
  spd-engine eval --model default --device cpu --data $EVAL --limit "$LIMIT" --max-new-tokens "$NEW" \
    --temperature 1 --seed 0 --out bench/results/pdm_default_t1.json > "$WORK/default_t1.log" 2>&1
}

table() {  # print the Markdown rows of every bench/results/pdm_n*_t0.json (+ the default's T=1 run)
  python - <<'PY'
import glob, json
rows = []
for path in sorted(glob.glob("bench/results/pdm_n*_t0.json")) + sorted(glob.glob("bench/results/pdm_default_t1.json")):
    r = json.load(open(path))
    train = path.replace("_t0.json", "_train.json")
    try:
        t = json.load(open(train)); top1 = f"{t['val']['top1']:.3f}"
    except (OSError, KeyError, TypeError):
        top1 = "-"
    d = r["datasets"]
    acc = {k: v["acceptance_rate"] for k, v in d.items()}
    eal = {k: v["equivalent_accept_length"] for k, v in d.items()}
    mean_eal = sum(eal.values()) / len(eal)
    mean_acc = sum(acc.values()) / len(acc)
    lossless = "n/a (T=1)" if r["temperature"] else \
        f"{sum(v['lossless_prompts'] for v in d.values())}/{sum(v['prompts'] for v in d.values())}"
    layers = "/".join(map(str, r["stage_layers"]))
    name = path.split("/")[-1].replace(".json", "")
    cells = [name, f"{r['stages']} ({layers})", str(r["tower_layers"]), f"{r['temperature']:g}", top1] + \
        [f"{acc[k]:.3f} / {eal[k]:.2f}" for k in ("mt_bench", "gsm8k", "humaneval")] + \
        [f"{mean_acc:.3f}", f"**{mean_eal:.2f}**", lossless]
    rows.append("| " + " | ".join(cells) + " |")
print("| run | n (stage layers) | L_s | T | val top-1 | MT-Bench acc / eq. len | GSM8K acc / eq. len | HumanEval acc / eq. len | mean acc | mean eq. accept len | lossless (T=0) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
}

ship() {  # n L_s: copy that PDM into the package as the default, weights in bf16 (the loader casts back)
  local src="$WORK/pdm_n$1_ls$2" dst=spd_engine/pdms/smollm2-135m-instruct
  mkdir -p "$dst"
  python - "$src" "$dst" <<'PY'
import shutil, sys, torch
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1:]
sd = load_file(f"{src}/pdm.safetensors")
sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
save_file(sd, f"{dst}/pdm.safetensors")
shutil.copy(f"{src}/pdm_config.json", f"{dst}/pdm_config.json")
PY
  ls -l "$dst"
}

case ${1:-all} in
  table) table ;;
  ship) ship "$2" "$3" ;;
  data) data ;;
  lane) shift; lane "$@" ;;
  one) one "$2" "$3" ;;
  default_t1) default_t1 ;;
  all)
    [ -f "$WORK/data.jsonl" ] || data
    # Single-threaded jobs side by side (as run here: three lanes, then 2:1 and 8:2, then 3:1 5:1 6:1).
    lane 8:1 2:1 6:1 > "$WORK/laneA.log" 2>&1 &
    lane 4:1 8:2 > "$WORK/laneB.log" 2>&1 &
    lane 4:2 3:1 5:1 > "$WORK/laneC.log" 2>&1 &
    wait
    ship 8 1          # the shipped default: best validation top-1 among the L_s=1 PDMs that fit 25 MB
    default_t1
    table
    ;;
esac
