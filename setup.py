"""Builds the optional CUDA extension ``spd_engine._C`` from csrc/ with CMake (metadata lives in pyproject.toml).

- nvcc found (PATH, $CUDA_HOME/bin or /usr/local/cuda/bin): configure + build; a compile error fails the
  install, which is how CI catches broken CUDA code.
- nvcc absent, or SPD_ENGINE_NO_CUDA=1: skip with a one-line note; the engine runs on Triton and torch.

The extension links only the CUDA runtime (no torch headers), so it needs no CUDA build of torch.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildCudaExtension(build_ext):
    """build_ext that drives CMakeLists.txt, or skips when there is no CUDA toolchain."""

    def _skip_reason(self) -> str | None:
        if os.environ.get("SPD_ENGINE_NO_CUDA") == "1":
            return "SPD_ENGINE_NO_CUDA=1"
        if find_nvcc() is None:
            return "nvcc not found"
        return None

    def run(self):
        reason = self._skip_reason()
        if reason:
            print(f"spd-engine: {reason}; skipping the CUDA extension (Triton and torch backends only)")
            return
        super().run()

    def get_outputs(self):
        return [] if self._skip_reason() else super().get_outputs()

    def build_extension(self, ext: Extension):
        import pybind11

        nvcc = find_nvcc()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), *generator,
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("SPD_ENGINE_CUDA_ARCHS"):
            configure.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['SPD_ENGINE_CUDA_ARCHS']}")
        # check_call raises on failure: with nvcc present, a compile error must fail the install.
        subprocess.check_call(configure)
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)])
        built = next(build_dir.glob("_C*.so"), None) or next(build_dir.glob("_C*.pyd"))
        destination = Path(self.get_ext_fullpath(ext.name))
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built, destination)


def packages() -> list[str]:
    """spd_engine and its subpackages, plus the top-level kernels/ folder as spd_engine.kernels (mapped by
    package_dir; PyPI's unrelated `kernels` package keeps its name). The folder has no __init__.py, so from a
    checkout's root it never shadows that package; spd_engine/__init__.py makes the same name resolve to
    kernels/ wherever nothing maps it."""
    from setuptools import find_namespace_packages  # what pyproject's packages.find did: data folders too

    found = find_namespace_packages(include=["spd_engine", "spd_engine.*"], exclude=["*__pycache__*"])
    return found + ["spd_engine.kernels"]


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import find_nvcc from it
    setup(packages=packages(), package_dir={"spd_engine.kernels": "kernels"},
          ext_modules=[CMakeExtension("spd_engine._C")], cmdclass={"build_ext": BuildCudaExtension})
