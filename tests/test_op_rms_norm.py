"""rms_norm (fused residual add) on every backend against the float64 reference (docs/ARCHITECTURE.md,
"Kernel tests")."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, assert_matches_reference, backend_params
from spd_engine import ops

BACKENDS = backend_params("torch", "triton", "cuda")
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]
EPS = 1e-5

pytestmark = pytest.mark.usefixtures("nan_poisoned_allocations")


def check(backend, x, weight, residual):
    expected, expected_residual = ops.rms_norm(
        x.double(), weight.double(), EPS, None if residual is None else residual.double(), backend="torch")
    naive, naive_residual = ops.rms_norm(x, weight, EPS, residual, backend="torch")
    out, new_residual = ops.rms_norm(x, weight, EPS, residual, backend=backend)
    assert out.dtype == naive.dtype and new_residual.dtype == x.dtype
    assert_matches_reference(out, expected, naive)
    if residual is None:
        assert new_residual is x
    else:
        # HF rounds the sum to x's dtype; that rounding is the whole error of the new residual.
        assert_matches_reference(new_residual, expected_residual, naive_residual, what="new residual")


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("shape", [(1, 576), (3, 1, 64), (7, 1000), (2, 3, 129)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, shape, with_residual):
    x = torch.randn(shape, dtype=dtype, device=DEVICE) * 3
    residual = torch.randn(shape, dtype=dtype, device=DEVICE) if with_residual else None
    weight = torch.randn(shape[-1], dtype=dtype, device=DEVICE)
    check(backend, x, weight, residual)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_weight_promotes_output(backend, dtype):
    x = torch.randn(5, 576, dtype=dtype, device=DEVICE)
    check(backend, x, torch.randn(576, device=DEVICE), torch.randn_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows(backend):
    """A row-strided view (e.g. one token of a larger buffer) is read in place, not assumed contiguous."""
    buffer = torch.randn(4, 2 * 576, dtype=torch.float32, device=DEVICE)
    x = buffer[:, :576]
    check(backend, x, torch.randn(576, device=DEVICE), torch.randn(4, 576, device=DEVICE))
