"""attention_with_kvcache on every backend against the float64 reference (docs/ARCHITECTURE.md,
"Kernel tests").

Stale cache rows (at and past each sequence's live length) are NaN before every call: a kernel that reads
them, or forgets to overwrite a new row, fails. Outputs allocated inside the op are NaN-poisoned too.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch

from conftest import DEVICE, assert_matches_reference, backend_params, requires_cuda
from spd_engine import ops

BACKENDS = backend_params("torch", "triton", "cuda")
KERNEL_BACKENDS = backend_params("triton", "cuda")
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)]
CACHE_LENGTHS = [0, 1, 7, 63, 257]
HEADS = [pytest.param((9, 3), id="gqa9-3"), pytest.param((4, 4), id="mha4")]

pytestmark = pytest.mark.usefixtures("nan_poisoned_allocations")


@dataclass
class Case:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cache_seqlens: torch.Tensor
    rotary_cos: torch.Tensor | None
    rotary_sin: torch.Tensor | None

    @property
    def lengths(self) -> list[int]:
        return self.cache_seqlens.tolist()

    def converted(self, dtype: torch.dtype) -> "Case":
        """The same inputs in another dtype, with fresh copies of the caches."""
        def cast(t):
            return None if t is None else t.to(dtype).clone()
        return Case(cast(self.q), cast(self.k_cache), cast(self.v_cache), cast(self.k), cast(self.v),
                    self.cache_seqlens.clone(), cast(self.rotary_cos), cast(self.rotary_sin))


def rotary_tables(positions: int, head_dim: int, dtype: torch.dtype, theta: float = 10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype).to(DEVICE), angles.sin().to(dtype).to(DEVICE)


def make_case(lengths, tq, heads, head_dim, dtype, s_max=None, rotary=True) -> Case:
    hq, hkv = heads
    batch = len(lengths)
    s_max = s_max or max(lengths) + tq + 5
    randn = lambda *shape: torch.randn(*shape, dtype=dtype, device=DEVICE)  # noqa: E731
    k_cache, v_cache = randn(batch, s_max, hkv, head_dim), randn(batch, s_max, hkv, head_dim)
    for b, length in enumerate(lengths):
        k_cache[b, length:] = float("nan")
        v_cache[b, length:] = float("nan")
    cos, sin = rotary_tables(s_max, head_dim, dtype) if rotary else (None, None)
    return Case(randn(batch, tq, hq, head_dim), k_cache, v_cache, randn(batch, tq, hkv, head_dim),
                randn(batch, tq, hkv, head_dim), torch.tensor(lengths, dtype=torch.int32, device=DEVICE), cos, sin)


def run(case: Case, backend: str, softmax_scale=None, causal=True) -> torch.Tensor:
    """Runs the op in place on the case's caches and returns the output."""
    return ops.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k, case.v, case.cache_seqlens,
                                      case.rotary_cos, case.rotary_sin, softmax_scale, causal, backend=backend)


def check_against_reference(case: Case, backend: str, softmax_scale=None, causal=True) -> None:
    expected = case.converted(torch.float64)
    naive = case.converted(case.q.dtype)
    actual = case.converted(case.q.dtype)
    expected_out = run(expected, "torch", softmax_scale, causal)
    naive_out = run(naive, "torch", softmax_scale, causal)
    out = run(actual, backend, softmax_scale, causal)
    assert_matches_reference(out, expected_out, naive_out)
    check_cache_update(case, actual, expected)


def check_cache_update(before: Case, after: Case, expected: Case) -> None:
    """New rows [len, len + Tq) hold the rotated k and v; every other byte of the caches is untouched."""
    tq = before.k.shape[1]
    new_rows = torch.zeros(before.k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    for b, length in enumerate(before.lengths):
        new_rows[b, length:length + tq] = True
    bits = {4: torch.int32, 2: torch.int16}[before.k_cache.element_size()]
    for name in ("k_cache", "v_cache"):
        old, new, ref = getattr(before, name), getattr(after, name), getattr(expected, name)
        assert_matches_reference(new[new_rows], ref[new_rows], what=f"new {name} rows")
        unchanged = old.view(bits) == new.view(bits)
        assert unchanged[~new_rows].all(), f"{name} changed outside the new rows"


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("cache_length", CACHE_LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, cache_length, tq, heads):
    # Two sequences of different lengths in one batch.
    check_against_reference(make_case([cache_length, cache_length // 2], tq, heads, 64, dtype), backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_128(backend, dtype):
    check_against_reference(make_case([63, 20], 3, (9, 3), 128, dtype), backend)


@pytest.mark.parametrize("rotary", [True, False], ids=["rotary", "no-rotary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_causal_custom_scale(backend, dtype, rotary):
    check_against_reference(make_case([7, 40], 3, (9, 3), 64, dtype, rotary=rotary), backend, softmax_scale=0.3,
                            causal=False)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_many_query_rows_use_several_row_tiles(backend):
    # 9 new tokens x 8 heads per group = 72 query rows per KV head: more than one CTA / program of rows.
    check_against_reference(make_case([70], 9, (16, 2), 64, torch.float32), backend)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
@pytest.mark.parametrize("cache_length", [0, 63, 257])
def test_triton_split_counts_agree(num_splits, cache_length):
    """The capacity plan picks one split count per device; force several so the combine path and empty
    splits (past the live length) are covered on any machine."""
    from spd_engine.kernels.attention import attention_with_kvcache

    case = make_case([cache_length], 3, (9, 3), 64, torch.float32, s_max=400)
    expected = case.converted(torch.float64)
    expected_out = run(expected, "torch")
    actual = case.converted(torch.float32)
    out = attention_with_kvcache(actual.q, actual.k_cache, actual.v_cache, actual.k, actual.v, actual.cache_seqlens,
                                 actual.rotary_cos, actual.rotary_sin, num_splits=num_splits)
    assert_matches_reference(out, expected_out)
    check_cache_update(case, actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_equals_never_appending(backend):
    """Append 3 tokens, lower cache_seqlens back, append 1 other token: identical to appending only that one.
    The 2 stale rows left behind must never be read."""
    dtype = torch.bfloat16
    base = make_case([40, 11], 3, (9, 3), 64, dtype)
    fresh = make_case([40, 11], 1, (9, 3), 64, dtype)
    fresh.k_cache, fresh.v_cache = base.k_cache.clone(), base.v_cache.clone()
    fresh.rotary_cos, fresh.rotary_sin = base.rotary_cos, base.rotary_sin

    run(base, backend)  # writes rows [len, len + 3)
    rolled_back = Case(fresh.q, base.k_cache, base.v_cache, fresh.k, fresh.v, fresh.cache_seqlens.clone(),
                       fresh.rotary_cos, fresh.rotary_sin)
    out_after_rollback = run(rolled_back, backend)
    out_fresh = run(fresh, backend)
    assert torch.isfinite(out_fresh).all()
    torch.testing.assert_close(out_after_rollback, out_fresh, rtol=0, atol=0)
    for b, length in enumerate(fresh.lengths):
        for name in ("k_cache", "v_cache"):
            torch.testing.assert_close(getattr(rolled_back, name)[b, :length + 1], getattr(fresh, name)[b, :length + 1],
                                       rtol=0, atol=0)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("backend", backend_params("torch", "triton", "cuda"))
def test_cuda_graph_replay_follows_device_lengths(backend):
    """Capture once, then move cache_seqlens on the device: replays must match eager at every length."""
    torch.use_deterministic_algorithms(False)  # its NaN fills and sort-based index_put_ are not capture-safe
    case = make_case([5], 1, (9, 3), 64, torch.bfloat16, s_max=512)
    graph_case = case.converted(torch.bfloat16)
    eager_case = case.converted(torch.bfloat16)
    run(graph_case, backend)  # warm-up: compilation and autotuning happen outside the capture
    graph_case = case.converted(torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out = run(graph_case, backend)
    for length in (5, 6, 130, 300, 2):
        graph_case.cache_seqlens.fill_(length)
        eager_case.cache_seqlens.fill_(length)
        graph.replay()
        eager_out = run(eager_case, backend)
        torch.testing.assert_close(graph_out, eager_out, rtol=0, atol=0)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_append_kv_cache(dtype):
    from spd_engine.ops import cuda_backend

    case = make_case([0, 63], 3, (9, 3), 128, dtype)
    expected = case.converted(torch.float64)
    run(expected, "torch")
    actual = case.converted(dtype)
    cuda_backend.append_kv_cache(actual.k_cache, actual.v_cache, actual.k, actual.v, actual.cache_seqlens,
                                 actual.rotary_cos, actual.rotary_sin)
    check_cache_update(case, actual, expected)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="flash_attn is not installed")
@pytest.mark.parametrize("backend", backend_params("triton", "cuda"))
@pytest.mark.parametrize("cache_length", [0, 63, 257])
def test_matches_flash_attn(backend, cache_length):
    from flash_attn import flash_attn_with_kvcache

    case = make_case([cache_length, cache_length // 3], 3, (9, 3), 64, torch.bfloat16)
    case.k_cache.nan_to_num_(0.0)  # flash-attn multiplies stale rows by zero weights, so NaN would leak there
    case.v_cache.nan_to_num_(0.0)
    theirs = case.converted(torch.bfloat16)
    ours = case.converted(torch.bfloat16)
    their_out = flash_attn_with_kvcache(theirs.q, theirs.k_cache, theirs.v_cache, theirs.k, theirs.v,
                                        rotary_cos=theirs.rotary_cos, rotary_sin=theirs.rotary_sin,
                                        cache_seqlens=theirs.cache_seqlens, causal=True, rotary_interleaved=False)
    our_out = run(ours, backend)
    torch.testing.assert_close(our_out, their_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours.k_cache, theirs.k_cache, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(ours.v_cache, theirs.v_cache, atol=0, rtol=0)


def test_reference_is_finite_on_poisoned_caches():
    """The harness relies on the float64 reference ignoring stale (NaN) rows exactly like the kernels must."""
    case = make_case([7, 0], 3, (9, 3), 64, torch.float64)
    assert torch.isfinite(run(case, "torch")).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs_are_served(backend):
    """Kernel backends hand inputs they do not implement (float64 here) to the reference instead of failing."""
    case = make_case([7, 3], 3, (9, 3), 64, torch.float64)
    expected = case.converted(torch.float64)
    torch.testing.assert_close(run(case, backend), run(expected, "torch"), rtol=0, atol=0)


@pytest.mark.parametrize("lengths,tq,causal", [([0, 7], 1, True), ([63, 1], 3, True), ([257], 3, False)])
def test_reference_strategies_agree(lengths, tq, causal):
    """The torch reference slices to the live length where lengths are host-readable and masks the whole
    capacity where they live on a GPU (graph capture); both compute the same thing, NaN stale rows included."""
    from spd_engine.ops import reference

    case = make_case(lengths, tq, (9, 3), 64, torch.float64)
    live, masked = case.converted(torch.float64), case.converted(torch.float64)
    out_live = reference.attention_live_length(live.q, live.k_cache, live.v_cache, live.k, live.v,
                                               live.cache_seqlens, live.rotary_cos, live.rotary_sin, None, causal)
    out_masked = reference.attention_capacity_masked(masked.q, masked.k_cache, masked.v_cache, masked.k, masked.v,
                                                     masked.cache_seqlens, masked.rotary_cos, masked.rotary_sin,
                                                     None, causal)
    assert torch.isfinite(out_live).all()
    torch.testing.assert_close(out_live, out_masked, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(live.k_cache, masked.k_cache, equal_nan=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_plan_is_reused_across_calls_and_lengths(backend):
    """plan/run: one plan (made once, from capacity) serves calls at several live lengths, like the layers of
    a stage across cycles; each run writes into the plan's own output and matches the float64 reference.
    The plan's buffers start NaN-poisoned, so a run that leaves an element unwritten fails."""
    heads, head_dim, capacity = (9, 3), 64, 300
    first = make_case([0], 1, heads, head_dim, torch.float32, s_max=capacity)
    plan = ops.plan_attention(tuple(first.q.shape), first.k_cache, first.v_cache, backend=backend)
    assert plan is not None
    for length in (0, 7, 63, 257):
        case = make_case([length], 1, heads, head_dim, torch.float32, s_max=capacity)
        expected = case.converted(torch.float64)
        expected_out = run(expected, "torch")
        actual = case.converted(torch.float32)
        out = ops.attention_with_kvcache(actual.q, actual.k_cache, actual.v_cache, actual.k, actual.v,
                                         actual.cache_seqlens, actual.rotary_cos, actual.rotary_sin,
                                         backend=backend, plan=plan)
        assert out.data_ptr() == plan.out.data_ptr()
        assert_matches_reference(out, expected_out)
        check_cache_update(case, actual, expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_plan_for_another_shape_is_refused(backend):
    case = make_case([5], 1, (9, 3), 64, torch.float32, s_max=64)
    plan = ops.plan_attention((1, 2, 9, 64), case.k_cache, case.v_cache, backend=backend)
    with pytest.raises(ValueError, match="plan"):
        ops.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k, case.v, case.cache_seqlens,
                                   case.rotary_cos, case.rotary_sin, backend=backend, plan=plan)


def test_no_plan_where_the_reference_runs():
    case = make_case([5], 1, (9, 3), 64, torch.float32, s_max=64)
    assert ops.plan_attention(tuple(case.q.shape), case.k_cache, case.v_cache, backend="torch") is None
    odd = make_case([5], 1, (4, 2), 24, torch.float32, s_max=64)  # a head dim no kernel covers
    if ops.available("triton"):
        assert ops.plan_attention(tuple(odd.q.shape), odd.k_cache, odd.v_cache, backend="triton") is None
