"""spd-engine: Speculative Pipeline Decoding for fast, lossless single-sequence LLM decoding."""
__version__ = "0.1.0"

from .engine import Engine  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["Engine", "UserError", "__version__"]
