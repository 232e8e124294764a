"""The CUDA extension compiles wherever nvcc exists, and the cuda backend fails cleanly where it is absent.

With nvcc present, an up-to-date spd_engine._C (built by `pip install -e .` after the last change to csrc/)
is imported; otherwise csrc/ is compiled with CMake into build/cmake-test (one architecture, incremental),
so a CUDA compile error always fails the suite. Nothing here needs a GPU.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from module_loader import load_module

ROOT = Path(__file__).resolve().parents[1]
EXTENSION_API = ("AttentionArgs", "AppendKVArgs", "RmsNormArgs", "AggregateArgs", "attention_with_kvcache",
                 "append_kv_cache", "rms_norm", "aggregate_features", "run_attention", "run_rms_norm",
                 "run_aggregate_features", "attention_chunk_keys", "attention_rows_per_cta")


def _find_nvcc():
    return load_module(ROOT / "setup.py", "spd_engine_setup").find_nvcc()


def _installed_extension_if_current() -> Path | None:
    built = sorted((ROOT / "spd_engine").glob("_C.*"))
    if not built:
        return None
    sources = [ROOT / "CMakeLists.txt", *(ROOT / "csrc").iterdir()]
    newest_source = max(p.stat().st_mtime for p in sources)
    return built[0] if built[0].stat().st_mtime >= newest_source else None


def _compile_extension(nvcc: str) -> Path:
    import pybind11

    build_dir = ROOT / "build" / "cmake-test"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir), *generator, f"-DCMAKE_CUDA_COMPILER={nvcc}",
                 f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                 "-DCMAKE_CUDA_ARCHITECTURES=90"]
    for command in (configure, ["cmake", "--build", str(build_dir), "--parallel"]):
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command[:2])} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return next(build_dir.glob("_C.*.so"))


@pytest.fixture(scope="module")
def extension():
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA extension is not built on this machine")
    installed = _installed_extension_if_current()
    if installed is not None:  # one file initialises once per process: import it under its own name
        return importlib.import_module("spd_engine._C")
    # importing needs no GPU: the runtime initialises lazily
    return load_module(_compile_extension(nvcc), "_C")


def test_cuda_extension_compiles_and_imports(extension):
    missing = [name for name in EXTENSION_API if not hasattr(extension, name)]
    assert not missing, f"spd_engine._C lacks {missing}"
    assert extension.attention_chunk_keys(0) == 32 and extension.attention_chunk_keys(2) == 64
    assert extension.attention_rows_per_cta() > 0


def test_cuda_backend_without_extension_raises_a_clear_import_error(monkeypatch):
    import spd_engine

    monkeypatch.setitem(sys.modules, "spd_engine._C", None)  # None in sys.modules makes the import fail
    monkeypatch.delattr(spd_engine, "_C", raising=False)
    monkeypatch.delitem(sys.modules, "spd_engine.ops.cuda_backend", raising=False)
    with pytest.raises(ImportError, match="CUDA extension"):
        importlib.import_module("spd_engine.ops.cuda_backend")


def test_bound_argument_structs_hold_what_is_set(extension):
    args = extension.AttentionArgs()
    args.q, args.out, args.q_stride, args.s_max, args.softmax_scale = 1 << 40, 12345, (7, 6, 5), 4096, 0.125
    args.rotary_cos, args.rotary_len, args.rotary_dtype, args.causal = 64, 100, 2, False
    assert (args.q, args.out, args.q_stride, args.s_max, args.softmax_scale) == (1 << 40, 12345, (7, 6, 5), 4096, 0.125)
    assert (args.rotary_cos, args.rotary_len, args.rotary_dtype, args.causal) == (64, 100, 2, False)
    norm = extension.RmsNormArgs()
    norm.rows, norm.hidden, norm.eps, norm.residual = 3, 576, 1e-5, 0
    assert (norm.rows, norm.hidden, norm.residual) == (3, 576, 0) and norm.eps == pytest.approx(1e-5)
    aggregate = extension.AggregateArgs()
    aggregate.slots_int64, aggregate.anchor_stride_type = True, 40
    assert aggregate.slots_int64 and aggregate.anchor_stride_type == 40
    append = extension.AppendKVArgs()
    append.k_cache_stride = (1, 2, 3)
    assert append.k_cache_stride == (1, 2, 3)


@pytest.fixture
def cuda_backend_on(extension, monkeypatch):
    """The cuda backend over the real extension on CPU tensors: the device check and the stream are stubbed
    and the launchers record their arguments instead of launching, so the host half of plan/run (filling
    the bound structs, once per layout) runs here."""
    import spd_engine
    from spd_engine import ops

    monkeypatch.setitem(sys.modules, "spd_engine._C", extension)
    monkeypatch.setattr(spd_engine, "_C", extension, raising=False)
    monkeypatch.delitem(sys.modules, "spd_engine.ops.cuda_backend", raising=False)
    backend = importlib.import_module("spd_engine.ops.cuda_backend")
    launches = []
    for name in ("run_attention", "run_rms_norm", "run_aggregate_features"):
        monkeypatch.setattr(extension, name, lambda *a, name=name: launches.append((name, a)))
    monkeypatch.setattr(backend, "_check_device", lambda *tensors: None)
    monkeypatch.setattr(backend, "_stream", lambda device: 0)
    yield backend, launches
    sys.modules.pop("spd_engine.ops.cuda_backend", None)
    ops._load.cache_clear()


def test_a_plan_fills_its_struct_once_and_runs_pass_only_pointers(cuda_backend_on, monkeypatch):
    import torch

    backend, launches = cuda_backend_on
    fills = []
    real_fill = backend._fill
    monkeypatch.setattr(backend, "_fill",
                        lambda args, **fields: fills.append(sorted(fields)) or real_fill(args, **fields))
    plan = backend._plan_rms_norm((2, 64), torch.float32, torch.float32, True, torch.device("cpu"))
    assert len(fills) == 1
    weight = torch.randn(64)
    for step in range(3):
        x, residual = torch.randn(2, 64), torch.randn(2, 64)
        backend._run_rms_norm(plan, x, residual, weight, 1e-5, plan.out, plan.residual_out)
        name, (args, *pointers) = launches[-1]
        assert name == "run_rms_norm" and args is plan.binding.args
        assert pointers[:3] == [x.data_ptr(), residual.data_ptr(), weight.data_ptr()]
    assert len(fills) == 2  # the plan, then the first run's layout; later runs refill nothing
    args = plan.binding.args
    assert (args.rows, args.hidden, args.out, args.residual_out) == (2, 64, plan.out.data_ptr(),
                                                                     plan.residual_out.data_ptr())
    assert (args.x_row_stride, args.out_row_stride, args.x_dtype) == (64, 64, 0)
    assert args.eps == pytest.approx(1e-5)
    strided = torch.randn(2, 128)[:, :64]
    backend._run_rms_norm(plan, strided, residual, weight, 1e-5, plan.out, plan.residual_out)
    assert len(fills) == 3 and args.x_row_stride == 128  # a new layout refills the struct
    backend._run_rms_norm(plan, strided, None, weight, 1e-5, plan.out, plan.residual_out)
    assert len(fills) == 3 and launches[-1][1][2] == 0  # no residual: the bound layout still serves


def test_an_attention_plan_binds_the_caches_and_rotary_layout(cuda_backend_on):
    import torch

    backend, launches = cuda_backend_on
    B, S, Hq, Hkv, D = 1, 256, 4, 2, 64
    k_cache, v_cache = torch.zeros(B, S, Hkv, D), torch.zeros(B, S, Hkv, D)
    plan = backend.plan_attention((B, 1, Hq, D), k_cache, v_cache)
    args = plan.binding.args
    assert (args.batch, args.tq, args.hq, args.hkv, args.head_dim, args.s_max) == (B, 1, Hq, Hkv, D, S)
    assert (args.num_splits, args.split_len, args.out) == (plan.num_splits, plan.split_len, plan.out.data_ptr())
    cos, sin = torch.randn(S, D // 2), torch.randn(S, D // 2)
    qkv = torch.randn(B, 1, (Hq + 2 * Hkv) * D)
    q, k, v = (t.view(B, 1, -1, D) for t in qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1))
    lengths = torch.zeros(B, dtype=torch.int32)
    for _ in range(2):
        backend._run_attention(plan, q, k_cache, v_cache, k, v, lengths, cos, sin, D ** -0.5, True, plan.out,
                               plan.partial_out, plan.partial_lse)  # the custom op's body (ops are CUDA-only)
    name, (bound, *pointers) = launches[-1]
    assert name == "run_attention" and bound is args and len(launches) == 2
    assert pointers[:8] == [q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k.data_ptr(), v.data_ptr(),
                            lengths.data_ptr(), cos.data_ptr(), sin.data_ptr()]
    assert args.q_stride == q.stride()[:3] and args.k_cache_stride == k_cache.stride()[:3]
    assert (args.rotary_len, args.rotary_row_stride, args.softmax_scale) == (S, D // 2, pytest.approx(D ** -0.5))


def test_the_kernels_folder_installs_as_spd_engine_kernels():
    """setup.py maps the top-level kernels/ folder to spd_engine.kernels (PyPI's `kernels` is another project);
    from a source tree, spd_engine/__init__.py registers the same name, so imports read alike everywhere."""
    setup_module = load_module(ROOT / "setup.py", "spd_engine_setup")
    packages = setup_module.packages()
    assert "spd_engine.kernels" in packages and "kernels" not in packages and "spd_engine.ops" in packages
    split_kv = importlib.import_module("spd_engine.kernels.split_kv")
    assert Path(split_kv.__file__).resolve().parent in (ROOT / "kernels", ROOT / "spd_engine" / "kernels")
    assert split_kv.__name__ == "spd_engine.kernels.split_kv"


def test_the_kernels_folder_never_shadows_an_installed_kernels_package(tmp_path):
    """`python -m ...` from a checkout's root puts the root first on sys.path. Had kernels/ an __init__.py, a
    top-level `import kernels` would find it before PyPI's `kernels` (which transformers >= 5.25 imports), and
    every transformers model would fail to build. A stand-in installed package must win, and spd_engine.kernels
    must still resolve to the folder."""
    installed = tmp_path / "site" / "kernels"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("CUDAProperties = 'the installed package'\n")
    probe = ("import kernels, spd_engine.kernels.split_kv as split_kv; "
             "print(kernels.CUDAProperties); print(split_kv.__file__)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert result.returncode == 0, result.stderr
    found, split_kv_file = result.stdout.splitlines()
    assert found == "the installed package"
    assert Path(split_kv_file).resolve().parent in (ROOT / "kernels", ROOT / "spd_engine" / "kernels")
