"""swiglu_mlp on every backend against the float64 reference (docs/ARCHITECTURE.md, "Kernel tests")."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, assert_matches_reference, backend_params
from spd_engine import ops

BACKENDS = backend_params("torch", "triton", "cuda")
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]

pytestmark = pytest.mark.usefixtures("nan_poisoned_allocations")


def check(backend, x, gate_up, down):
    expected = ops.swiglu_mlp(x.double(), gate_up.double(), down.double(), backend="torch")
    naive = ops.swiglu_mlp(x, gate_up, down, backend="torch")
    assert_matches_reference(ops.swiglu_mlp(x, gate_up, down, backend=backend), expected, naive)


# rows 1, 3, 8 take the fused GEMV kernel; 11 rows take the GEMM (torch) path. Sizes are not multiples of
# the kernel's blocks.
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("hidden,ffn", [(64, 96), (200, 150)], ids=["64x96", "200x150"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, hidden, ffn, rows):
    x = torch.randn(rows, 1, hidden, dtype=dtype, device=DEVICE)
    gate_up = torch.randn(2 * ffn, hidden, dtype=dtype, device=DEVICE) * hidden ** -0.5
    down = torch.randn(hidden, ffn, dtype=dtype, device=DEVICE) * ffn ** -0.5
    check(backend, x, gate_up, down)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_weight_views(backend):
    """Weights that are transposed views (stride (1, n)) give the same answer."""
    x = torch.randn(2, 64, device=DEVICE)
    gate_up = torch.randn(64, 2 * 96, device=DEVICE).t() * 0.1
    down = torch.randn(96, 64, device=DEVICE).t() * 0.1
    check(backend, x, gate_up, down)
