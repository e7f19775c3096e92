"""PyTorch reference for the scalar-grid packed format: unpack codes, decode them (``scale * (code - zero)`` or
``scale * levels[code]``), then matmul."""

from __future__ import annotations

import torch

from quantkit.formats.packing import unpack_codes

__all__ = ["dequantize_uniform", "uniform_matmul_ref"]


def dequantize_uniform(
    qweight: torch.Tensor,  # [out, words] int32
    scales: torch.Tensor,  # [out, ngroups] fp16
    zeros: torch.Tensor | None,  # [out, ngroups] fp16, None for symmetric
    perm: torch.Tensor | None,  # [in] int32, stored column j is original column perm[j]
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    levels: torch.Tensor | None = None,  # [2**bits] fp16: a non-uniform grid (zeros are then None)
) -> torch.Tensor:
    """The dense weight [out, in] in original column order, computed in fp32 and cast to ``dtype``."""
    codes = unpack_codes(qweight, bits, in_features)
    g = in_features if group_size == -1 else group_size
    s = scales.float().repeat_interleave(g, dim=1)[:, :in_features]
    if levels is not None:
        W = s * levels.float()[codes.long()]
        if perm is not None:
            W = torch.empty_like(W).index_copy_(1, perm.long(), W)
        return W.to(dtype)
    codes = codes.float()
    if zeros is None:
        z = torch.tensor(float(2 ** (bits - 1)), device=codes.device)
    else:
        z = zeros.float().repeat_interleave(g, dim=1)[:, :in_features]
    W = s * (codes - z)
    if perm is not None:
        W = torch.empty_like(W).index_copy_(1, perm.long(), W)
    return W.to(dtype)


def uniform_matmul_ref(
    x: torch.Tensor,  # [..., in]
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    W = dequantize_uniform(
        qweight, scales, zeros, perm, bits=bits, group_size=group_size, in_features=x.shape[-1], dtype=x.dtype,
        levels=levels,
    )
    return torch.nn.functional.linear(x, W, bias)
