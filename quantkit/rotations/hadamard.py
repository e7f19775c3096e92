"""Hadamard matrices and the fast Walsh–Hadamard transform.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``, so ``H / √n`` is orthogonal. Orders
built here (as QuIP# and QuaRot do):

- powers of two, Sylvester's construction, applied in O(n log n) by the fast Walsh–Hadamard transform;
- the small orders 12 and 20 (Paley I: prime ``q ≡ 3 mod 4``, order ``q + 1``) and 28 (Paley II: prime
  ``q ≡ 1 mod 4``, order ``2(q + 1)``), applied as dense matrices;
- Kronecker products of these: ``n = 12ᵃ 20ᵇ 28ᶜ 2ᵏ`` (SmolLM2's 576 = 12·12·4 and 1536 = 12·128, Llama-3's
  14336 = 28·512).

Any other order is covered block-diagonally by the largest buildable order that divides it (Llama-2's
11008 = 43·256: 43 blocks of 256); :func:`hadamard_layout` says which.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = ["HadamardLayout", "fwht", "hadamard_layout", "hadamard_matrix", "small_hadamard"]

# Small orders by the odd prime they contribute: 12 = 4·3, 20 = 4·5, 28 = 4·7.
_SMALL = {3: 12, 5: 20, 7: 28}


def _legendre(a: int, q: int) -> int:
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    idx = torch.arange(q)
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    return chi[(idx[None, :] - idx[:, None]) % q]  # Q[i, j] = χ(j − i)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for a prime q ≡ 3 mod 4: I + S with S the skew conference matrix bordered by ones."""
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = _jacobsthal(q)
    return S + torch.eye(q + 1, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for a prime q ≡ 1 mod 4, from the symmetric conference matrix C of order q + 1."""
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = _jacobsthal(q)
    A = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    B = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, A) + torch.kron(torch.eye(q + 1, dtype=torch.float64), B)


@functools.cache
def small_hadamard(m: int) -> torch.Tensor:
    """The dense ±1 Hadamard matrix of a non-power-of-two factor ``m`` (a product of 12, 20 and 28), float64."""
    H = torch.ones(1, 1, dtype=torch.float64)
    odd = m // (m & -m)
    for p, order in _SMALL.items():  # each small order contributes one odd prime, so the factors are unique
        while odd % p == 0:
            H = torch.kron(H, _small_base(order))
            odd //= p
    if odd != 1 or H.shape[0] != m:
        raise ValueError(f"{m} is not a product of the small Hadamard orders {sorted(_SMALL.values())}")
    return H


@functools.cache
def _small_base(order: int) -> torch.Tensor:
    H = {12: lambda: _paley1(11), 20: lambda: _paley1(19), 28: lambda: _paley2(13)}[order]()
    assert torch.equal(H @ H.T, order * torch.eye(order, dtype=torch.float64)), order
    return H


def _split(n: int) -> tuple[int, int] | None:
    """``n = m · 2ᵏ`` with ``m`` a product of small orders, or None when no Hadamard of order n is built here."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1
    odd = n >> k
    m = 1
    for p, order in _SMALL.items():
        while odd % p == 0:
            odd //= p
            m *= order
    if odd != 1 or n % m:
        return None
    return m, n // m


@dataclass(frozen=True)
class HadamardLayout:
    """How a dimension ``n`` is rotated: ``n // block`` diagonal blocks, each ``small ⊗ pow2`` (Kronecker)."""

    n: int
    block: int
    small: int  # dense factor (1 when the block is a power of two)
    pow2: int  # fast-transform factor

    @property
    def full(self) -> bool:
        return self.block == self.n

    def describe(self) -> str:
        kind = "full" if self.full else f"block-diagonal ({self.n // self.block} blocks)"
        parts = [str(self.small)] if self.small > 1 else []
        return f"{kind} Hadamard of order {self.block}" + (f" = {self.small}·{self.pow2}" if parts else "")


@functools.cache
def hadamard_layout(n: int) -> HadamardLayout:
    """The full Hadamard of order ``n`` when one is built here, else the largest buildable block dividing ``n``."""
    for block in sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True):
        split = _split(block)
        if split is not None:
            return HadamardLayout(n, block, *split)
    raise AssertionError("order 1 is always buildable")


def hadamard_matrix(n: int) -> torch.Tensor:
    """The dense ±1 matrix (block-diagonal when ``n`` has no full Hadamard here), float64. For tests and small n."""
    lay = hadamard_layout(n)
    S = torch.ones(1, 1, dtype=torch.float64)
    P = torch.ones(1, 1, dtype=torch.float64)
    while P.shape[0] < lay.pow2:
        P = torch.cat([torch.cat([P, P], 1), torch.cat([P, -P], 1)], 0)
    if lay.small > 1:
        S = small_hadamard(lay.small)
    return torch.block_diag(*[torch.kron(S, P)] * (n // lay.block))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last dimension (a power of two): ``x Hᵀ = x H``."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)
