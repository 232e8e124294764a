"""spd-engine: Speculative Pipeline Decoding for fast, lossless single-sequence LLM decoding."""
__version__ = "0.1.0"


def _map_source_kernels() -> None:
    """The Triton kernels live in the top-level kernels/ folder and install as ``spd_engine.kernels`` (setup.py
    maps the folder; an editable install's finder maps it too). Running from a source tree, nothing maps it:
    then register that folder under the same name, so one import path serves every way of running."""
    import importlib.util
    import sys
    from pathlib import Path

    name = __name__ + ".kernels"
    if name in sys.modules or importlib.util.find_spec(name) is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if not (folder / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_kernels()

from .engine import Engine  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["Engine", "UserError", "__version__"]
