#!/usr/bin/env bash
# The one-shot GPU suite: everything a short GPU lease must measure or check, in one call of at most 8 minutes.
#
#   bench/gpu_suite.sh [OUT_DIR]             on the GPU machine (OUT_DIR defaults to $OUT)
#   bench/gpu_suite.sh --dry-run OUT_DIR     the same steps on a CPU: tiny shapes, torch + Triton interpreter
#
# Steps, each with its own timeout, all inside one overall budget (a step left without time is recorded as
# rc 124, never started):
#   preflight     versions, GPU name and SM count, Python.h, cmake, nvcc
#   build         spd_engine._C for sm_90 with cmake, offline; if that fails, a prebuilt .gpu/_C*.so
#   model         a random-weights SmolLM2-shape HF directory (bench/random_model.py)
#   op_tests      the op tests, the graph tests and the capture-safety test (pytest -n with the carried
#                 pytest-xdist when it is there)
#   op_bench      every bench/bench_<op>.py
#   launches      bench/count_launches.py on the torch, triton and cuda backends
#   decode_*      bench/bench_decode.py: eager / graphed / HF static cache / torch.compile vanilla, and graphed
#                 SPD at n = 2, 4, 8 at forced acceptance 1.0, 0.0 and a real CPU trace; SmolLM2, then
#                 Llama-3.2-1B and Llama-3-8B shapes while time allows
#
# It writes at most 8 files to OUT_DIR: summary.json (every step's rc, seconds and log tail), op_bench.json,
# launches.json, one decode_<shape>.json per shape and triton_cache.tar.gz. Triton compiles into
# TRITON_CACHE_DIR=OUT_DIR/triton_cache while the suite runs (so a run cut short leaves it there too); at the
# end that folder, hundreds of small files, is packed into the one tarball (without the IR files when whole
# it would pass 15 MiB) and removed, since the lease returns only 8 files of up to 16 MiB. Unpack it into a
# TRITON_CACHE_DIR to reuse or inspect the compiled kernels. Other scratch (build tree, models) goes to a
# temporary directory.
#
# Offline wheels: the GPU image has no internet, no gguf and no pytest-xdist. Fill the git-ignored .gpu/
# folder once on a machine with internet, and it travels with the working tree:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       --no-deps -d .gpu/wheels pytest-xdist execnet gguf
# A prebuilt extension for the build fallback goes to .gpu/ as well (any _C*.so built for sm_90, cp312), and
# the default model's config and tokenizer (3.4 MB; the 94 MB GGUF cannot travel) make the SmolLM2-shape model
# carry the real tokenizer:
#   d=$(python -c "from spd_engine.weights import resolve_model_path as r; print(r('default'))")
#   mkdir -p .gpu/smollm2-135m && cp "$d"/{config,tokenizer,tokenizer_config,generation_config}.json .gpu/smollm2-135m/
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT_DIR="${1:-${OUT:-}}"
if [[ -z "$OUT_DIR" ]]; then
    echo "gpu_suite: error: give an output directory (or set \$OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/spd_gpu_suite.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/logs"
: >"$WORK/steps.tsv"

BUDGET_S="${SPD_SUITE_BUDGET_S:-470}"  # 8 minutes less a margin for the summary
START_S=$SECONDS
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this tree's spd_engine, installed or not
export TRITON_CACHE_DIR="$OUT_DIR/triton_cache"  # packed into OUT_DIR/triton_cache.tar.gz at the end
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$ROOT"

if ((DRY)); then
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    DEVICE=cpu SHAPE=tiny DTYPE=float32 TOKENS=8 PROMPT_TOKENS=8 STAGES="2" REPEATS=1 COMPILE=aot_eager
else
    DEVICE=cuda SHAPE=smollm2-135m DTYPE=bfloat16 TOKENS=128 PROMPT_TOKENS=64 STAGES="2 4 8" REPEATS=3 COMPILE=inductor
fi
TRACE="bench/results/pdm_real_n8_ls1_t0_64tok.json"  # the shipped PDM's real acceptance trace, measured on a CPU

# step NAME TIMEOUT_S COMMAND...: run it under its timeout (or the time left, if less), record rc and seconds.
step() {
    local name="$1" limit="$2"
    shift 2
    local left=$((BUDGET_S - (SECONDS - START_S)))
    ((left < limit)) && limit=$left
    local started=$SECONDS rc
    if ((limit < 5)); then
        echo "not started: the suite's ${BUDGET_S}s budget is spent" >"$WORK/logs/$name.log"
        rc=124
    else
        echo "== $name (timeout ${limit}s): $*" >&2
        # bash -c: a step may be one of the functions below (exported), which timeout cannot run itself.
        timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@" >"$WORK/logs/$name.log" 2>&1
        rc=$?
    fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - started))" "$limit" >>"$WORK/steps.tsv"
    echo "== $name: rc $rc in $((SECONDS - started))s" >&2
    return 0
}

preflight() {
    "$PY" - "$DRY" <<'EOF'
import os, platform, shutil, subprocess, sys, sysconfig
dry = sys.argv[1] == "1"
import torch
print("python", platform.python_version(), "| torch", torch.__version__)
for name in ("triton", "transformers", "pybind11", "gguf", "xdist"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "present"))
    except ImportError:
        print(name, "MISSING")
include = sysconfig.get_paths()["include"]
print("Python.h", "present" if os.path.isfile(os.path.join(include, "Python.h")) else f"MISSING in {include}")
for tool in ("cmake", "ninja", "nvcc", "nvidia-smi"):
    path = shutil.which(tool) or (tool == "nvcc" and os.access("/usr/local/cuda/bin/nvcc", os.X_OK) and "/usr/local/cuda/bin/nvcc")
    print(tool, subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1:] if path else "MISSING")
if dry:
    print("dry run: no GPU expected")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("no CUDA device")
props = torch.cuda.get_device_properties(0)
print("gpu", props.name, "| SMs", props.multi_processor_count, "| capability", f"{props.major}.{props.minor}",
      "| memory GiB", round(props.total_memory / 2**30, 1))
EOF
}

build() {
    local nvcc
    nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
    local configure=(cmake -S "$ROOT" -B "$WORK/build" -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release
        "-DCMAKE_CUDA_COMPILER=$nvcc" "-DPython_EXECUTABLE=$(command -v "$PY")"
        "-Dpybind11_DIR=$("$PY" -m pybind11 --cmakedir)")
    command -v ninja >/dev/null && configure+=(-G Ninja)
    if ((DRY)); then  # compiling takes minutes on two cores: the dry run checks the configuration only
        [[ -x "$nvcc" ]] || { echo "dry run: no nvcc, nothing to configure"; return 0; }
        "$PY" -c "import pybind11" 2>/dev/null || { echo "dry run: no pybind11 here, nothing to configure"; return 0; }
        "${configure[@]}"
        return
    fi
    if "${configure[@]}" && cmake --build "$WORK/build" --parallel "$(nproc)"; then
        cp "$WORK/build"/_C*.so spd_engine/
    else
        local prebuilt
        prebuilt="$(ls .gpu/_C*.so 2>/dev/null | head -1)"
        [[ -n "$prebuilt" ]] || { echo "build failed and .gpu/ holds no prebuilt _C*.so"; return 1; }
        echo "build failed: using the carried prebuilt $prebuilt"
        cp "$prebuilt" spd_engine/
    fi
    "$PY" -c "import spd_engine._C, spd_engine.ops as o; assert o.available('cuda'); print('cuda backend ready')"
}

op_tests() {
    if [[ -d .gpu/wheels ]]; then
        "$PY" -m pip install --no-index --find-links .gpu/wheels --quiet pytest-xdist execnet gguf || true
    fi
    local parallel=()
    "$PY" -c "import xdist" 2>/dev/null && parallel=(-n "$( ((DRY)) && echo 2 || echo 8)")
    if ((DRY)); then  # a small, fast selection: the suite's plumbing, not the kernels, is under test here
        "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_op_rms_norm.py \
            tests/test_cuda_backend_routing.py tests/test_graph.py
    else
        "$PY" -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_op_*.py tests/test_graph.py \
            tests/test_cuda_backend_routing.py tests/test_capture_safety.py tests/test_backends_e2e.py
    fi
}

op_bench() {
    local bench rc=0
    for bench in bench/bench_rms_norm.py bench/bench_swiglu_mlp.py bench/bench_attention_with_kvcache.py \
                 bench/bench_aggregate_features.py; do
        if ((DRY)); then  # the op benchmarks time CUDA kernels: on a CPU, check that they load
            "$PY" "$bench" --help >/dev/null || rc=1
        else
            "$PY" "$bench" --warmup 10 --repeats 100 --out "$WORK/$(basename "$bench" .py).json" || rc=1
        fi
    done
    "$PY" - "$WORK" "$OUT_DIR/op_bench.json" <<'EOF'
import json, pathlib, sys
records = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json"))}
pathlib.Path(sys.argv[2]).write_text(json.dumps(records, indent=1))
EOF
    return $rc
}

decode() {  # decode NAME ARGS... : one bench_decode run; ARGS come last, so they override the defaults
    local name="$1"
    shift
    # shellcheck disable=SC2086
    "$PY" bench/bench_decode.py --device "$DEVICE" --dtype "$DTYPE" --tokens "$TOKENS" \
        --prompt-tokens "$PROMPT_TOKENS" --repeats "$REPEATS" --compile-backend "$COMPILE" --stages $STAGES \
        --force-acceptance 1.0 0.0 "$TRACE" --out "$OUT_DIR/decode_$name.json" "$@"
}

export DRY PY WORK OUT_DIR ROOT DEVICE DTYPE TOKENS PROMPT_TOKENS STAGES REPEATS COMPILE TRACE
export -f preflight build op_tests op_bench decode

MODEL_DIR="$WORK/model_$SHAPE"
MODEL_CONFIG="$SHAPE"
[[ -f ".gpu/$SHAPE/config.json" ]] && MODEL_CONFIG=".gpu/$SHAPE"  # the real config and tokenizer, when carried
step preflight 60 preflight
step build 150 build
step model 60 "$PY" bench/random_model.py --config "$MODEL_CONFIG" --dtype "$DTYPE" --out "$MODEL_DIR"
step op_tests 120 op_tests
step op_bench 45 op_bench
step launches 30 "$PY" bench/count_launches.py --model "$MODEL_DIR" --device "$DEVICE" --layers 2 \
    --out "$OUT_DIR/launches.json"
step "decode_$SHAPE" 150 decode "$SHAPE" --model "$MODEL_DIR" --variants eager graph hf compile spd
if ((!DRY)); then
    step decode_llama-3.2-1b 60 decode llama-3.2-1b --random llama-3.2-1b --variants eager graph hf spd
    step decode_llama-3-8b 45 decode llama-3-8b --random llama-3-8b --variants eager graph spd --stages 8 \
        --repeats 1
fi

# Triton's compile cache comes back as one file: packed whole, or without the IR (.ttir/.ttgir/.llir/.ptx/
# .source) when whole it would pass 15 MiB of the lease's 16 MiB per file.
pack_triton_cache() {
    local cache="$OUT_DIR/triton_cache" archive="$OUT_DIR/triton_cache.tar.gz"
    mkdir -p "$cache"
    tar -czf "$archive" -C "$OUT_DIR" triton_cache || return 1
    if (($(stat -c %s "$archive") > 15 * 1024 * 1024)); then
        tar -czf "$archive" -C "$OUT_DIR" --exclude='*.ttir' --exclude='*.ttgir' --exclude='*.llir' \
            --exclude='*.ptx' --exclude='*.source' triton_cache || return 1
    fi
    rm -rf "$cache"
    echo "$(tar -tzf "$archive" | grep -vc '/$') files, $(stat -c %s "$archive") bytes in $archive"
}
# Outside step's budget: packing must happen even when the budget is spent, or the folder's many files would
# crowd the lease's 8 out.
started=$SECONDS
pack_triton_cache >"$WORK/logs/triton_cache.log" 2>&1
printf '%s\t%s\t%s\t%s\n' triton_cache "$?" "$((SECONDS - started))" 0 >>"$WORK/steps.tsv"

"$PY" - "$WORK" "$OUT_DIR/summary.json" "$DRY" "$BUDGET_S" "$((SECONDS - START_S))" <<'EOF'
import json, pathlib, sys
work, out, dry, budget, total = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1", *sys.argv[4:]
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    log = (work / "logs" / f"{name}.log").read_text(errors="replace")
    steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "timeout_s": int(limit),
                  "log_tail": log[-6000:]})
summary = {"dry_run": dry, "budget_s": int(budget), "seconds": int(total),
           "ok": all(s["rc"] == 0 for s in steps), "steps": steps}
out.write_text(json.dumps(summary, indent=1))
for s in steps:
    print(f"{s['step']:>24}: rc {s['rc']:>3} in {s['seconds']:>4}s", file=sys.stderr)
EOF
