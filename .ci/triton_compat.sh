#!/usr/bin/env bash
# The Triton op tests under the interpreter with the Triton of the GPU image (3.6), next to CI's newer one.
#
#   bash .ci/triton_compat.sh [TRITON_VERSION]      (default 3.6.0; takes a few minutes on two cores)
#
# The GPU image pairs torch 2.11 with triton 3.6. Only PyPI is reachable here, whose Linux torch 2.11 wheels
# pull the CUDA libraries (gigabytes), so this pairs the CPU torch CI uses with the image's Triton: the
# kernels in kernels/ import only triton, and the interpreter runs them exactly as it would on that image.
# A throwaway virtual environment is made under $TMPDIR and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_VERSION="${1:-3.6.0}"
VENV="$(mktemp -d "${TMPDIR:-/tmp}/spd_triton_compat.XXXXXX")"
trap 'rm -rf "$VENV"' EXIT

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.13.0 "triton==$TRITON_VERSION" numpy safetensors tokenizers \
    jinja2 tqdm pytest
"$VENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
# This tree's code, not an installed copy; every Triton parameter of the op tests, plus the routing tests.
PYTHONPATH="$PWD" OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_op_*.py \
    tests/test_cuda_backend_routing.py -k "triton or routing or float64 or head_dim"
