"""plan/run for rms_norm, swiglu_mlp and aggregate_features (FlashInfer's split, as attention has it; see
tests/test_op_attention_with_kvcache.py for attention's): a planned call equals the unplanned one, writes into
the plan's own buffers on every run, and allocates nothing itself. Runs on the Triton backend here (the CPU
interpreter) and on the cuda backend where a GPU is (there also checking the CUDA allocator's count)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import DEVICE, backend_params
from spd_engine import ops

BACKENDS = backend_params("triton", "cuda")
FACTORIES = ("empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "full")


@contextlib.contextmanager
def no_allocations():
    """Fail if the op calls a torch factory (Python level) or, on a GPU, grows the CUDA allocator's usage."""
    calls = []
    saved = {name: getattr(torch, name) for name in FACTORIES if hasattr(torch, name)}

    def counting(name):
        def factory(*args, **kwargs):
            calls.append(name)
            return saved[name](*args, **kwargs)
        return factory

    before = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
    for name in saved:
        setattr(torch, name, counting(name))
    try:
        yield
    finally:
        for name, factory in saved.items():
            setattr(torch, name, factory)
    assert not calls, f"a planned run allocated: {calls}"
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before


def runs_in_place(run, plan_buffers, unplanned, repeats=3, inputs=()):
    """Run ``run(i)`` a few times over fresh inputs: each result lives in the plan's buffers and equals the
    unplanned call on the same inputs."""
    pointers = [b.data_ptr() for b in plan_buffers]
    for i in range(repeats):
        with no_allocations():
            got = run(i)
        got = got if isinstance(got, tuple) else (got,)
        want = unplanned(i)
        want = want if isinstance(want, tuple) else (want,)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
        assert [b.data_ptr() for b in plan_buffers] == pointers
        assert got[0].data_ptr() == pointers[0]


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_plan(backend, dtype, with_residual):
    shape = (1, 1, 576)
    weight = torch.randn(576, dtype=dtype, device=DEVICE)
    plan = ops.plan_rms_norm(shape, dtype, weight, with_residual=True, backend=backend)
    assert plan is not None
    xs = [torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(3)]
    rs = [torch.randn(shape, dtype=dtype, device=DEVICE) if with_residual else None for _ in range(3)]
    ops.rms_norm(xs[0], weight, 1e-5, rs[0], backend=backend, plan=plan)  # first call may bind the layout

    def run(i):
        out, new_residual = ops.rms_norm(xs[i], weight, 1e-5, rs[i], backend=backend, plan=plan)
        if with_residual:
            assert new_residual.data_ptr() == plan.residual_out.data_ptr()
        else:
            assert new_residual is xs[i]
        return out, new_residual

    runs_in_place(run, [plan.out], lambda i: ops.rms_norm(xs[i], weight, 1e-5, rs[i], backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_plan_without_residual_refuses_a_residual(backend):
    weight = torch.randn(64, device=DEVICE)
    plan = ops.plan_rms_norm((2, 64), torch.float32, weight, with_residual=False, backend=backend)
    x = torch.randn(2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="plan"):
        ops.rms_norm(x, weight, 1e-5, torch.randn_like(x), backend=backend, plan=plan)
    with pytest.raises(ValueError, match="plan"):
        ops.rms_norm(torch.randn(3, 64, device=DEVICE), weight, 1e-5, backend=backend, plan=plan)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_swiglu_mlp_plan(backend, rows):
    hidden, ffn = 64, 96
    gate_up = torch.randn(2 * ffn, hidden, device=DEVICE) * hidden ** -0.5
    down = torch.randn(hidden, ffn, device=DEVICE) * ffn ** -0.5
    plan = ops.plan_swiglu_mlp((rows, 1, hidden), gate_up, down, backend=backend)
    assert plan is not None
    xs = [torch.randn(rows, 1, hidden, device=DEVICE) for _ in range(3)]
    ops.swiglu_mlp(xs[0], gate_up, down, backend=backend, plan=plan)
    runs_in_place(lambda i: ops.swiglu_mlp(xs[i], gate_up, down, backend=backend, plan=plan), [plan.out],
                  lambda i: ops.swiglu_mlp(xs[i], gate_up, down, backend=backend))


def test_swiglu_mlp_needs_no_plan_past_the_gemv_rows():
    gate_up, down = torch.randn(2 * 24, 16, device=DEVICE), torch.randn(16, 24, device=DEVICE)
    assert ops.plan_swiglu_mlp((11, 16), gate_up, down, backend="triton") is None  # GEMM: torch runs it
    assert ops.plan_swiglu_mlp((1, 16), gate_up, down, backend="torch") is None


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_aggregate_features_plan(backend, index_dtype):
    S, m, H, R = 6, 3, 40, 5
    weight_cat = torch.randn(H, H * m * (m + 1) // 2, device=DEVICE) * 0.1
    anchors = [torch.randn(S, m, H, device=DEVICE) for _ in range(3)]
    slots = [torch.randint(0, S, (R,), dtype=index_dtype, device=DEVICE) for _ in range(3)]
    types_ = [torch.randint(0, m, (R,), dtype=index_dtype, device=DEVICE) for _ in range(3)]
    plan = ops.plan_aggregate_features(R, anchors[0], weight_cat, backend=backend)
    assert plan is not None
    ops.aggregate_features(anchors[0], weight_cat, slots[0], types_[0], backend=backend, plan=plan)
    runs_in_place(lambda i: ops.aggregate_features(anchors[i], weight_cat, slots[i], types_[i], backend=backend,
                                                   plan=plan), [plan.out],
                  lambda i: ops.aggregate_features(anchors[i], weight_cat, slots[i], types_[i], backend=backend))


def test_the_reference_needs_no_plans():
    weight = torch.randn(8)
    assert ops.plan_rms_norm((1, 8), torch.float32, weight, backend="torch") is None
    assert ops.plan_aggregate_features(2, torch.randn(3, 2, 8), torch.randn(8, 24), backend="torch") is None
    assert ops.plan_rms_norm((1, 8), torch.float64, weight.double(), backend="triton") is None  # outside the kernels


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stage_step_with_layer_plans_equals_the_unplanned_step(backend, tmp_path):
    """Model.forward_layers with LayerPlans (what LocalStage.step runs) gives what the unplanned layers give,
    over several steps, with the norms and the MLP writing into the plans' buffers."""
    from tiny_models import make_tiny_model

    from spd_engine.model import LayerPlans, Model

    model = Model.from_pretrained(make_tiny_model(tmp_path, "llama", layers=3), device=DEVICE, backend=backend)
    caches = [model.new_cache(32), model.new_cache(32)]
    plans = LayerPlans.for_step(model, caches[0], 0, 0)
    assert plans.input_norm is not None and plans.post_norm is not None and plans.mlp is not None
    torch.manual_seed(0)
    for _ in range(3):
        hidden = torch.randn(1, 1, model.config.hidden_size, dtype=model.dtype, device=DEVICE)
        planned = model.forward_layers(hidden, 0, 3, caches[0], plans=plans).clone()
        unplanned = model.forward_layers(hidden, 0, 3, caches[1])
        torch.testing.assert_close(planned, unplanned)
