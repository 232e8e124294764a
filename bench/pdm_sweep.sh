#!/usr/bin/env bash
# Train and evaluate the PDM configurations for SmolLM2-135M-Instruct (the default model) on the CPU.
#
#   bench/pdm_sweep.sh                 # everything below, in order
#   bench/pdm_sweep.sh data            # rebuild the self-distillation data (bench/data/distill_s1.jsonl)
#   bench/pdm_sweep.sh one 5 1         # train n=5, L_s=1, check it on the real pipeline, evaluate it at T=0 and T=1
#   bench/pdm_sweep.sh one 8 1 40      # the same with 40 steps, as run n8_ls1_s40 (n=8 at the others' step count)
#   bench/pdm_sweep.sh real 5 1        # only the real-pipeline lossless check of an already trained PDM
#   bench/pdm_sweep.sh ship 8 1        # copy that PDM into the package as the default (weights in bf16)
#
# Work files (PDM directories, logs) go under $WORK (default /tmp/pdmw). Reports and the table land in
# bench/results/pdm_tf_*; the target's answers to the 240 eval prompts are cached in bench/results/answers/
# (keyed by model, dtype, prompts and settings), so evaluating another PDM costs only its draft passes.
#
# Scale (2-core CPU, see bench/results/pdm_eval.md): 384 self-distilled chats (116k tokens); n=8 L_s=1 trains
# 300 steps of 4 x 256 tokens, every other configuration STEPS (default 40); the evaluation is the issue's
# full one (80 prompts per set, 256 new tokens, T=0 and T=1), teacher-forced (`spd-engine eval --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/pdmw}
DATA=bench/data/distill_s1.jsonl
CORPORA="/work/shared/data/corpora/austen.txt /work/shared/data/corpora/kjv.txt"
EVAL_SETS="/work/shared/data/eval/mt_bench.jsonl /work/shared/data/eval/gsm8k.jsonl /work/shared/data/eval/humaneval.jsonl"
STEPS=${STEPS:-40}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p "$WORK" bench/results/answers

# Four anchors for every n (so the aggregation weight stays 4H x H and an L_s=1 PDM fits 25 MB in bf16):
# 0, the end of stage 1, the end of a middle stage, L-1. For n=2,3 the automatic rule gives the same four.
anchors() {
  case $1 in
    2) echo 0,15,29,30 ;; 3) echo 0,10,29,30 ;; 4) echo 0,8,16,29 ;;
    5) echo 0,6,12,29 ;; 6) echo 0,5,15,29 ;; 8) echo 0,4,16,29 ;;
  esac
}

data() {  # about 30 minutes on 2 cores
  python bench/build_distill_data.py $CORPORA --out "$DATA" --prompts 384 --answer-tokens 160 --seed 1 --batch 32
}

real() {  # n tag: the real pipeline on 2 prompts per set x 32 tokens at T=0, against vanilla (the lossless check)
  spd-engine eval --model default --device cpu --stages "$1" --pdm "$WORK/pdm_$2" --data $EVAL_SETS \
    --limit 2 --max-new-tokens 32 --temperature 0 --method spd --out "bench/results/pdm_real_$2_t0_32tok.json"
}

one() {  # n L_s [steps]: train, the real-pipeline check, then the teacher-forced table rows at T=0 and T=1
  local n=$1 ls=$2 tag="n$1_ls$2" steps=$STEPS
  [ "$1:$2" = 8:1 ] && steps=300
  if [ -n "${3:-}" ]; then steps=$3 tag="n$1_ls$2_s$3"; fi  # an explicit step count: a separate run, named for it
  local name="pdm_$tag"
  spd-engine train-pdm --model default --device cpu --stages "$n" --tower-layers "$ls" \
    --anchors "$(anchors "$n")" --draft-vocab 8192 --data "$DATA" --seq-len 256 --batch-size 4 \
    --steps "$steps" --lr 1e-3 --val-fraction 0.04 --checkpoint-every 20 --seed 0 --out "$WORK/$name" \
    --json > "$WORK/$name.train.json" 2> "$WORK/$name.train.log"
  cp "$WORK/$name/train_report.json" "bench/results/${name}_train.json"
  real "$n" "$tag"
  python bench/pdm_eval_table.py --pdm "$tag=$WORK/$name" --temperatures 0 1 --limit 80 \
    --max-new-tokens 256 --out-dir bench/results --work bench/results/answers
}

ship() {  # n L_s: that PDM becomes the package's default (bench/pdm_v4.sh ship does the copy)
  bench/pdm_v4.sh ship "$WORK/pdm_n$1_ls$2"
}

case ${1:-all} in
  data) data ;;
  one) one "$2" "$3" "${4:-}" ;;
  real) real "$2" "n$2_ls$3" ;;
  ship) ship "$2" "$3" ;;
  all)
    [ -f "$DATA" ] || data
    for cfg in 8:1 2:1 3:1 4:1 5:1 6:1 4:2 8:2; do one "${cfg%%:*}" "${cfg##*:}"; done
    one 8 1 40
    ;;
  *) echo "usage: $0 [data | one N LS [STEPS] | real N LS | ship N LS | all]" >&2; exit 2 ;;
esac
