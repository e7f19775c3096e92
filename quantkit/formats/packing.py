"""Bit packing of integer codes into int32 words.

Each row of codes is stored as a little-endian bit stream: value ``i`` of a row occupies bits
``[i * bits, (i + 1) * bits)`` of the stream, and the stream is cut into 32-bit words (the last one
zero-padded). For 2, 4 and 8 bits no value straddles a word; for 3 bits, 32 values fill exactly three
words (the layout GPTQ uses), with values 10 and 21 of each such run crossing a word boundary.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORTED_BITS", "pack_bits", "packed_words", "pack_codes", "unpack_bits", "unpack_codes"]

SUPPORTED_BITS = (2, 3, 4, 8)


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    return (n * bits + 31) // 32


def _positions(n: int, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.arange(n, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``codes`` [..., n] (integers in ``[0, 2**bits)``) into int32 words [..., packed_words(n, bits)]."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    return _pack(codes, bits)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`pack_codes` for any width from 1 to 16 bits (codebook indices), the same little-endian bit stream."""
    if not 1 <= bits <= 16:
        raise ValueError(f"unsupported bit width {bits}; 1 to 16")
    return _pack(codes, bits)


def unpack_bits(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: codes [..., n] as int64."""
    if bits in SUPPORTED_BITS:
        return unpack_codes(words, bits, n, torch.int64)
    if not 1 <= bits <= 16:
        raise ValueError(f"unsupported bit width {bits}; 1 to 16")
    lead, nw = words.shape[:-1], words.shape[-1]
    if nw != packed_words(n, bits):
        raise ValueError(f"{nw} words cannot hold exactly {n} codes of {bits} bits")
    w = torch.nn.functional.pad(words.reshape(-1, nw).to(torch.int64) & 0xFFFFFFFF, (0, 1))
    word, offset = _positions(n, bits, w.device)
    codes = ((w[:, word] >> offset) | (w[:, word + 1] << (32 - offset))) & (2**bits - 1)
    return codes.reshape(*lead, n)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    lead, n = codes.shape[:-1], codes.shape[-1]
    c = codes.reshape(-1, n).to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    word, offset = _positions(n, bits, c.device)
    nwords = packed_words(n, bits)
    # One extra word absorbs the high part of a straddling last value; bit ranges never overlap, so a sum is an OR.
    acc = torch.zeros(c.shape[0], nwords + 1, dtype=torch.int64, device=c.device)
    acc.scatter_add_(1, word.expand_as(c), (c << offset) & 0xFFFFFFFF)
    acc.scatter_add_(1, (word + 1).expand_as(c), c >> (32 - offset))
    words = acc[:, :nwords]
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.reshape(*lead, nwords)


def unpack_codes(words: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 words [..., w] -> codes [..., n] as uint8 (int16 never needed), or as
    ``dtype`` (the reference dequantization takes them straight to float or int64).

    Vectorized over whole words (this is the CPU forward's hot path): for 2, 4 and 8 bits each word fans out into
    ``32 // bits`` codes; for 3 bits each run of three words is read as two overlapping 64-bit windows (bits 0–63
    hold codes 0–20, bits 32–95 codes 21–31). Right shifts are arithmetic, but every code is masked to its low
    ``bits`` bits and never reaches past bit 63 of its window, so the sign never leaks in.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    lead, nw = words.shape[:-1], words.shape[-1]
    if nw != packed_words(n, bits):
        raise ValueError(f"{nw} words cannot hold exactly {n} codes of {bits} bits")
    w = words.reshape(-1, nw)
    mask = 2**bits - 1
    if 32 % bits == 0:
        shifts = torch.arange(0, 32, bits, device=w.device, dtype=torch.int32)
        codes = (w.to(torch.int32).unsqueeze(-1) >> shifts) & mask
    else:  # 3 bits
        w = w.to(torch.int64) & 0xFFFFFFFF
        w = torch.nn.functional.pad(w, (0, -nw % 3)).view(w.shape[0], -1, 3)
        lo = w[..., 0] | (w[..., 1] << 32)  # bits 0..63 of the run
        hi = w[..., 1] | (w[..., 2] << 32)  # bits 32..95
        i = torch.arange(32, device=w.device, dtype=torch.int64)
        codes = torch.cat([lo.unsqueeze(-1) >> (3 * i[:21]), hi.unsqueeze(-1) >> (3 * i[21:] - 32)], dim=-1) & mask
    return codes.reshape(w.shape[0], -1)[:, :n].to(dtype).reshape(*lead, n)
