"""The CUDA extension compiles wherever nvcc exists, and the cuda backend fails cleanly where it is absent.

With nvcc present, an up-to-date spd_engine._C (built by `pip install -e .` after the last change to csrc/)
is imported; otherwise csrc/ is compiled with CMake into build/cmake-test (one architecture, incremental),
so a CUDA compile error always fails the suite. Nothing here needs a GPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSION_API = ("attention_with_kvcache", "attention_chunk_keys", "attention_rows_per_cta", "append_kv_cache",
                 "rms_norm", "aggregate_features")


def _load_from(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _find_nvcc():
    return _load_from(ROOT / "setup.py", "spd_engine_setup").find_nvcc()


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


def test_cuda_extension_compiles_and_imports():
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA extension is not built on this machine")
    library = _installed_extension_if_current() or _compile_extension(nvcc)
    extension = _load_from(library, "_C")  # importing needs no GPU: the runtime initialises lazily
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
