"""One dispatch point per operation: the first registered kernel whose predicate accepts the call wins; the
PyTorch reference serves everything else (layouts no kernel takes, odd shapes, no Triton, kernels turned off).

- ``linear(x, module, ...)``: a quantized linear's forward. Kernels register per format name and receive the
  module (its ``format``, ``scheme`` and packed ``tensors``); the reference is the format's own ``linear``
  (dequantize, then matmul), so a new format works everywhere before it has a kernel.
- ``hadamard_kernel(x, fused=...)``: the backend of a Hadamard rotation (quantkit.rotations asks, and falls back to
  its PyTorch transform when none applies): the Triton fast Walsh–Hadamard transform on CUDA.

The kernels register lazily, on first use: the CPU kernels (:mod:`quantkit.kernels.cpu`, PyTorch's weight-only
int4/int8 matmuls, and :mod:`quantkit.kernels.cpu_codebook`, the codebook formats' decoded weight kept;
``QUANTKIT_CPU_KERNELS=0`` turns them off) always, the Triton kernels only when Triton is
installed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["KERNELS", "HADAMARD_KERNELS", "Kernel", "hadamard_kernel", "linear", "register_hadamard_kernel",
           "register_kernel", "select"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    name: str
    format: str  # the format it computes with
    supports: Callable[..., bool]  # (x, module) -> bool
    impl: Callable[..., torch.Tensor]  # (x, module, *, bias, rotation) -> y


@dataclass(frozen=True)
class HadamardKernel:
    name: str
    fused: bool  # True: ``impl(x, signs, block, transpose=False)`` (signs and scale inside); False: ``impl(x)``
    supports: Callable[..., bool]  # (x, layout) -> bool
    impl: Callable[..., torch.Tensor]


KERNELS: list[Kernel] = []
HADAMARD_KERNELS: list[HadamardKernel] = []
_builtins_loaded = False


def register_kernel(name: str, format: str, supports: Callable[..., bool], impl: Callable[..., torch.Tensor]) -> None:
    KERNELS.append(Kernel(name, format, supports, impl))


def register_hadamard_kernel(name: str, *, fused: bool, supports: Callable[..., bool],
                             impl: Callable[..., torch.Tensor]) -> None:
    HADAMARD_KERNELS.append(HadamardKernel(name, fused, supports, impl))


def _load_builtin_kernels() -> None:
    """Register the kernels quantkit ships, once, on first use (not at ``import quantkit``).

    The CPU kernels accept CPU tensors only; the Triton kernels register only when Triton is installed, and their
    predicates accept CUDA tensors only.
    """
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    from quantkit.kernels.cpu import register_cpu_kernels
    from quantkit.kernels.cpu_codebook import register_cpu_codebook_kernels

    register_cpu_kernels()
    register_cpu_codebook_kernels()
    if importlib.util.find_spec("triton") is None:
        logger.debug("triton is not installed: quantized linears and rotations use the PyTorch reference")
        return
    from quantkit.kernels.ops import register_triton_kernels

    register_triton_kernels()


def select(x: torch.Tensor, module) -> Kernel | None:
    """The first registered kernel for ``module``'s format that accepts the call; None means the reference."""
    _load_builtin_kernels()
    name = module.format.name
    return next((k for k in KERNELS if k.format == name and k.supports(x, module)), None)


def linear(x: torch.Tensor, module, *, bias: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a quantized linear ``module`` (``format``, ``scheme``, ``tensors``). With
    ``rotation`` (a ``HadamardRotation`` of the input, fused into the stored weight), ``(R x) @ W.T``: a kernel
    may compute ``R x`` inside the matmul; the reference applies it first."""
    kernel = select(x, module)
    if kernel is not None:
        return kernel.impl(x, module, bias=bias, rotation=rotation)
    if rotation is not None:
        x = rotation.apply(x)
    return module.format.linear(x, module.tensors, module.scheme, bias)


def hadamard_kernel(x: torch.Tensor, layout, *, fused: bool) -> Callable[..., torch.Tensor] | None:
    """A registered Hadamard transform for ``x`` and ``layout`` (a ``HadamardLayout``), or None."""
    _load_builtin_kernels()
    return next((k.impl for k in HADAMARD_KERNELS if k.fused == fused and k.supports(x, layout)), None)
