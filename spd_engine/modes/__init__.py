"""The registry of decoding modes. A mode is one module here defining a :class:`~.base.DecodingMode`
subclass; adding one is that module plus one line below. A module is imported when its mode is first asked
for (the command line asks for every mode, for their flags)."""
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
REFERENCE_MODE = "vanilla"  # the mode every other is compared with: at temperature 0 they must agree


def mode_class(name: str) -> type[DecodingMode]:
    if name not in REGISTRY:
        raise UserError(f"--mode must be one of {', '.join(MODE_NAMES)}, got '{name}'")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def all_modes() -> list[type[DecodingMode]]:
    return [mode_class(name) for name in MODE_NAMES]


def check_options(mode: type[DecodingMode], given) -> None:
    """``given`` (option keywords) must all be ``mode``'s: another mode's is a one-line error naming it."""
    for keyword in given:
        if keyword not in mode.options:
            owners = [other for other in all_modes() if keyword in other.options]
            if not owners:  # only a Python caller can get here: the command line has no such flag
                raise UserError(f"'{keyword}' is not an option of any decoding mode")
            names = " or ".join(other.name for other in owners)
            raise UserError(f"{owners[0].options[keyword]} applies to --mode {names} only")
