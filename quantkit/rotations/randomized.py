"""Randomized Hadamard rotations of a linear's input or output dimension (QuIP#, Tseng et al. 2024; QuaRot,
Ashkboos et al. 2024; HIGGS, Malinovskii et al. 2024).

``R = H D / √b`` with ``D`` random signs and ``H`` the (block-diagonal) Hadamard matrix of ``hadamard_layout``:
orthogonal, so ``Rᵀ`` undoes it. Spreading each weight row over all columns makes the rounding error incoherent
with the Hessian and makes weights look Gaussian, which is what the Gaussian grids are fitted to.

Where each rotation lives:

- ``input``: fused into the weight as ``W Rᵀ``; online, the activation is rotated, ``x ↦ R x``, so
  ``(W Rᵀ)(R x) = W x``. The Hessian of the rotated problem is ``R H Rᵀ``.
- ``output``: fused as ``S W``; online, the layer's output is rotated back, ``y ↦ Sᵀ y`` (then the bias is added).
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from quantkit.kernels.dispatch import hadamard_kernel
from quantkit.rotations.hadamard import HadamardLayout, hadamard_layout, hadamard_matrix, small_hadamard

__all__ = ["HadamardRotation", "random_signs", "hadamard_transform"]

Side = Literal["input", "output"]


def random_signs(n: int, seed: int, name: str) -> torch.Tensor:
    """±1 signs [n] int8 from a generator seeded by the recipe's seed and the layer's name (so layers differ)."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def hadamard_transform(x: torch.Tensor, layout: HadamardLayout, *, transpose: bool = False) -> torch.Tensor:
    """``x (H/√b)ᵀ`` over the last dimension (``x H/√b`` with ``transpose``), in ``x``'s dtype.

    Each block of ``b = small · pow2`` is viewed as ``[small, pow2]``: the small factor goes through a dense
    ``small × small`` matmul. The power-of-two factor goes through a registered kernel where one applies
    (quantkit.kernels.dispatch: the fast transform in Triton, on CUDA); elsewhere it
    is split into Sylvester factors of order at most 64 (``H₂ₐ₊ᵦ = H₂ₐ ⊗ H₂ᵦ``) and each factor is one matmul
    along its own axis. That is O(n · Σ factors) work instead of O(n log n), but every step is one GEMM rather
    than an elementwise pass with its own allocation; on CPU that is faster than the butterfly at Llama's widths
    and for long batches (``benchmarks/cpu_speed.py --hadamard``; figures in BENCHMARKS.md).
    """
    lead, n = x.shape[:-1], x.shape[-1]
    if n != layout.n:
        raise ValueError(f"expected last dimension {layout.n}, got {n}")
    fwht = hadamard_kernel(x, layout, fused=False)
    if fwht is not None:
        y = fwht(x.reshape(-1, layout.small, layout.pow2))  # Sylvester: symmetric, transpose or not
        if layout.small > 1:
            S = _small_on(layout.small, y.device, y.dtype)
            y = (S.T if transpose else S) @ y  # rows of the [small, pow2] view mix by S (x Hᵀ: S on the left)
        return (y * layout.block**-0.5).reshape(*lead, n)
    factors = _kron_factors(layout.small, layout.pow2)
    y = x.reshape(-1, *(f for f, _ in factors))
    for axis, (f, is_small) in enumerate(factors, start=1):
        M = _small_on(f, y.device, y.dtype) if is_small else _sylvester_on(f, y.device, y.dtype)
        if is_small and not transpose:
            M = M.T  # y ↦ S y along this axis is (… @ Sᵀ) once the axis is last
        if axis == len(factors):
            M = M * layout.block**-0.5  # the normalization rides on the last (contiguous) factor's GEMM
        moved = y.movedim(axis, -1)
        y = (moved.reshape(-1, f) @ M).view(moved.shape).movedim(-1, axis)  # one 2-D GEMM, not a strided bmm
    return y.reshape(*lead, n)


_MAX_FACTOR = 64


@functools.cache
def _kron_factors(small: int, pow2: int) -> tuple[tuple[int, bool], ...]:
    """The block's Kronecker factors in index order, each as (order, is_small): ``small``, then ``pow2`` cut into
    powers of two of at most ``_MAX_FACTOR`` (factors of order 1 left out)."""
    out = [(small, True)] if small > 1 else []
    k = pow2.bit_length() - 1
    step = _MAX_FACTOR.bit_length() - 1
    while k > 0:
        out.append((1 << min(k, step), False))
        k -= min(k, step)
    return tuple(out) or ((1, False),)


@functools.cache
def _small_on(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return small_hadamard(m).to(device=device, dtype=dtype)


@functools.cache
def _sylvester_on(m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return hadamard_matrix(m).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class HadamardRotation:
    """``R = H D / √b`` on one side of a linear; ``signs`` [n] are the diagonal of D."""

    signs: torch.Tensor  # [n] int8 ±1
    side: Side = "input"

    @property
    def layout(self) -> HadamardLayout:
        return hadamard_layout(self.signs.numel())

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``R x`` for each vector along the last dimension, computed in fp32 and returned in ``x``'s dtype."""
        fused = hadamard_kernel(x, self.layout, fused=True)
        if fused is not None:
            return fused(x, self.signs, self.layout.block)
        s = self.signs.to(device=x.device, dtype=torch.float32)
        return hadamard_transform(x.float() * s, self.layout).to(x.dtype)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """``Rᵀ x`` along the last dimension: undoes :meth:`apply`."""
        fused = hadamard_kernel(x, self.layout, fused=True)
        if fused is not None:
            return fused(x, self.signs, self.layout.block, transpose=True)
        s = self.signs.to(device=x.device, dtype=torch.float32)
        return (hadamard_transform(x.float(), self.layout, transpose=True) * s).to(x.dtype)

    # -- where it lives --------------------------------------------------------------------------------------

    def fuse(self, W: torch.Tensor) -> torch.Tensor:
        """The stored weight: ``W Rᵀ`` (input side: rows rotated) or ``S W`` (output side: columns rotated)."""
        if self.side == "input":
            return self.apply(W)
        return self.apply(W.T).T.contiguous()

    def unfuse(self, W: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`fuse`: the weight in the original basis."""
        if self.side == "input":
            return self.invert(W)
        return self.invert(W.T).T.contiguous()

    def online(self, t: torch.Tensor) -> torch.Tensor:
        """What the forward applies: ``R x`` to the input, or ``Sᵀ y`` to the output."""
        return self.apply(t) if self.side == "input" else self.invert(t)

    def rotate_hessian(self, H: torch.Tensor) -> torch.Tensor:
        """``R H Rᵀ`` for an input-side rotation (``H`` [in, in], or [h, in, in] per head)."""
        if self.side != "input":
            raise ValueError("only an input-side rotation changes the Hessian")
        return self.apply(self.apply(H).transpose(-1, -2)).transpose(-1, -2).contiguous()
