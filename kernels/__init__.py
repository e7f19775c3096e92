"""Dequant-matmul kernels for quantkit's packed formats and their PyTorch references.

Importable as ``quantkit.kernels``. The reference (dequantize, then an ordinary matmul) is always available and
is the fallback of :func:`quantkit.kernels.dispatch.uniform_matmul`; fused Triton kernels register in the same table.
"""

from __future__ import annotations

from quantkit.kernels.dispatch import KERNELS, register_kernel, uniform_matmul
from quantkit.kernels.reference import dequantize_uniform, uniform_matmul_ref

__all__ = ["KERNELS", "register_kernel", "uniform_matmul", "dequantize_uniform", "uniform_matmul_ref"]
