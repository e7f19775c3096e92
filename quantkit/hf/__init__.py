"""The transformers adapter: a quantization config and an ``HfQuantizer`` registered under ``quantkit``."""

from __future__ import annotations

from quantkit.hf.config import QuantkitConfig
from quantkit.hf.quantizer import QuantkitHfQuantizer, register, replace_linears

__all__ = ["QuantkitConfig", "QuantkitHfQuantizer", "register", "replace_linears"]
