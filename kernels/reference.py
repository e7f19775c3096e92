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
    out, ngroups = scales.shape
    g = in_features if group_size == -1 else group_size
    pad = ngroups * g - in_features  # the last group is short when in_features is not a multiple of g
    # Work group by group, [out, ngroups, g], so a scale (and zero) broadcasts over its group: no per-weight copies.
    codes = unpack_codes(qweight, bits, in_features, torch.int64 if levels is not None else torch.float32)
    c = torch.nn.functional.pad(codes, (0, pad)).view(out, ngroups, g)
    s = scales.float().unsqueeze(-1)
    if levels is not None:
        W = s * levels.float()[c]
    elif zeros is None:
        W = s * (c - float(2 ** (bits - 1)))
    else:
        W = s * (c - zeros.float().unsqueeze(-1))
    W = W.view(out, ngroups * g)[:, :in_features].contiguous()
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
    # Act-order: permute the activation to stored column order (as the kernels do), not the weight to original
    # order; x[..., perm] @ W_stored.T == x @ W.T, and the activation is the smaller tensor.
    W = dequantize_uniform(
        qweight, scales, zeros, None, bits=bits, group_size=group_size, in_features=x.shape[-1], dtype=x.dtype,
        levels=levels,
    )
    if perm is not None:
        x = x.index_select(-1, perm.long())
    return torch.nn.functional.linear(x, W, bias)
