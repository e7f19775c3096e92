"""Byte packing of small integer codes for the KV cache.

A row of ``n`` codes of ``bits`` bits (``bits`` in 1, 2, 4, 8) is stored as ``ceil(n * bits / 8)`` uint8 bytes:
code ``i`` sits in byte ``i // (8 // bits)`` at bit offset ``(i % (8 // bits)) * bits`` (little-endian within the
byte). A last partial byte is zero-padded. Eight bits is the identity (a uint8 copy).
"""

from __future__ import annotations

import torch

__all__ = ["PACK_BITS", "pack_uint8", "packed_bytes", "unpack_uint8"]

PACK_BITS = (1, 2, 4, 8)


def _check(bits: int) -> int:
    if bits not in PACK_BITS:
        raise ValueError(f"unsupported code width {bits}; supported: {PACK_BITS}")
    return 8 // bits


def packed_bytes(n: int, bits: int) -> int:
    """Bytes that hold ``n`` codes of ``bits`` bits."""
    per = _check(bits)
    return (n + per - 1) // per


def pack_uint8(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` [..., n] (integers in ``[0, 2**bits)``) -> uint8 [..., packed_bytes(n, bits)]."""
    per = _check(bits)
    n = codes.shape[-1]
    c = codes.to(torch.uint8)
    if per == 1:
        return c.contiguous()
    pad = (-n) % per
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=c.device)
    # Bit ranges of the ``per`` codes never overlap, so the sum is an OR (and stays below 256).
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack_uint8(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint8`: uint8 [..., packed_bytes(n, bits)] -> codes [..., n] as uint8."""
    per = _check(bits)
    if packed.shape[-1] != packed_bytes(n, bits):
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold exactly {n} codes of {bits} bits")
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :n]
