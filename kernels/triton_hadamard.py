"""Fast Walsh–Hadamard transform in Triton: the online half of a Hadamard rotation (quantkit.rotations).

Each program transforms ``ROWS`` rows of length ``N`` (a power of two) held in registers: ``log2 N`` butterfly
stages, each pairing elements ``h`` apart as ``(a + b, a − b)``, computed in fp32 and stored in the input dtype.
The reshape / permute / split / join of a stage only relabels registers; nothing goes back to memory between
stages. Unnormalized, like :func:`quantkit.rotations.hadamard.fwht`, which is its reference.

:func:`triton_rotate` is the whole randomized rotation of a power-of-two block in one launch: random signs
before the transform (``R x = H D x / √n``) or after it (``Rᵀ y = D H y / √n``), and the scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fwht_rows", "triton_fwht", "triton_rotate"]

# Elements one program holds: rows are batched until a program has this many (short transforms, long batches).
_ELEMS_PER_PROGRAM = 4096


@triton.jit
def fwht_rows(x, ROWS: tl.constexpr, N: tl.constexpr):
    """The unnormalized Walsh–Hadamard transform of each row of ``x`` [ROWS, N] (N a power of two below 2**16;
    fp32, in registers): ``log2 N`` butterfly stages pairing elements ``h`` apart as ``(a + b, a − b)``.
    Shared with the fused dequant-matmul (``quantkit.kernels.triton_uniform``)."""
    # Stage s pairs elements h = 2**s apart. (The compiler refuses a constexpr assigned in each unrolled
    # iteration, so h is spelled out as 1 << s.)
    for s in tl.static_range(16):
        if (1 << s) < N:  # resolved at compile time: log2 N stages
            y = tl.permute(tl.reshape(x, (ROWS, N // (2 << s), 2, 1 << s)), (0, 1, 3, 2))  # pairs h apart, last axis
            a, b = tl.split(y)
            y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
            x = tl.reshape(y, (ROWS, N))
    return x


@triton.jit
def _fwht_kernel(x_ptr, out_ptr, signs_ptr, scale, n_rows, n_signs, N: tl.constexpr, ROWS: tl.constexpr,
                 SIGNS: tl.constexpr):
    # SIGNS: 0 none; 1 multiply by the signs before the transform; 2 after it. A row is a block of N consecutive
    # elements of a vector of n_signs elements (the vectors are contiguous), so element e has sign e % n_signs.
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows.to(tl.int64)[:, None] * N + tl.arange(0, N)[None, :]
    mask = rows[:, None] < n_rows
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SIGNS != 0:
        d = tl.load(signs_ptr + offs % n_signs, mask=mask, other=0).to(tl.float32)
    if SIGNS == 1:
        x = x * d
    x = fwht_rows(x, ROWS, N) * scale
    if SIGNS == 2:
        x = x * d
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def launch_shape(n_rows: int, N: int) -> tuple[int, int]:
    """Rows per program and warps for ``n_rows`` transforms of length ``N`` (``benchmarks.kernel_aot`` builds the
    same launches)."""
    rows = max(1, min(_ELEMS_PER_PROGRAM // N, triton.next_power_of_2(n_rows)))
    return rows, 4 if N * rows <= 2048 else 8


def _launch(x: torch.Tensor, N: int, signs: torch.Tensor | None, scale: float, where: int) -> torch.Tensor:
    if N & (N - 1) or N == 0 or N >= 2**16:
        raise ValueError(f"the fast transform needs a power-of-two length below 2**16, got {N}")
    x2 = x.contiguous()
    out = torch.empty_like(x2)
    n_rows = x2.numel() // N
    if n_rows == 0:
        return out
    rows, num_warps = launch_shape(n_rows, N)
    n_signs = signs.numel() if signs is not None else 1
    _fwht_kernel[(triton.cdiv(n_rows, rows),)](
        x2, out, signs if signs is not None else x2, scale, n_rows, n_signs,
        N=N, ROWS=rows, SIGNS=where, num_warps=num_warps,
    )
    return out


def triton_fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform of the last dimension (a power of two); same shape and dtype."""
    return _launch(x, x.shape[-1], None, 1.0, 0)


def triton_rotate(x: torch.Tensor, signs: torch.Tensor, block: int, *, transpose: bool = False) -> torch.Tensor:
    """``R x`` (``Rᵀ x`` with ``transpose``) over the last dimension for ``R = H D / √block``, ``H`` block-diagonal
    Sylvester with power-of-two blocks: one launch, computed in fp32, returned in ``x``'s dtype."""
    if x.shape[-1] != signs.numel() or x.shape[-1] % block:
        raise ValueError(f"signs [{signs.numel()}] and block {block} do not fit a last dimension of {x.shape[-1]}")
    return _launch(x, block, signs.contiguous(), block**-0.5, 2 if transpose else 1)
