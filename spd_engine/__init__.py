"""spd-engine: Speculative Pipeline Decoding for fast, lossless single-sequence LLM decoding."""
__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """The Triton kernels live in the top-level kernels/ folder and install as ``spd_engine.kernels`` (setup.py
    maps the folder into the wheel; an editable install's finder maps it as a namespace). The folder has no
    ``__init__.py`` on purpose: from a checkout's root (which ``python -m`` puts first on sys.path) a regular
    package named ``kernels`` would shadow PyPI's unrelated ``kernels``, which transformers imports; a folder
    without one never wins over an installed package. Where nothing maps the name (a source tree), register the
    folder under it here as a namespace-style package, so one import path serves every way of running."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not folder.is_dir():
        return
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(folder)]
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    globals()["kernels"] = module


_map_source_kernels()

from .engine import Engine  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["Engine", "UserError", "__version__"]
