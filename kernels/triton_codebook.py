"""Lookup-table matmul kernels for the vector-codebook format ``quantkit-vq`` (VPTQ, Liu et al. 2024) and the
additive-codebook format ``quantkit-aq`` (AQLM, Egiazarian et al. 2024, whose inference kernels gather codewords the
same way).

``y = x @ W.T (+ bias)`` with ``W[n, perm[j]] = scales[n] * codebook[code[n, j // dim], j % dim]``: the codes are
``log2(entries)``-bit indices in a little-endian bit stream per row (``quantkit.formats.packing.pack_bits``; a
width that does not divide 32 lets a code straddle two words), ``codebook`` is fp16 [entries, dim]. With ``T``
additive tables (``quantkit-aq``: codes [T, out, words], codebooks [T, entries, dim]) the codeword is the fp32 sum
``Σ_t codebook[t, code[t, n, v]]``, tables added in order, as the format's reference sums them; ``T`` is a
compile-time constant (an unrolled loop over the tables after the first), so one table compiles to the vq kernel.

Two paths, picked by the number of rows ``M`` of ``x``:

- **GEMV** (``M <= GEMV_MAX_M``, decoding): one program per ``BLOCK_N`` outputs and K split. Per tile it decodes
  ``BLOCK_V`` codes per row from the bit stream (whole words fanned out by shifts when the width divides 32, else
  each code's word and, when it straddles, the next one), gathers the codewords from the codebook with ordinary
  global loads, gathers the matching columns of ``x`` through ``perm`` (act-order), and accumulates ``x · codeword``
  in fp32; the row scale multiplies the sum once, at the end. Triton has no explicit shared-memory gather: the
  codebook (256 × 4 fp16 = 2 KiB for the 2-bit preset, 1 MiB at 2^16 × 8) is read by every program and stays in
  L1/L2, which is what a shared-memory table would buy. With ``SPLIT_K > 1`` the K tiles are dealt out round-robin
  and the splits add their (scaled) partial sums into the output atomically, as ``triton_uniform`` does; not in
  bf16, whose partial sums would be rounded to 8 mantissa bits.
- **Dequantize, then GEMM** (prefill): a kernel writes the dense weight [out, in] in ``x.dtype`` (the same fp32
  product, rounded once, that the reference dequantization gives), then ``x @ W.T`` runs in PyTorch (cuBLAS). With
  act-order the weight is written in stored column order and the activations are gathered into that order instead
  (``x[:, perm] @ W_stored.T``): writing it in original order scatters every store (an 11008 x 4096 weight at 16
  rows on an H200: 2,208 µs scattered, 115.8 µs in stored order, 35 µs for fp16 cuBLAS). For long inputs the GEMM
  dominates and the dense weight costs one write.

``dim`` (2 to 8), ``bits`` (2 to 16) and the number of tables are compile-time constants; a ``dim`` that is not a
power of two is padded to the next one inside the tile (masked lanes). Importing this module imports Triton;
``quantkit.kernels.ops`` guards that import and registers the op ``quantkit::codebook_matmul`` with the dispatch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from quantkit.formats.packing import packed_words

__all__ = ["GEMV_MAX_M", "SUPPORTED_DTYPES", "is_interpreted", "triton_codebook_dequantize", "triton_codebook_matmul"]

GEMV_MAX_M = 8
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _decode_codes(codes_ptr, offs_v, offs_n, N, stride_cn, V: tl.constexpr, BITS: tl.constexpr):
    """Codes of vectors ``offs_v`` of rows ``offs_n`` (broadcastable index tensors; the result has their broadcast
    shape) as int32 in ``[0, 2**BITS)``: code ``v`` occupies bits ``[v·BITS, (v+1)·BITS)`` of its row's stream.
    A code whose bits cross a word boundary takes its high bits from the next word (a second load, only emitted
    for widths that do not divide 32). Out-of-range positions decode to 0, a valid index."""
    mask = (offs_v < V) & (offs_n < N)
    row = codes_ptr + offs_n.to(tl.int64) * stride_cn
    bit = offs_v * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.uint32)
    # Unsigned words: an arithmetic shift would smear the sign bit into a code at the top of a word.
    lo = tl.load(row + word, mask=mask, other=0).to(tl.uint32, bitcast=True)
    codes = lo >> shift
    if 32 % BITS != 0:
        straddles = shift + BITS > 32
        hi = tl.load(row + word + 1, mask=mask & straddles, other=0).to(tl.uint32, bitcast=True)
        codes = codes | (hi << ((32 - shift) % 32))
    return (codes & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _gemv_codes(codes_ptr, v0, offs_n, N, stride_cn, V: tl.constexpr, BITS: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Codes of vectors ``v0 .. v0 + BLOCK_V`` (``v0`` a multiple of BLOCK_V) of rows ``offs_n``: [BLOCK_V, BLOCK_N].
    When the width divides 32 and a tile holds whole words, each word is loaded once and fanned out into its
    ``32 // BITS`` codes by shifts (registers of the thread that loaded it); otherwise ``_decode_codes``."""
    RUN: tl.constexpr = 32 // BITS
    if 32 % BITS == 0 and BLOCK_V % RUN == 0:
        n_words = (V * BITS + 31) // 32
        offs_w = v0 // RUN + tl.arange(0, BLOCK_V // RUN)
        row = codes_ptr + offs_n[None, :].to(tl.int64) * stride_cn
        words = tl.load(row + offs_w[:, None], mask=(offs_w[:, None] < n_words) & (offs_n[None, :] < N), other=0)
        shifts = (tl.arange(0, RUN) * BITS).to(tl.uint32)
        codes = words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]
        codes = tl.reshape(codes & ((1 << BITS) - 1), (BLOCK_V, BLOCK_N)).to(tl.int32)
    else:
        offs_v = v0 + tl.arange(0, BLOCK_V)
        codes = _decode_codes(codes_ptr, offs_v[:, None], offs_n[None, :], N, stride_cn, V, BITS)
    return codes


@triton.jit
def _gemv_kernel(
    x_ptr, codes_ptr, codebook_ptr, scales_ptr, perm_ptr, bias_ptr, out_ptr,
    M, N, stride_xm, stride_cn, stride_sn, stride_om, stride_ct, stride_bt,
    K: tl.constexpr, DIM: tl.constexpr, BITS: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, SPLIT_K: tl.constexpr,
    TABLES: tl.constexpr = 1,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    V: tl.constexpr = K // DIM
    DIM_P: tl.constexpr = 2 if DIM <= 2 else (4 if DIM <= 4 else 8)  # lanes per vector; DIM_P - DIM masked
    BLOCK_KP: tl.constexpr = BLOCK_V * DIM_P
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Lane f of a tile is component f % DIM_P of its vector f // DIM_P (the order the codeword gather produces).
    lane = tl.arange(0, BLOCK_KP)
    lane_v, lane_j = lane // DIM_P, lane % DIM_P
    comp = tl.arange(0, DIM_P)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Split pid_k takes vector tiles pid_k, pid_k + SPLIT_K, ... (loop bounds independent of the program id, as the
    # interpreter needs); a split whose last tile lies past V sees it fully masked.
    for t0 in range(0, V, BLOCK_V * SPLIT_K):
        v0 = t0 + pid_k * BLOCK_V
        # Activations: stored column k = v·DIM + j is original column perm[k].
        offs_v = v0 + lane_v
        valid = (offs_v < V) & (lane_j < DIM)
        k = offs_v * DIM + lane_j
        if HAS_PERM:
            col = tl.load(perm_ptr + k, mask=valid, other=0).to(tl.int32)
        else:
            col = k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + col[None, :], mask=(offs_m[:, None] < M) & valid[None, :],
                    other=0.0).to(tl.float32)
        # Weights: decode the codes, gather their codewords (cache-resident table) as [BLOCK_V, DIM_P, BLOCK_N];
        # additive tables after the first (code stream t at codes_ptr + t·stride_ct, table t at
        # codebook_ptr + t·stride_bt) add theirs in fp32. One table: no loop, the vq kernel as it was.
        codes = _gemv_codes(codes_ptr, v0, offs_n, N, stride_cn, V, BITS, BLOCK_V, BLOCK_N)
        cw = tl.load(codebook_ptr + codes[:, None, :] * DIM + comp[None, :, None],
                     mask=(comp < DIM)[None, :, None], other=0.0).to(tl.float32)
        for t in tl.static_range(1, TABLES):
            codes = _gemv_codes(codes_ptr + t * stride_ct, v0, offs_n, N, stride_cn, V, BITS, BLOCK_V, BLOCK_N)
            cw += tl.load(codebook_ptr + t * stride_bt + codes[:, None, :] * DIM + comp[None, :, None],
                          mask=(comp < DIM)[None, :, None], other=0.0).to(tl.float32)
        w = tl.reshape(cw, (BLOCK_KP, BLOCK_N))
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    scale = tl.load(scales_ptr + offs_n * stride_sn, mask=offs_n < N, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=(offs_n < N) & (pid_k == 0), other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequant_kernel(
    codes_ptr, codebook_ptr, scales_ptr, perm_ptr, w_ptr,
    N, stride_cn, stride_sn, stride_wn, stride_ct, stride_bt,
    K: tl.constexpr, DIM: tl.constexpr, BITS: tl.constexpr, HAS_PERM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, TABLES: tl.constexpr = 1,
):
    """``W[n, perm[k]] = scales[n] · codebook[code[n, k // DIM], k % DIM]`` for a [BLOCK_N, BLOCK_V·DIM] tile, in
    ``w_ptr``'s dtype: the fp32 product rounded once, as the reference dequantization cast to ``x.dtype``. With
    ``TABLES`` additive tables the codeword is their fp32 sum, added in table order as the reference does."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    V: tl.constexpr = K // DIM
    DIM_P: tl.constexpr = 2 if DIM <= 2 else (4 if DIM <= 4 else 8)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    comp = tl.arange(0, DIM_P)
    codes = _decode_codes(codes_ptr, offs_v[None, :], offs_n[:, None], N, stride_cn, V, BITS)  # [BLOCK_N, BLOCK_V]
    cw = tl.load(codebook_ptr + codes[:, :, None] * DIM + comp[None, None, :], mask=(comp < DIM)[None, None, :],
                 other=0.0).to(tl.float32)
    for t in tl.static_range(1, TABLES):
        codes = _decode_codes(codes_ptr + t * stride_ct, offs_v[None, :], offs_n[:, None], N, stride_cn, V, BITS)
        cw += tl.load(codebook_ptr + t * stride_bt + codes[:, :, None] * DIM + comp[None, None, :],
                      mask=(comp < DIM)[None, None, :], other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + offs_n * stride_sn, mask=offs_n < N, other=0.0).to(tl.float32)
    w = tl.reshape(cw * scale[:, None, None], (BLOCK_N, BLOCK_V * DIM_P))
    lane = tl.arange(0, BLOCK_V * DIM_P)
    lane_v = pid_v * BLOCK_V + lane // DIM_P
    lane_j = lane % DIM_P
    valid = (lane_v < V) & (lane_j < DIM)
    k = lane_v * DIM + lane_j
    if HAS_PERM:
        col = tl.load(perm_ptr + k, mask=valid, other=0).to(tl.int32)
    else:
        col = k
    ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + col[None, :]
    tl.store(ptrs, w.to(w_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & valid[None, :])


# --- launch configurations -------------------------------------------------------------------------------------

def is_interpreted() -> bool:
    """True when the kernels were compiled for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_gemv_kernel, triton.runtime.JITFunction)


def _zero_output(nargs: dict[str, Any]) -> None:
    nargs["out_ptr"].zero_()


def _gemv_config(block_n: int, block_v: int, split_k: int, num_warps: int = 4) -> triton.Config:
    # Split-K accumulates with atomics, so the output must start at zero; the hook also runs inside autotuning.
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "SPLIT_K": split_k}, num_warps=num_warps,
                         pre_hook=_zero_output if split_k > 1 else None)


def _gemv_configs(allow_split_k: bool) -> list[triton.Config]:
    if is_interpreted():
        # The interpreter cannot time configs (and is slow): one config, with a split-K launch and a vector tile
        # (16) that leaves a partial last tile on the tests' shapes.
        return [_gemv_config(32, 16, 2 if allow_split_k else 1)]
    splits = (1, 2, 4, 8) if allow_split_k else (1,)
    return [_gemv_config(bn, bv, sk) for bn, bv in ((16, 64), (32, 32), (32, 64), (64, 16), (64, 32), (128, 16))
            for sk in splits]


def _prune_gemv(configs: list[triton.Config], nargs: dict[str, Any], **meta: Any) -> list[triton.Config]:
    # The broadcast product is BLOCK_M x BLOCK_V·DIM_P x BLOCK_N fp32 values in registers; cap it to avoid spills.
    # Additive tables hold a second codeword tile while they sum: half the cap (sm_90 ptxas: 2 or 3 tables of d = 8
    # spill at 16,384 values a tile, not at 8,192).
    dim_p = triton.next_power_of_2(meta["DIM"])
    cap = 16384 if meta.get("TABLES", 1) == 1 else 8192
    keep = [c for c in configs if meta["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] * dim_p <= cap]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"])]


def dequant_block(dim: int) -> tuple[int, int]:
    """``(BLOCK_N, BLOCK_V)`` of the dequantize kernel: 32 rows by about 128 columns (a fixed, store-bound tile)."""
    return (8, 8) if is_interpreted() else (32, max(16, 128 // triton.next_power_of_2(dim)))


@functools.cache
def _tuned_gemv(allow_split_k: bool) -> Any:
    # Built on first use, not at import: the config list depends on interpreter mode.
    return triton.autotune(
        configs=_gemv_configs(allow_split_k),
        key=["N", "K", "DIM", "BITS", "HAS_PERM", "BLOCK_M", "TABLES"],
        prune_configs_by={"early_config_prune": _prune_gemv},
    )(_gemv_kernel)


# --- launchers -------------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, scales: torch.Tensor,
           perm: torch.Tensor | None, bias: torch.Tensor | None, dim: int, bits: int) -> None:
    K, N = x.shape[-1], codes.shape[-2] if codes.dim() >= 2 else 0
    if not 2 <= dim <= 8:
        raise ValueError(f"unsupported vector dimension {dim}; 2 to 8")
    if not 2 <= bits <= 16:
        raise ValueError(f"unsupported code width {bits}; 2 to 16 bits")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"activations must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if K % dim:
        raise ValueError(f"vectors of {dim} do not tile {K} input columns")
    if (codes.dtype != torch.int32 or codes.dim() not in (2, 3) or codes.shape[-1] != packed_words(K // dim, bits)
            or codes.dim() == 3 and codes.shape[0] == 0):
        raise ValueError(f"codes {tuple(codes.shape)} {codes.dtype} do not hold {K // dim} {bits}-bit codes per row")
    expected = (2**bits, dim) if codes.dim() == 2 else (codes.shape[0], 2**bits, dim)  # one table, or one per stream
    if tuple(codebook.shape) != expected:
        raise ValueError(f"codebook has shape {tuple(codebook.shape)}, expected {expected}")
    if tuple(scales.shape) != (N, 1):
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected {(N, 1)}")
    if perm is not None and tuple(perm.shape) != (K,):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, expected {(K,)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected {(N,)}")


def _check_device(x: torch.Tensor) -> None:
    if not (x.is_cuda or is_interpreted()):
        raise RuntimeError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before Triton loads)")


def _tables(codes: torch.Tensor, codebook: torch.Tensor) -> tuple[int, int, int]:
    """``(tables, stride_ct, stride_bt)``: the number of additive tables and the element strides between their
    code streams and their codebooks (unused with one table; contiguous inputs)."""
    if codes.dim() == 2:
        return 1, 0, 0
    return codes.shape[0], codes.stride(0), codebook.stride(0)


def triton_codebook_dequantize(
    codes: torch.Tensor,  # [out, packed_words(in / dim, bits)] int32, or [tables, out, words] (quantkit-aq)
    codebook: torch.Tensor,  # [2**bits, dim] fp16, or [tables, 2**bits, dim]
    scales: torch.Tensor,  # [out, 1] fp16
    perm: torch.Tensor | None,  # [in] int16/int32: stored column j is original column perm[j]
    *,
    in_features: int,
    dim: int,
    bits: int,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The dense weight [out, in] in ``dtype`` and original column order, as ``VQFormat.dequantize`` (or
    ``AQFormat.dequantize`` for stacked tables) cast to it."""
    N = codes.shape[-2] if codes.dim() >= 2 else 0
    _check(torch.empty(0, in_features, dtype=dtype, device="meta"), codes, codebook, scales, perm, None, dim, bits)
    _check_device(codes)
    # Without perm every column is written; with it too (a permutation), so no zero-fill is needed.
    W = torch.empty(N, in_features, dtype=dtype, device=codes.device)
    if N == 0 or in_features == 0:
        return W
    block_n, block_v = dequant_block(dim)
    codes, codebook, scales = codes.contiguous(), codebook.contiguous(), scales.contiguous()
    perm = perm.contiguous() if perm is not None else None
    tables, stride_ct, stride_bt = _tables(codes, codebook)
    grid = (triton.cdiv(N, block_n), triton.cdiv(in_features // dim, block_v))
    _dequant_kernel[grid](codes, codebook, scales, perm, W, N, codes.stride(-2), scales.stride(0), W.stride(0),
                          stride_ct, stride_bt, K=in_features, DIM=dim, BITS=bits, HAS_PERM=perm is not None,
                          BLOCK_N=block_n, BLOCK_V=block_v, TABLES=tables)
    return W


def triton_codebook_matmul(
    x: torch.Tensor,  # [..., in] fp16 / bf16 / fp32
    codes: torch.Tensor,  # [out, packed_words(in / dim, bits)] int32, or [tables, out, words] (quantkit-aq)
    codebook: torch.Tensor,  # [2**bits, dim] fp16, or [tables, 2**bits, dim]
    scales: torch.Tensor,  # [out, 1] fp16
    perm: torch.Tensor | None,  # [in]: stored column j is original column perm[j]
    bias: torch.Tensor | None,  # [out]
    *,
    dim: int,
    bits: int,
    config: dict[str, int] | None = None,
    gemv_max_m: int = GEMV_MAX_M,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in the activation dtype; ``[..., out]``. Inputs of at most ``gemv_max_m`` rows take the
    GEMV (fp32 accumulation), longer ones dequantize-then-GEMM. ``config`` pins the GEMV's ``BLOCK_N``, ``BLOCK_V``
    and ``SPLIT_K`` instead of autotuning (tests cover several tilings with it).

    Runs on CUDA tensors, or on CPU tensors when Triton is in interpreter mode."""
    if not 0 <= gemv_max_m <= GEMV_MAX_M:
        raise ValueError(f"gemv_max_m must be between 0 and {GEMV_MAX_M}, got {gemv_max_m}")
    _check(x, codes, codebook, scales, perm, bias, dim, bits)
    _check_device(x)
    K, N = x.shape[-1], codes.shape[-2]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M > gemv_max_m:
        # The weight in stored column order (coalesced stores; writing it in original order scatters every store
        # through perm) against the activations gathered into stored order: x[:, perm] @ W_stored.T = x @ W.T.
        W = triton_codebook_dequantize(codes, codebook, scales, None, in_features=K, dim=dim, bits=bits,
                                       dtype=x.dtype)
        if perm is not None:
            x = x.index_select(-1, perm.to(device=x.device, dtype=torch.long))
        return torch.nn.functional.linear(x, W, bias)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    x2 = x2.contiguous()
    codes, codebook, scales = codes.contiguous(), codebook.contiguous(), scales.contiguous()
    perm = perm.contiguous() if perm is not None else None
    # No split-K in bf16: each partial sum would be rounded to 8 mantissa bits (and bf16 atomics need sm_90).
    allow_split_k = x.dtype != torch.bfloat16
    kernel = _gemv_kernel if config is not None else _tuned_gemv(allow_split_k)
    if config is not None and config["SPLIT_K"] > 1:
        if not allow_split_k:
            raise ValueError("split-K accumulates in the output dtype and is not used with bfloat16")
        out.zero_()  # what the autotuned configs' pre_hook does

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]

    tables, stride_ct, stride_bt = _tables(codes, codebook)
    kernel[grid](x2, codes, codebook, scales, perm, bias, out, M, N, x2.stride(0), codes.stride(-2), scales.stride(0),
                 out.stride(0), stride_ct, stride_bt, K=K, DIM=dim, BITS=bits, HAS_PERM=perm is not None,
                 HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(M), TABLES=tables, **(config or {}))
    return out.reshape(*x.shape[:-1], N)
