"""aggregate_features on every backend against the float64 reference (docs/ARCHITECTURE.md, "Kernel tests")."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, assert_matches_reference, backend_params
from spd_engine import ops

BACKENDS = backend_params("torch", "triton", "cuda")
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]

pytestmark = pytest.mark.usefixtures("nan_poisoned_allocations")


def make_inputs(slots, m, hidden, rows, dtype, index_dtype=torch.int32):
    anchors = torch.randn(slots, m, hidden, dtype=dtype, device=DEVICE)
    weight_cat = torch.randn(hidden, hidden * m * (m + 1) // 2, dtype=dtype, device=DEVICE) * 0.02
    row_slots = torch.randint(0, slots, (rows,), dtype=index_dtype, device=DEVICE)
    # Every type appears, in a shuffled order, so one launch really mixes row types.
    row_types = torch.arange(rows, device=DEVICE).remainder(m)[torch.randperm(rows, device=DEVICE)].to(index_dtype)
    return anchors, weight_cat, row_slots, row_types


def check(backend, anchors, weight_cat, row_slots, row_types):
    expected = ops.aggregate_features(anchors.double(), weight_cat.double(), row_slots, row_types, backend="torch")
    naive = ops.aggregate_features(anchors, weight_cat, row_slots, row_types, backend="torch")
    out = ops.aggregate_features(anchors, weight_cat, row_slots, row_types, backend=backend)
    assert_matches_reference(out, expected, naive)


@pytest.mark.parametrize("slots,m,hidden,rows", [(9, 5, 64, 7), (4, 3, 72, 5), (3, 1, 40, 2), (6, 4, 136, 9)],
                         ids=["m5-h64", "m3-h72", "m1-h40", "m4-h136"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, slots, m, hidden, rows):
    check(backend, *make_inputs(slots, m, hidden, rows, dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_indices(backend):
    check(backend, *make_inputs(5, 4, 64, 6, torch.float32, index_dtype=torch.int64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchors_read_in_place_from_a_strided_view(backend):
    """Anchors that are a slice of a larger snapshot buffer (slot and type strides not packed) are read where
    they are."""
    anchors, weight_cat, row_slots, row_types = make_inputs(6, 3, 64, 5, torch.float32)
    buffer = torch.randn(6, 4, 96, device=DEVICE)
    buffer[:, :3, :64] = anchors
    check(backend, buffer[:, :3, :64], weight_cat, row_slots, row_types)
