"""spd-engine: Speculative Pipeline Decoding for fast, lossless single-sequence LLM decoding."""
__version__ = "0.1.0"
