"""Shared test setup.

- Without a CUDA device, Triton kernels run on the CPU interpreter. TRITON_INTERPRET must be set before
  anything imports triton, which is why it lives here (conftest is imported before any test module). The
  interpreter's bf16 handling is then patched to GPU numerics (see _give_interpreter_gpu_bf16_numerics).
  With a CUDA device the interpreter stays off, so every test that runs a Triton kernel puts its tensors on
  ``DEVICE`` (the GPU there): a Triton kernel on CPU tensors runs only under the interpreter.
- ``requires_cuda`` skips GPU-only tests cleanly; combine it with the ``gpu`` marker (pyproject.toml).
- ``backend_params`` parametrizes a test over the op backends with the right marks: on a GPU box the triton
  parameter runs on the GPU too, so it carries the ``gpu`` marker there (``pytest -m gpu`` selects it).
- ``nan_poisoned_allocations`` makes every torch.empty inside the op NaN-filled, so an output element the
  kernel forgets to write can never look correct.
- ``assert_matches_reference`` is the kernel-test tolerance rule (docs/ARCHITECTURE.md, "Kernel tests").
"""
from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _give_interpreter_gpu_bf16_numerics() -> None:
    """Triton's CPU interpreter keeps bf16 as raw uint16: its fp32 -> bf16 cast truncates (GPUs round to
    nearest even), and tl.dot multiplies the raw integers. Patch both so interpreted kernels compute what
    they compute on a GPU; the kernels themselves carry no interpreter special cases."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # no Triton: the Triton tests skip through dispatch
        return
    builder = interpreter.InterpreterBuilder
    original_cast, original_dot = builder.cast_impl, builder.create_dot

    def bf16_to_float32(bits):
        return (bits.astype(np.uint32) << 16).view(np.float32)

    def float32_to_bf16(x):
        bits = x.astype(np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round half to even
        return np.where(np.isnan(x), np.uint16(0x7FC0), rounded)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(float32_to_bf16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = interpreter.TensorHandle(bf16_to_float32(a.data), tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = interpreter.TensorHandle(bf16_to_float32(b.data), tl.float32)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _give_interpreter_gpu_bf16_numerics()

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# (atol, rtol) against the float64 reference.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 1e-2)}
# flash-attn's rule: the kernel may be this many times worse than the naive torch path in the same precision.
NAIVE_ERROR_FACTOR = 3.0


def backend_params(*backends: str):
    """pytest params for the given backends: 'cuda' carries the gpu marker and skips without a GPU, 'triton'
    carries it where a GPU runs it; a backend that is not installed (no Triton, extension not built) skips
    instead of failing."""
    from spd_engine import ops

    params = []
    for backend in backends:
        marks = [pytest.mark.gpu, requires_cuda] if backend == "cuda" else []
        if backend == "triton" and HAS_CUDA:
            marks.append(pytest.mark.gpu)
        marks.append(pytest.mark.skipif(not ops.available(backend), reason=f"backend '{backend}' is not installed"))
        params.append(pytest.param(backend, marks=marks, id=backend))
    return params


@pytest.fixture
def nan_poisoned_allocations():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # fills torch.empty with NaN
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def assert_matches_reference(actual: torch.Tensor, expected64: torch.Tensor, naive: torch.Tensor | None = None,
                             what: str = "output") -> None:
    """``actual`` against the float64 reference: every element finite, and within the dtype's tolerance or
    NAIVE_ERROR_FACTOR times the naive same-precision error (``naive``), whichever is larger."""
    assert actual.shape == expected64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: {(~torch.isfinite(actual)).sum().item()} non-finite elements"
    atol, rtol = TOLERANCES[actual.dtype]
    error = (actual.double().cpu() - expected64.cpu()).abs()
    allowed = atol + rtol * expected64.cpu().abs()
    if naive is not None:
        naive_error = (naive.double().cpu() - expected64.cpu()).abs().max()
        allowed = torch.clamp(allowed, min=NAIVE_ERROR_FACTOR * naive_error.item())
    worst = (error - allowed).argmax()
    assert (error <= allowed).all(), (
        f"{what}: {(error > allowed).sum().item()} elements out of tolerance; worst error "
        f"{error.flatten()[worst].item():.3g} (allowed {allowed.flatten()[worst].item():.3g})")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning slows them ~10x.
    Module-scoped: use it as ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- the tiny Llama of the data and training tests
# (test_distill_data, test_train_cache, test_ddp); a module that needs another model defines its own fixture of
# the same name, which takes precedence.
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "llama", layers=4)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    from spd_engine.engine import Engine

    return Engine.load(str(tiny_dir))


@pytest.fixture(scope="module")
def cache_dir(engine, tmp_path_factory):
    """A build-data feature cache of 40 conversations answered by the tiny model, every layer cached."""
    from spd_engine.distill_data import build_data

    out = tmp_path_factory.mktemp("cache")
    build_data(engine, out, prompts=40, shard_size=20, seed=0, answer_tokens=24, batch=8,
               feature_layers=[0, 1, 2, 3, 4], progress=False)
    return out
