"""Dequant-matmul kernels for quantkit's packed formats.

Importable as ``quantkit.kernels``. :mod:`quantkit.kernels.dispatch` picks, per call, the first registered kernel
that accepts it; each format's PyTorch reference (quantkit.formats) serves everything else. The fused Triton
kernels (``triton_uniform``, ``triton_hadamard``, as the custom op of ``ops``) register there when Triton is
installed.
"""

from __future__ import annotations

from quantkit.kernels.dispatch import KERNELS, linear, register_hadamard_kernel, register_kernel

__all__ = ["KERNELS", "linear", "register_hadamard_kernel", "register_kernel"]
