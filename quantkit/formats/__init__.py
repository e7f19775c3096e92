"""Packed storage formats. A Format owns the tensors a quantized linear stores, packing, and its inverse."""

from __future__ import annotations

from quantkit.formats.uniform import FORMAT_NAME, FORMAT_VERSION, UniformFormat

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "UniformFormat"]
