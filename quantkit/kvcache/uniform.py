"""Asymmetric min/max integer quantization of KV-cache blocks, the KIVI scheme (Liu et al. 2024, "KIVI: A
Tuning-Free Asymmetric 2bit Quantization for KV Cache").

A group of values ``x`` gets ``scale s = (max − min) / (2^b − 1)`` and ``zero z = min`` (both stored as fp16) and
codes ``q = clamp(round((x − z) / s), 0, 2^b − 1)``; it reads back as ``x̂ = q·s + z``. Codes are computed from the
fp16-rounded ``s`` and ``z``, so ``|x − x̂| ≤ s/2`` for every element inside the group's range (up to fp16 rounding
of ``z + (2^b − 1)s`` at the top of the range). A constant group has ``s = 0`` and reads back as ``z``.

Keys are quantized per channel, in groups of ``G`` consecutive tokens (outlier channels in keys are persistent
across tokens, so per-channel statistics isolate them); values per token, in groups of ``g`` consecutive channels
(value errors mix over tokens through the attention weights, so per-token statistics bound each row's error).
"""

from __future__ import annotations

import torch

from quantkit.kvcache.packing import pack_uint8, unpack_uint8

__all__ = ["dequantize_keys", "dequantize_values", "minmax_dequantize", "minmax_quantize", "quantize_keys",
           "quantize_values"]


def minmax_quantize(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Groups are the slices of ``x`` along ``dim``. Returns ``codes`` (uint8, shaped as ``x``) and ``scale``,
    ``zero`` (fp16, ``x``'s shape with ``dim`` kept at size 1)."""
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).to(torch.float16)
    zero = lo.to(torch.float16)
    s, z = scale.float(), zero.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round((xf - z) / safe).clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, zero


def minmax_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``codes · scale + zero`` in float32 (``scale``/``zero`` broadcast over their group's dimension)."""
    return codes.float() * scale.float() + zero.float()


def quantize_keys(K: torch.Tensor, bits: int, G: int) -> dict[str, torch.Tensor]:
    """``K`` [B, H, n, D] with ``n`` a multiple of ``G`` -> ``codes`` uint8 [B, H, n, packed D], ``scale`` and
    ``zero`` fp16 [B, H, n/G, D] (one per channel and token group)."""
    B, H, n, D = K.shape
    codes, scale, zero = minmax_quantize(K.reshape(B, H, n // G, G, D), bits, dim=3)
    return {"codes": pack_uint8(codes.reshape(B, H, n, D), bits), "scale": scale.squeeze(3),
            "zero": zero.squeeze(3)}


def dequantize_keys(t: dict[str, torch.Tensor], bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`quantize_keys`: float32 [B, H, n, D]."""
    codes = unpack_uint8(t["codes"], bits, D)
    B, H, n, _ = codes.shape
    ng = t["scale"].shape[2]
    x = minmax_dequantize(codes.reshape(B, H, ng, n // max(ng, 1), D), t["scale"].unsqueeze(3),
                          t["zero"].unsqueeze(3))
    return x.reshape(B, H, n, D)


def quantize_values(V: torch.Tensor, bits: int, g: int) -> dict[str, torch.Tensor]:
    """``V`` [B, H, n, D] with ``D`` a multiple of ``g`` -> ``codes`` uint8 [B, H, n, packed D], ``scale`` and
    ``zero`` fp16 [B, H, n, D/g] (one per token and channel group)."""
    B, H, n, D = V.shape
    codes, scale, zero = minmax_quantize(V.reshape(B, H, n, D // g, g), bits, dim=4)
    return {"codes": pack_uint8(codes.reshape(B, H, n, D), bits), "scale": scale.squeeze(4),
            "zero": zero.squeeze(4)}


def dequantize_values(t: dict[str, torch.Tensor], bits: int, D: int) -> torch.Tensor:
    """Inverse of :func:`quantize_values`: float32 [B, H, n, D]."""
    codes = unpack_uint8(t["codes"], bits, D)
    B, H, n, _ = codes.shape
    ng = t["scale"].shape[3]
    x = minmax_dequantize(codes.reshape(B, H, n, ng, D // ng), t["scale"].unsqueeze(4), t["zero"].unsqueeze(4))
    return x.reshape(B, H, n, D)
