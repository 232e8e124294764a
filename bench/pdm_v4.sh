#!/usr/bin/env bash
# The v4 draft-module recipe for SmolLM2-135M-Instruct (the default model), on the CPU:
# in-domain self-distilled data with a feature cache, then training from the cache alone.
#
#   bench/pdm_v4.sh data [PROMPTS]      # build (or resume) bench/data/distill_v4: shards, features, manifest
#   bench/pdm_v4.sh data_v2 [PROMPTS]   # the same for bench/data/distill_mix_v2 (prompt mix v2)
#   bench/pdm_v4.sh ablate CACHE        # one change at a time at a fixed budget: fill mix x anchor normalisation
#   bench/pdm_v4.sh train N "CACHE ..." STEPS [extra train-pdm flags]   # the full recipe for n = N stages
#   bench/pdm_v4.sh eval NAME=DIR ...   # teacher-forced table rows (T=0 and T=1) + the real-pipeline check
#   bench/pdm_v4.sh ship DIR            # make that PDM the package's default (weights in bf16)
#   bench/pdm_v4.sh first_shards SRC N DEST   # a view of SRC's first N shards: rerun a recipe on the set it saw
#
# Data: `data` is deterministic for a given seed, batch and thread count (continuous batching changes the
# matmul shapes, and with them the rounding of near-tied greedy choices). The token shards (*.jsonl.gz) and the
# manifest are in git; the features (*.features.npy, 12.7 KB per token) are not: rerunning `data` with the
# same arguments rebuilds them and checks every conversation comes out identical. Rate on this 2-core CPU, one
# thread: ~105-125 answer tokens/s beside one other job (a 128-prompt shard in 3-4.5 minutes), ~55 beside two;
# the two sets' 1M answer tokens take ~2.5 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread per job: OpenMP spinning on shared cores costs ~10x
WORK=${WORK:-/tmp/pdm_v4}
DATA=bench/data/distill_v4
DATA_V2=bench/data/distill_mix_v2
CORPORA=${CORPORA:-/work/shared/data/corpora}
EVAL_SETS="/work/shared/data/eval/mt_bench.jsonl /work/shared/data/eval/gsm8k.jsonl /work/shared/data/eval/humaneval.jsonl"
mkdir -p "$WORK"

data() {
  local corpora=()
  for c in austen kjv; do [ -f "$CORPORA/$c.txt" ] && corpora+=(--corpus "$CORPORA/$c.txt"); done
  python -m spd_engine build-data --model default --dtype bfloat16 --out "$DATA" --prompts "${1:-6144}" \
    --shard-size 128 --batch 64 --answer-tokens 256 --prompt-mix v1 "${corpora[@]}"
}

data_v2() {  # the same, with prompt mix v2 (mostly sampled self-instruct requests) in its own directory
  local corpora=()
  for c in austen kjv; do [ -f "$CORPORA/$c.txt" ] && corpora+=(--corpus "$CORPORA/$c.txt"); done
  python -m spd_engine build-data --model default --dtype bfloat16 --out "$DATA_V2" --prompts "${1:-6144}" \
    --shard-size 128 --batch 64 --answer-tokens 256 --prompt-mix v2 "${corpora[@]}"
}

run() {  # name n "cache [cache ...]" steps [flags]: one training run, its report copied to bench/results
  local name=$1 n=$2 cache=$3 steps=$4; shift 4
  # $cache unquoted on purpose: a space-separated list of build-data directories, read as one set.
  # shellcheck disable=SC2086
  python -m spd_engine train-pdm --model default --cache $cache --stages "$n" --steps "$steps" --batch-size 8 \
    --lr 1e-3 --val-fraction 0.1 --checkpoint-every 25 --draft-vocab 8192 --bf16 --seed 0 --out "$WORK/$name" \
    "$@" --json > "$WORK/$name.json" 2> "$WORK/$name.log"
  cp "$WORK/$name/train_report.json" "bench/results/pdm_v4_${name}_train.json"
}

ablate() {  # each change alone, n=4, same data, split, steps and seed
  local cache=$1 steps=${2:-60}
  run abl_half "4" "$cache" "$steps" --fill-mix half
  run abl_regime "4" "$cache" "$steps" --fill-mix regime
  run abl_half_norm "4" "$cache" "$steps" --fill-mix half --normalize-anchors
  run abl_regime_norm "4" "$cache" "$steps" --fill-mix regime --normalize-anchors
}

train() {  # N cache steps [flags]
  local n=$1 cache=$2 steps=$3; shift 3
  run "n${n}" "$n" "$cache" "$steps" --fill-mix regime --normalize-anchors "$@"
}

eval_() {
  local pdms=("$@")
  python bench/pdm_eval_table.py --pdm "${pdms[@]}" --temperatures 0 1 --limit 80 --max-new-tokens 256 \
    --out-dir bench/results --work bench/results/answers
  for item in "${pdms[@]}"; do  # the real pipeline against vanilla on 2 prompts per set (losslessness)
    local name=${item%%=*} dir=${item#*=} n
    n=$(python -c "import json; print(len(json.load(open('$dir/pdm_config.json'))['stage_bounds']))")
    python -m spd_engine eval --model default --device cpu --stages "$n" --pdm "$dir" --data $EVAL_SETS \
      --limit 2 --max-new-tokens 32 --temperature 0 --method spd --out "bench/results/pdm_real_${name}_t0_32tok.json"
  done
}

ship() {  # DIR: copy a trained PDM into the package as the default, weights in bf16 (the loader casts back)
  local dst=spd_engine/pdms/smollm2-135m-instruct
  mkdir -p "$dst"
  python - "$1" "$dst" <<'PY'
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

first_shards() {  # SRC N DEST: symlinks to SRC's first N shards and a manifest listing only them. train-pdm
  # --cache reads every shard a manifest lists, so a recipe that trained on a set before it grew reruns on this.
  python - "$@" <<'PY'
import json, os, sys
src, n, dest = os.path.abspath(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
manifest = json.load(open(f"{src}/manifest.json"))
if len(manifest["shards"]) < n:
    sys.exit(f"first_shards: {src} has {len(manifest['shards'])} shards, not {n}")
os.makedirs(dest, exist_ok=False)
manifest["shards"] = manifest["shards"][:n]
manifest["answer_tokens_total"] = sum(s["answer_tokens"] for s in manifest["shards"])
for shard in manifest["shards"]:
    for name in (shard["file"], shard["features"]):
        os.symlink(f"{src}/{name}", f"{dest}/{name}")
json.dump(manifest, open(f"{dest}/manifest.json", "w"), indent=1)
print(f"{dest}: {n} shards, {manifest['answer_tokens_total']} answer tokens")
PY
}

case ${1:-} in
  data) shift; data "$@" ;;
  data_v2) shift; data_v2 "$@" ;;
  ablate) shift; ablate "$@" ;;
  train) shift; train "$@" ;;
  eval) shift; eval_ "$@" ;;
  ship) shift; ship "$@" ;;
  first_shards) shift; first_shards "$@" ;;
  *) sed -n '2,18p' "$0"; exit 2 ;;
esac
