"""Quantized modules."""

from __future__ import annotations

from quantkit.nn.linear import QuantizedLinear, kernel_for

__all__ = ["QuantizedLinear", "kernel_for"]
