"""The registry of decoding modes. A mode is one module here defining a :class:`~.base.DecodingMode`
subclass; adding one is that module plus one line below. Modules are imported on first use, so the command
line starts without loading every mode."""
from __future__ import annotations

import importlib

from ..errors import UserError
from .base import DecodingMode

REGISTRY = {  # name -> "module:class" under spd_engine.modes
    "vanilla": "vanilla:VanillaMode",
    "spd": "spd:SPDMode",
    "pipespec": "pipespec:PipeSpecMode",
    "ppsd": "ppsd:PPSDMode",
}
MODE_NAMES = tuple(REGISTRY)


def mode_class(name: str) -> type[DecodingMode]:
    if name not in REGISTRY:
        raise UserError(f"--mode must be one of {', '.join(MODE_NAMES)}, got '{name}'")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def all_modes() -> list[type[DecodingMode]]:
    return [mode_class(name) for name in MODE_NAMES]
