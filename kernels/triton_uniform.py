"""Fused dequant-matmul Triton kernels for the scalar-grid packed format (``quantkit-uniform`` version 2).

``y = x @ W.T (+ bias)`` where ``W = scale * (code - zero)``, or ``scale * levels[code]`` for a non-uniform grid,
is never written to global memory: each program loads the packed int32 words of its weight tile, unpacks the
codes, applies scales and zeros (or looks the levels up) in registers and accumulates
in fp32 (the layout and the GPTQ-style 3-bit packing are described in ``quantkit.formats.packing``).

Two paths, both autotuned over shape keys:

- **GEMV** (``M <= GEMV_MAX_M``, decoding): one program per ``BLOCK_N`` outputs and K split; the few rows of ``x``
  broadcast against the dequantized tile and reduce in registers. With ``SPLIT_K > 1`` the K tiles are dealt out
  round-robin to the splits, which add their partial sums into the output atomically; that pays when
  ``N / BLOCK_N`` programs alone cannot fill the GPU.
- **GEMM** (prefill): ``BLOCK_M x BLOCK_N`` output tiles, ``tl.dot`` on the dequantized tile cast to the activation
  dtype (the rounding the reference applies when it casts the dense weight).

Act-order: stored column ``j`` is original column ``perm[j]``, so ``y = x[..., perm] @ W_stored.T``; the activation
is permuted once per call and the kernels only ever see contiguous groups in stored order.

With the signs of a Hadamard rotation (``rot_signs``), the GEMV computes the input rotation ``R x`` tile by tile
in the same launch (README, "Fused kernels").

Importing this module imports Triton; ``quantkit.kernels.ops`` guards that import for CPU-only installs, and the
dispatch (``quantkit.kernels.dispatch``) routes a ``QuantizedLinear`` of this format here for CUDA tensors.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from quantkit.formats.packing import SUPPORTED_BITS, packed_words
from quantkit.kernels.triton_hadamard import fwht_rows, triton_rotate

__all__ = ["GEMV_MAX_M", "SUPPORTED_DTYPES", "is_interpreted", "triton_uniform_matmul"]

GEMV_MAX_M = 8
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _unpack_codes(qweight_ptr, k0, offs_n, N, stride_qn, K: tl.constexpr, BITS: tl.constexpr, BLOCK_K: tl.constexpr,
                  RUN: tl.constexpr):
    """Codes of columns ``k0 .. k0 + BLOCK_K`` (``k0`` a multiple of BLOCK_K) of rows ``offs_n``, as
    [BLOCK_K // RUN, RUN, BLOCK_N] uint32: ``RUN`` consecutive codes unpacked from one load unit (a word of
    ``32 // BITS`` codes; for 3 bits a run of 32 codes in three words, or single codes in tiles narrower than a run).
    The run axis comes from shifting one loaded unit, so it stays in the registers of the thread that loaded it.
    Columns past K come out as finite garbage; callers zero them through the scales and the activation."""
    row = qweight_ptr + offs_n[None, :] * stride_qn
    n_mask = offs_n[None, :] < N
    n_words = (K * BITS + 31) // 32
    # Unsigned words: an arithmetic shift would smear the sign bit into a code at the top of a word.
    if 32 % BITS == 0:
        # 2, 4, 8 bits: whole words hold 32 // BITS codes each; load every word once and fan it out.
        offs_w = k0 // RUN + tl.arange(0, BLOCK_K // RUN)
        words = tl.load(row + offs_w[:, None], mask=(offs_w[:, None] < n_words) & n_mask, other=0)
        shifts = (tl.arange(0, RUN) * BITS).to(tl.uint32)
        codes = words.to(tl.uint32, bitcast=True)[:, None, :] >> shifts[None, :, None]
    elif RUN == 32:
        # 3 bits, whole runs: 32 codes fill 3 words. Load each run's three words once, as three [runs, BLOCK_N]
        # slices, and fan them out: a code's low bit lies in word 3i // 32 of its run, and codes 10 and 21 take
        # their high bits from the next word. (Selects on broadcast slices: no per-code loads or addresses.)
        offs_w = (k0 // 32) * 3 + 3 * tl.arange(0, BLOCK_K // 32)
        w0 = tl.load(row + offs_w[:, None], mask=(offs_w[:, None] < n_words) & n_mask, other=0)
        w1 = tl.load(row + offs_w[:, None] + 1, mask=(offs_w[:, None] + 1 < n_words) & n_mask, other=0)
        w2 = tl.load(row + offs_w[:, None] + 2, mask=(offs_w[:, None] + 2 < n_words) & n_mask, other=0)
        w0 = w0.to(tl.uint32, bitcast=True)[:, None, :]
        w1 = w1.to(tl.uint32, bitcast=True)[:, None, :]
        w2 = w2.to(tl.uint32, bitcast=True)[:, None, :]
        bit = tl.arange(0, 32) * 3
        word = (bit // 32)[None, :, None]
        shift = (bit % 32).to(tl.uint32)[None, :, None]
        lo = tl.where(word == 0, w0, tl.where(word == 1, w1, w2)) >> shift
        hi = tl.where(word == 0, w1, w2) << ((32 - shift) % 32)
        codes = tl.where(shift + BITS > 32, lo | hi, lo)
    else:
        # 3 bits, tiles narrower than a run: each code reads its own word (and the next one when it straddles).
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_k[:, None] < K) & n_mask
        bit = offs_k * BITS
        word = bit // 32
        shift = (bit % 32).to(tl.uint32)
        lo = tl.load(row + word[:, None], mask=mask, other=0).to(tl.uint32, bitcast=True)
        straddles = shift + BITS > 32
        hi = tl.load(row + word[:, None] + 1, mask=mask & straddles[:, None], other=0).to(tl.uint32, bitcast=True)
        codes = ((lo >> shift[:, None]) | (hi << ((32 - shift) % 32)[:, None]))[:, None, :]
    return codes & ((1 << BITS) - 1)


@triton.jit
def _dequant_tile(
    qweight_ptr, scales_ptr, zeros_ptr, levels_ptr, k0, offs_n, N, stride_qn, stride_sn,
    K: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LEVELS: tl.constexpr,
    BLOCK_K: tl.constexpr, RUN: tl.constexpr, F16: tl.constexpr,
):
    """The dequantized weight tile ``W[offs_n, k0 : k0 + BLOCK_K].T`` as [BLOCK_K // RUN, RUN, BLOCK_N] (see
    ``_unpack_codes``; reshaping to [BLOCK_K, BLOCK_N] gives columns in order): fp16 with ``F16`` (fp16
    activations) on the uniform grid, else fp32."""
    codes = _unpack_codes(qweight_ptr, k0, offs_n, N, stride_qn, K, BITS, BLOCK_K, RUN)
    # Groups are contiguous runs of stored columns, so k // GROUP_SIZE is column k's group; that also gives the
    # shorter last group (K not a multiple of GROUP_SIZE) its own scale.
    offs_u = k0 + RUN * tl.arange(0, BLOCK_K // RUN)  # first column of each load unit
    if GROUP_SIZE % BLOCK_K == 0 or GROUP_SIZE >= K:
        # The whole tile lies in one group: one scale (and zero) per row. (k0 < K: a split may overhang K.)
        meta = (offs_n * stride_sn + k0 // GROUP_SIZE)[None, None, :]
        mask = (offs_n[None, None, :] < N) & (k0 < K)
    elif GROUP_SIZE % RUN == 0:
        # Each load unit lies in one group: a scale per unit and row, broadcast over the unit's codes.
        meta = offs_n[None, None, :] * stride_sn + (offs_u // GROUP_SIZE)[:, None, None]
        mask = (offs_n[None, None, :] < N) & (offs_u[:, None, None] < K)
    else:
        offs_k = offs_u[:, None] + tl.arange(0, RUN)[None, :]
        meta = offs_n[None, None, :] * stride_sn + (offs_k // GROUP_SIZE)[:, :, None]
        mask = (offs_n[None, None, :] < N) & (offs_k[:, :, None] < K)
    if F16 and not HAS_LEVELS:
        # Decoded in fp16, bit for bit what the fp32 decode cast to fp16 gives, in fewer instructions per weight
        # (no int-to-float conversion, no fp32 round trip): code | 0x6400 is the fp16 number 1024 + code, so
        # (1024 + code) - (1024 + zero) is code - zero exactly (zeros are integers in the format), and one fp16
        # multiply rounds scale * (code - zero) once, as casting the exact fp32 product does.
        h = (codes | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True)
        scale16 = tl.load(scales_ptr + meta, mask=mask, other=0.0).to(tl.float16)
        if HAS_ZEROS:
            zero16 = tl.load(zeros_ptr + meta, mask=mask, other=0.0).to(tl.float16) + 1024.0
        else:
            zero16 = 1024.0 + 2.0 ** (BITS - 1)
        w = (h - zero16) * scale16
    else:
        scale = tl.load(scales_ptr + meta, mask=mask, other=0.0).to(tl.float32)
        if HAS_LEVELS:
            # Non-uniform grid: the 2**BITS-entry level table is a gather from a few cached bytes (L1-resident).
            w = scale * tl.load(levels_ptr + codes).to(tl.float32)
        elif HAS_ZEROS:
            w = scale * (codes.to(tl.float32) - tl.load(zeros_ptr + meta, mask=mask, other=0.0).to(tl.float32))
        else:
            w = scale * (codes.to(tl.float32) - 2.0 ** (BITS - 1))
    return w


@triton.jit
def _rotated_x_tile(
    x_ptr, signs_ptr, offs_m, k_tile, M, stride_xm, rot_scale,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROT_BLOCK: tl.constexpr,
):
    """Columns ``k_tile .. k_tile + BLOCK_K`` of ``R x`` for the rows ``offs_m`` of ``x``: [BLOCK_M, BLOCK_K] fp32,
    with ``R = H D / √ROT_BLOCK`` block-diagonal Sylvester (blocks of ``ROT_BLOCK``, a power of two dividing K).

    A block no wider than the tile is transformed inside the tile. A wider one is ``H = H_outer ⊗ H_tile``
    (Sylvester: ``H[i, j] = (-1)^popcount(i & j)``, and the index splits into high and low bits), so tile ``j`` of
    the block's transform is ``H_tile Σ_j' (-1)^popcount(j & j') (D x)_j'``: the block's other tiles of ``x``
    (a few KB, cache-resident, read by every program) are mixed by signs, then transformed in registers.
    """
    m_mask = offs_m[:, None] < M
    if ROT_BLOCK <= BLOCK_K:
        offs_k = k_tile + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask & (offs_k[None, :] < K),
                    other=0.0).to(tl.float32)
        d = tl.load(signs_ptr + offs_k, mask=offs_k < K, other=0).to(tl.float32)
        rows: tl.constexpr = BLOCK_M * (BLOCK_K // ROT_BLOCK)
        x = tl.reshape(fwht_rows(tl.reshape(x * d[None, :], (rows, ROT_BLOCK)), rows, ROT_BLOCK), (BLOCK_M, BLOCK_K))
    else:
        OUTER: tl.constexpr = ROT_BLOCK // BLOCK_K
        base = (k_tile // ROT_BLOCK) * ROT_BLOCK  # tiles past K (a split's overhang) load nothing but zeros
        j = (k_tile - base) // BLOCK_K
        x = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for jp in range(OUTER):
            offs_k = base + jp * BLOCK_K + tl.arange(0, BLOCK_K)
            v = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask & (offs_k[None, :] < K),
                        other=0.0).to(tl.float32)
            d = tl.load(signs_ptr + offs_k, mask=offs_k < K, other=0).to(tl.float32)
            p = j & jp  # the parity of its set bits is the sign of H_outer[j, jp]
            p = p ^ (p >> 16)
            p = p ^ (p >> 8)
            p = p ^ (p >> 4)
            p = p ^ (p >> 2)
            p = p ^ (p >> 1)
            x += (1.0 - 2.0 * (p & 1).to(tl.float32)) * (v * d[None, :])
        x = fwht_rows(x, BLOCK_M, BLOCK_K)
    return x * rot_scale


@triton.jit
def _gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, levels_ptr, bias_ptr, out_ptr, signs_ptr,
    M, N, stride_xm, stride_qn, stride_sn, stride_om, rot_scale,
    K: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LEVELS: tl.constexpr,
    HAS_BIAS: tl.constexpr, ROT_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # ROT_BLOCK > 0: the weight is stored rotated, W Rᵀ, and the kernel computes R x tile by tile on the fly
    # (_rotated_x_tile) instead of reading a rotated copy of x written by a separate launch.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Codes per load unit of _unpack_codes (the GEMM computes the same).
    RUN: tl.constexpr = 32 // BITS if 32 % BITS == 0 else (32 if BLOCK_K % 32 == 0 else 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Split pid_k takes K tiles pid_k, pid_k + SPLIT_K, ... (loop bounds independent of the program id, as the
    # interpreter needs); a split whose last tile lies past K sees it fully masked.
    for k0 in range(0, K, BLOCK_K * SPLIT_K):
        k_tile = k0 + pid_k * BLOCK_K
        if ROT_BLOCK == 0:
            offs_k = k_tile + tl.arange(0, BLOCK_K)
            x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        else:  # rounded to the activation dtype, as the rotation the reference applies first returns it
            x = _rotated_x_tile(x_ptr, signs_ptr, offs_m, k_tile, M, stride_xm, rot_scale, K, BLOCK_M, BLOCK_K,
                                ROT_BLOCK).to(x_ptr.dtype.element_ty)
        w = _dequant_tile(
            qweight_ptr, scales_ptr, zeros_ptr, levels_ptr, k_tile, offs_n, N, stride_qn, stride_sn,
            K, GROUP_SIZE, BITS, HAS_ZEROS, HAS_LEVELS, BLOCK_K, RUN, x_ptr.dtype.element_ty == tl.float16,
        )
        # Round the weight to the activation dtype as the GEMM path and the reference do, so paths agree.
        w = tl.reshape(w, (BLOCK_K, BLOCK_N)).to(x.dtype).to(tl.float32)
        acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
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
def _gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, levels_ptr, bias_ptr, out_ptr,
    M, N, stride_xm, stride_qn, stride_sn, stride_om, m_bucket,
    K: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_LEVELS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # m_bucket only keys the autotuner (prefill lengths vary call to call; tuning once per power of two is enough).
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m.to(tl.int64)  # long prefills: M * K or M * N (an LM head) can pass 2**31
    RUN: tl.constexpr = 32 // BITS if 32 % BITS == 0 else (32 if BLOCK_K % 32 == 0 else 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        w = _dequant_tile(
            qweight_ptr, scales_ptr, zeros_ptr, levels_ptr, k0, offs_n, N, stride_qn, stride_sn,
            K, GROUP_SIZE, BITS, HAS_ZEROS, HAS_LEVELS, BLOCK_K, RUN, x_ptr.dtype.element_ty == tl.float16,
        )
        w = tl.reshape(w, (BLOCK_K, BLOCK_N))
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# --- launch configurations -------------------------------------------------------------------------------------

def is_interpreted() -> bool:
    """True when the kernels were compiled for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_gemv_kernel, triton.runtime.JITFunction)


def _zero_output(nargs: dict[str, Any]) -> None:
    nargs["out_ptr"].zero_()


def _gemv_config(block_n: int, block_k: int, split_k: int, num_warps: int = 4) -> triton.Config:
    # Split-K accumulates with atomics, so the output must start at zero; the hook also runs inside autotuning.
    return triton.Config(
        {"BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT_K": split_k},
        num_warps=num_warps,
        pre_hook=_zero_output if split_k > 1 else None,
    )


def _gemm_config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=num_warps, num_stages=num_stages
    )


def _gemv_configs(allow_split_k: bool) -> list[triton.Config]:
    if is_interpreted():
        # The interpreter cannot time configs (and is slow): one config, chosen so that the tests see a split-K
        # launch and tiles that span several scale groups (group 32) as well as groups spanning several tiles.
        return [_gemv_config(32, 64, 2 if allow_split_k else 1)]
    splits = (1, 2, 4, 8) if allow_split_k else (1,)
    return [
        _gemv_config(bn, bk, sk)
        for bn, bk in ((16, 256), (32, 128), (32, 256), (64, 64), (64, 128), (128, 64))
        for sk in splits
    ] + [_gemv_config(16, 128, sk) for sk in splits] + [_gemv_config(64, 256, 1, num_warps=8)]


def _gemm_configs() -> list[triton.Config]:
    if is_interpreted():
        return [_gemm_config(16, 32, 64, 4, 1)]  # see _gemv_configs
    return [
        _gemm_config(16, 64, 128, 4, 4),
        _gemm_config(16, 128, 64, 4, 4),
        _gemm_config(32, 64, 128, 4, 4),
        _gemm_config(32, 128, 64, 4, 4),
        _gemm_config(64, 64, 64, 4, 4),
        _gemm_config(64, 128, 64, 4, 3),
        _gemm_config(128, 64, 64, 4, 3),
        _gemm_config(128, 128, 32, 8, 3),
        _gemm_config(128, 256, 64, 8, 3),
    ]


def _prune_gemv(configs: list[triton.Config], nargs: dict[str, Any], **meta: Any) -> list[triton.Config]:
    # The broadcast product is BLOCK_M x BLOCK_K x BLOCK_N fp32 values in registers; cap it to avoid spills.
    keep = [c for c in configs if meta["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 16384]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def _prune_gemm(configs: list[triton.Config], nargs: dict[str, Any], **meta: Any) -> list[triton.Config]:
    # Row tiles much taller than the batch only waste work.
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, nargs["m_bucket"])]
    return keep or configs[:1]


@functools.cache
def _tuned_gemv(allow_split_k: bool) -> Any:
    # Built on first use, not at import: the config list depends on interpreter mode and costs nothing until needed.
    return triton.autotune(
        configs=_gemv_configs(allow_split_k),
        key=["N", "K", "GROUP_SIZE", "BITS", "HAS_ZEROS", "HAS_LEVELS", "BLOCK_M", "ROT_BLOCK"],
        prune_configs_by={"early_config_prune": _prune_gemv},
    )(_gemv_kernel)


@functools.cache
def _tuned_gemm() -> Any:
    return triton.autotune(
        configs=_gemm_configs(),
        key=["m_bucket", "N", "K", "GROUP_SIZE", "BITS", "HAS_ZEROS", "HAS_LEVELS"],
        prune_configs_by={"early_config_prune": _prune_gemm},
    )(_gemm_kernel)


# --- launcher --------------------------------------------------------------------------------------------------

def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int, group_size: int,
           levels: torch.Tensor | None) -> None:
    K, N = x.shape[-1], qweight.shape[0]
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"activations must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if qweight.dtype != torch.int32 or qweight.shape[1] != packed_words(K, bits):
        raise ValueError(f"qweight {tuple(qweight.shape)} {qweight.dtype} does not hold {K} {bits}-bit codes per row")
    g = K if group_size == -1 else group_size
    if g <= 0:
        raise ValueError(f"invalid group size {group_size}")
    ngroups = -(-K // g)
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and tuple(t.shape) != (N, ngroups):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(N, ngroups)}")
    if perm is not None and tuple(perm.shape) != (K,):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, expected {(K,)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected {(N,)}")
    if levels is not None and (tuple(levels.shape) != (2**bits,) or zeros is not None):
        raise ValueError(f"levels must be a table of {2**bits} values, without zeros; got {tuple(levels.shape)}")


def launch_flags(K: int, group_size: int, bits: int, *, zeros: bool, levels: bool, bias: bool) -> dict[str, Any]:
    """The constexprs both kernels take for a layer (``benchmarks.kernel_aot`` builds the same launches)."""
    return {"K": K, "GROUP_SIZE": K if group_size == -1 else group_size, "BITS": bits, "HAS_ZEROS": zeros,
            "HAS_LEVELS": levels, "HAS_BIAS": bias}


def gemm_bucket(M: int) -> int:
    """The GEMM's autotune key for M rows: prefill lengths vary call to call; tuning per power of two is enough."""
    return min(triton.next_power_of_2(M), 256)


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 stays exact, as in torch's default matmul


def triton_uniform_matmul(
    x: torch.Tensor,  # [..., in] fp16 / bf16 / fp32
    qweight: torch.Tensor,  # [out, ceil(in * bits / 32)] int32
    scales: torch.Tensor,  # [out, ngroups] fp16
    zeros: torch.Tensor | None,  # [out, ngroups] fp16, None for symmetric
    perm: torch.Tensor | None,  # [in], stored column j is original column perm[j]
    bias: torch.Tensor | None,  # [out]
    *,
    bits: int,
    group_size: int,
    config: dict[str, int] | None = None,
    levels: torch.Tensor | None = None,  # [2**bits]: a non-uniform grid, W = scale * levels[code]
    rot_signs: torch.Tensor | None = None,  # [in] ±1: the weight is stored as W Rᵀ, R = H D / √rot_block
    rot_block: int = 0,  # the power-of-two Sylvester block of H (block-diagonal when smaller than in)
    gemv_max_m: int = GEMV_MAX_M,  # inputs of at most this many rows take the GEMV, longer ones the GEMM
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` in the activation dtype with fp32 accumulation; ``[..., out]``. With ``rot_signs``,
    ``(R x) @ W.T``: for M <= ``gemv_max_m`` the GEMV computes ``R x`` tile by tile on the fly, in the same launch;
    longer inputs are rotated first by ``triton_rotate`` (one more launch, small next to a GEMM).

    Runs on CUDA tensors, or on CPU tensors when Triton is in interpreter mode. ``config`` pins the block sizes
    (``BLOCK_N``, ``BLOCK_K`` and ``SPLIT_K`` for the GEMV, else ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``) instead of
    autotuning; tests use it to cover several tilings. ``gemv_max_m`` moves the switch between the two paths
    (``benchmarks/kernel_bench.py`` times decode batches on the tensor-core GEMM too, with 0); at most ``GEMV_MAX_M``.
    """
    if not 0 <= gemv_max_m <= GEMV_MAX_M:
        raise ValueError(f"gemv_max_m must be between 0 and {GEMV_MAX_M}, got {gemv_max_m}")
    _check(x, qweight, scales, zeros, perm, bias, bits, group_size, levels)
    if not (x.is_cuda or is_interpreted()):
        raise RuntimeError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before Triton loads)")
    K, N = x.shape[-1], qweight.shape[0]
    if rot_signs is not None:
        _check_rotation(K, rot_signs, rot_block, perm)
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if rot_signs is not None and M > gemv_max_m:
        x2, rot_signs = triton_rotate(x2, rot_signs, rot_block), None
    if perm is not None:
        x2 = x2.index_select(1, perm.to(torch.int32))
    x2 = x2.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0:
        return out.reshape(*x.shape[:-1], N)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    levels = levels.float().contiguous() if levels is not None else None
    # K and the group size are compile-time constants: a model has a handful of each, and constants give static
    # loop bounds and turn k // GROUP_SIZE into a shift. (Also, Triton 3.6's interpreter cannot take a runtime
    # loop bound under numpy >= 2.4: triton-lang/triton#9171.)
    flags = launch_flags(K, group_size, bits, zeros=zeros is not None, levels=levels is not None,
                         bias=bias is not None)
    tensors = (x2, qweight, scales, zeros, levels, bias, out)
    if M <= gemv_max_m:
        _launch_gemv(tensors, flags, config, rot_signs, rot_block)
    else:
        _launch_gemm(tensors, flags, config)
    return out.reshape(*x.shape[:-1], N)


def _launch_gemv(tensors: tuple, flags: dict[str, Any], config: dict[str, int] | None,
                 rot_signs: torch.Tensor | None, rot_block: int) -> None:
    x2, qweight, scales, zeros, levels, bias, out = tensors
    (M, _), N = x2.shape, out.shape[1]
    block_m = triton.next_power_of_2(M)
    # No split-K in bf16: each partial sum would be rounded to 8 mantissa bits (and bf16 atomics need sm_90).
    allow_split_k = x2.dtype != torch.bfloat16
    kernel = _gemv_kernel if config is not None else _tuned_gemv(allow_split_k)
    if config is not None and config["SPLIT_K"] > 1:
        if not allow_split_k:
            raise ValueError("split-K accumulates in the output dtype and is not used with bfloat16")
        out.zero_()  # what the autotuned configs' pre_hook does
    signs = rot_signs.contiguous() if rot_signs is not None else None

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"]

    kernel[grid](x2, qweight, scales, zeros, levels, bias, out, signs, M, N, x2.stride(0), qweight.stride(0),
                 scales.stride(0), out.stride(0), rot_block**-0.5 if signs is not None else 1.0, **flags,
                 ROT_BLOCK=rot_block if signs is not None else 0, BLOCK_M=block_m, **(config or {}))


def _launch_gemm(tensors: tuple, flags: dict[str, Any], config: dict[str, int] | None) -> None:
    x2, qweight, scales, zeros, levels, bias, out = tensors
    (M, _), N = x2.shape, out.shape[1]
    m_bucket, precision = gemm_bucket(M), dot_precision(x2.dtype)
    kernel = _gemm_kernel if config is not None else _tuned_gemm()

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"])

    kernel[grid](x2, qweight, scales, zeros, levels, bias, out, M, N, x2.stride(0), qweight.stride(0),
                 scales.stride(0), out.stride(0), m_bucket, **flags, DOT_PRECISION=precision, **(config or {}))


def _check_rotation(K: int, signs: torch.Tensor, block: int, perm: torch.Tensor | None) -> None:
    if tuple(signs.shape) != (K,):
        raise ValueError(f"rot_signs has shape {tuple(signs.shape)}, expected {(K,)}")
    if block < 1 or block & (block - 1) or K % block or block >= 2**16:
        raise ValueError(f"rot_block must be a power of two below 2**16 dividing {K}, got {block}")
    if perm is not None:
        raise ValueError("a fused rotation needs the weight in rotated column order (no act-order permutation)")
