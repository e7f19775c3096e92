"""One dispatch point for dequant-matmul: the first registered kernel whose predicate accepts the call wins;
the PyTorch reference serves everything else (CPU, odd shapes, no Triton)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from quantkit.kernels.reference import uniform_matmul_ref

__all__ = ["KERNELS", "Kernel", "register_kernel", "uniform_matmul"]


@dataclass(frozen=True)
class Kernel:
    name: str
    supports: Callable[..., bool]
    impl: Callable[..., torch.Tensor]


KERNELS: list[Kernel] = []


def register_kernel(name: str, supports: Callable[..., bool], impl: Callable[..., torch.Tensor]) -> None:
    KERNELS.append(Kernel(name, supports, impl))


def uniform_matmul(x, qweight, scales, zeros, perm, bias, *, bits: int, group_size: int) -> torch.Tensor:
    for kernel in KERNELS:
        if kernel.supports(x, qweight, bits=bits, group_size=group_size):
            return kernel.impl(x, qweight, scales, zeros, perm, bias, bits=bits, group_size=group_size)
    return uniform_matmul_ref(x, qweight, scales, zeros, perm, bias, bits=bits, group_size=group_size)
