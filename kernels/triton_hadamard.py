"""Fast Walsh–Hadamard transform in Triton: the online half of a Hadamard rotation (quantkit.rotations).

Each program transforms ``ROWS`` rows of length ``N`` (a power of two) held in registers: ``log2 N`` butterfly
stages, each pairing elements ``h`` apart as ``(a + b, a − b)``, computed in fp32 and stored in the input dtype.
The reshape / permute / split / join of a stage only relabels registers; nothing goes back to memory between
stages. Unnormalized, like :func:`quantkit.rotations.hadamard.fwht`, which is its reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["triton_fwht"]

# Elements one program holds: rows are batched until a program has this many (short transforms, long batches).
_ELEMS_PER_PROGRAM = 4096


@triton.jit
def _fwht_kernel(x_ptr, out_ptr, n_rows, N: tl.constexpr, LOG_N: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    offs = rows.to(tl.int64)[:, None] * N + tl.arange(0, N)[None, :]
    mask = rows[:, None] < n_rows
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for s in tl.static_range(LOG_N):
        h: tl.constexpr = 1 << s
        y = tl.permute(tl.reshape(x, (ROWS, N // (2 * h), 2, h)), (0, 1, 3, 2))  # pairs h apart on the last axis
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, (ROWS, N))
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def triton_fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh–Hadamard transform of the last dimension (a power of two); same shape and dtype."""
    N = x.shape[-1]
    if N & (N - 1) or N == 0:
        raise ValueError(f"the fast transform needs a power-of-two length, got {N}")
    x2 = x.reshape(-1, N).contiguous()
    out = torch.empty_like(x2)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out.reshape(x.shape)
    rows = max(1, min(_ELEMS_PER_PROGRAM // N, triton.next_power_of_2(n_rows)))
    num_warps = 4 if N * rows <= 2048 else 8
    _fwht_kernel[(triton.cdiv(n_rows, rows),)](x2, out, n_rows, N=N, LOG_N=N.bit_length() - 1, ROWS=rows,
                                              num_warps=num_warps)
    return out.reshape(x.shape)
