"""Quantized modules."""

from __future__ import annotations

from quantkit.nn.linear import QuantizedLinear

__all__ = ["QuantizedLinear"]
