#!/usr/bin/env bash
# The Triton op tests under the interpreter with the Triton of the GPU image (3.6), next to CI's newer one.
#
#   bash .ci/triton_compat.sh [TRITON_VERSION]      (default 3.6.0; takes a few minutes on two cores)
#
# The GPU image pairs torch 2.11 with triton 3.6. Only PyPI is reachable here, whose Linux torch 2.11 wheels
# pull the CUDA libraries (gigabytes), so this pairs the CPU torch CI uses with the image's Triton: the
# kernels in kernels/ import only triton, and the interpreter runs them exactly as it would on that image.
# NumPy is pinned below 2.4 for Triton 3.6: its interpreter turns one-element arrays into Python ints, which
# NumPy 2.4 refuses ("only 0-dimensional arrays can be converted"), failing every kernel with a loop over a
# runtime bound. That is the interpreter's problem alone: compiled kernels on a GPU never take that path.
# A throwaway virtual environment is made under $TMPDIR and removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
TRITON_VERSION="${1:-3.6.0}"
NUMPY_PIN="numpy<2.4"
[[ "$TRITON_VERSION" == 3.6.* ]] || NUMPY_PIN=numpy
VENV="$(mktemp -d "${TMPDIR:-/tmp}/spd_triton_compat.XXXXXX")"
trap 'rm -rf "$VENV"' EXIT

python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.13.0 "triton==$TRITON_VERSION" "$NUMPY_PIN" safetensors tokenizers \
    jinja2 tqdm pytest
"$VENV/bin/python" -c "import numpy, torch, triton; print('torch', torch.__version__, '| triton', triton.__version__,
'| numpy', numpy.__version__)"
# This tree's code, not an installed copy; every Triton parameter of the op tests, plus the routing tests.
PYTHONPATH="$PWD" OMP_NUM_THREADS=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_op_*.py \
    tests/test_cuda_backend_routing.py -k "triton or routing or float64 or head_dim"
