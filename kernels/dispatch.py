"""One dispatch point for dequant-matmul: the first registered kernel whose predicate accepts the call wins;
the PyTorch reference serves everything else (CPU, odd shapes, no Triton)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.kernels.reference import uniform_matmul_ref

__all__ = ["KERNELS", "Kernel", "kernel_for", "register_kernel", "uniform_matmul"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernel:
    name: str
    supports: Callable[..., bool]
    impl: Callable[..., torch.Tensor]


KERNELS: list[Kernel] = []
_builtins_loaded = False


def register_kernel(name: str, supports: Callable[..., bool], impl: Callable[..., torch.Tensor]) -> None:
    KERNELS.append(Kernel(name, supports, impl))


def _load_builtin_kernels() -> None:
    """Register the kernels quantkit ships, once, on first use (not at ``import quantkit``: CPU users pay nothing).

    The Triton kernels register only when Triton is installed; their predicate then accepts CUDA tensors only.
    """
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    if importlib.util.find_spec("triton") is None:
        logger.debug("triton is not installed: uniform_matmul uses the PyTorch reference")
        return
    from quantkit.kernels.ops import triton_supports, uniform_matmul_cuda

    register_kernel("triton-uniform", triton_supports, uniform_matmul_cuda)


def uniform_matmul(x, qweight, scales, zeros, perm, bias, *, bits: int, group_size: int,
                   levels: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the scalar-grid format: ``levels`` set for non-uniform grids, else affine codes.
    With ``rotation`` (a ``HadamardRotation`` of the input, fused into the stored weight), ``(R x) @ W.T``: a
    kernel may compute ``R x`` inside the matmul; the reference applies it first."""
    kernel = _select(x, qweight, bits, group_size)
    if kernel is not None:
        return kernel.impl(x, qweight, scales, zeros, perm, bias, bits=bits, group_size=group_size, levels=levels,
                           rotation=rotation)
    if rotation is not None:
        x = rotation.apply(x)
    return uniform_matmul_ref(x, qweight, scales, zeros, perm, bias, bits=bits, group_size=group_size, levels=levels)


def kernel_for(model: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """The name of the kernel that the first ``QuantizedLinear`` in ``model`` dispatches to, for activations of
    ``dtype`` (default: the dtype of the model's first floating-point parameter) on that layer's device;
    ``"pytorch-reference"`` when no registered kernel applies."""
    from quantkit.nn import QuantizedLinear

    layer = next((m for m in model.modules() if isinstance(m, QuantizedLinear)), None)
    if layer is None:
        raise ValueError("the model has no QuantizedLinear")
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float16)
    x = torch.empty(1, layer.in_features, device=layer.qweight.device, dtype=dtype)
    kernel = _select(x, layer.qweight, layer.scheme.bits, layer.scheme.group_size)
    return "pytorch-reference" if kernel is None else kernel.name


def _select(x: torch.Tensor, qweight: torch.Tensor, bits: int, group_size: int) -> Kernel | None:
    """The first registered kernel whose predicate accepts the call; None means the PyTorch reference."""
    _load_builtin_kernels()
    return next((k for k in KERNELS if k.supports(x, qweight, bits=bits, group_size=group_size)), None)
