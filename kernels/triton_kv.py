"""Decode attention over a coupled-quantization KV cache (``quantkit.kvcache``, CQ), reading the packed codes
directly: no dequantized copy of the cache is written.

One query token per sequence (decoding) attends to the ``T`` tokens of a CQ layer's quantized store. Keys and
values are stored per (batch, KV head, token) as ``D/c`` codes of ``c·b`` bits packed little-endian into bytes
(``quantkit.kvcache.packing``), each the index of a centroid of ``c`` channels in the (KV head, channel group)'s
table [H_kv, D/c, 2^(c·b), c] (fp16). Channel ``d`` of a token is ``table[h, d // c, code[d // c], d % c]``.
Keys coded before RoPE (``keys: pre-rope``) get the rotation back inside the kernel, at each token's stored
position: the halves ``k_i`` and ``k_{i + r/2}`` (``i < r/2``, transformers' ``rotate_half`` pairing over the
first ``r`` rotary channels) are gathered apart and turned by ``p θ_i``, times the rope type's attention scaling;
channels from ``r`` on pass through.

The kernel is flash-decoding: program ``(b·H_q + h, s)`` takes token tiles ``s, s + S, …`` of its sequence,
keeps the running maximum ``m``, sum ``l`` and unnormalized output of an online softmax in fp32, and writes the
three per split. :func:`cq_decode_attention` merges the splits into the store's normalized output and its
log-sum-exp, and :func:`merge_attention` folds in the part of the cache held in full precision (the sink and
residual windows, attended in PyTorch), so the result is softmax attention over the whole cache. Query heads
share KV heads in groups (GQA): head ``h`` reads KV head ``h // (H_q / H_kv)``.

Each tile gathers the codes byte per channel (a byte serves ``8 / (c·b)`` groups and ``c`` channels; the
repeats hit the cache) and the centroids with ordinary global loads: the tables (SmolLM2, c·b = 8: 48 KiB per
KV head and kind) stay in L1/L2. Importing this module imports Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["cq_decode_attention", "is_interpreted", "merge_attention"]

# The default split count's target, programs per launch. On an H200 128 programs (the earlier target) and 1,024
# timed the same within 4% (BENCHMARKS.md): each program's dependent gathers, code then centroid, set the time, not
# the number of programs. The tile and warps below were measured at 1,024.
PROGRAMS = 1024
# Default tile and warps: on an H200 (Llama-3-8B heads, CQ 2-bit, 4k and 32k tokens, batch 1 and 8) 64 tokens on
# 4 warps ran 1.18-1.27x faster than on 8, and 32 on 4 or 128 on 8 fell between (BENCHMARKS.md). Pre-RoPE keys
# hold both halves and their angles too: on 4 warps that tile spills (sm_90), so they keep 8.
BLOCK_T = 64
NUM_WARPS = 4
NUM_WARPS_PRE_ROPE = 8


def default_warps(pre_rope: bool) -> int:
    return NUM_WARPS_PRE_ROPE if pre_rope else NUM_WARPS


@triton.jit
def _gather(codes_ptr, table_ptr, offs_t, t_mask, offs_d, d_mask, stride_ct, hk,
            D: tl.constexpr, C: tl.constexpr, CODE_BITS: tl.constexpr, K: tl.constexpr):
    """Channels ``offs_d`` of tokens ``offs_t`` read through their codes: float32 [BLOCK_T, BLOCK_D]."""
    PER: tl.constexpr = 8 // CODE_BITS
    G: tl.constexpr = D // C
    g = offs_d // C
    mask = t_mask[:, None] & d_mask[None, :]
    byte = tl.load(codes_ptr + offs_t[:, None].to(tl.int64) * stride_ct + (g // PER)[None, :], mask=mask, other=0)
    code = (byte.to(tl.int32) >> ((g % PER) * CODE_BITS)[None, :]) & (K - 1)
    entry = ((hk * G + g)[None, :] * K + code) * C + (offs_d % C)[None, :]
    return tl.load(table_ptr + entry, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _cq_decode_attention_kernel(
    q_ptr, kc_ptr, vc_ptr, kt_ptr, vt_ptr, pos_ptr, inv_freq_ptr, acc_ptr, m_ptr, l_ptr,
    T, sm_scale, rope_scale,
    stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, stride_pb,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, C: tl.constexpr, CODE_BITS: tl.constexpr,
    PRE_ROPE: tl.constexpr, ROT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr,
    HALF_P: tl.constexpr = 1, PASS_P: tl.constexpr = 1,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HQ
    h = bh % HQ
    hk = h // (HQ // HKV)
    K: tl.constexpr = 1 << CODE_BITS
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    kc = kc_ptr + b.to(tl.int64) * stride_cb + hk * stride_ch
    vc = vc_ptr + b.to(tl.int64) * stride_cb + hk * stride_ch
    if PRE_ROPE:
        # The rotation pairs channel i with i + ROT/2 (i < ROT/2): the halves are gathered apart and turned
        # together; channels from ROT on (partial rotary) pass through.
        HALF: tl.constexpr = ROT // 2
        PASS: tl.constexpr = D - ROT
        offs_h = tl.arange(0, HALF_P)
        h_mask = offs_h < HALF
        q_base = q_ptr + b * stride_qb + h * stride_qh
        q1 = tl.load(q_base + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        q2 = tl.load(q_base + HALF + offs_h, mask=h_mask, other=0.0).to(tl.float32)
        inv_freq = tl.load(inv_freq_ptr + offs_h, mask=h_mask, other=0.0)
        offs_p = ROT + tl.arange(0, PASS_P)
        p_mask = offs_p < D
        q3 = tl.load(q_base + offs_p, mask=p_mask, other=0.0).to(tl.float32)
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Split s takes tiles s, s + SPLITS, ... while they start below T (a while loop: T is a runtime value, so one
    # compiled kernel serves every cache length, and the interpreter cannot run a for loop over it). A split
    # with no tile writes m = -inf, l = 0 and is weighted out by the merge; the guard below keeps a split's
    # exponentials finite should its maximum still be -inf.
    t0 = split * BLOCK_T
    while t0 < T:
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        if PRE_ROPE:
            k1 = _gather(kc, kt_ptr, offs_t, t_mask, offs_h, h_mask, stride_ct, hk, D, C, CODE_BITS, K)
            k2 = _gather(kc, kt_ptr, offs_t, t_mask, HALF + offs_h, h_mask, stride_ct, hk, D, C, CODE_BITS, K)
            pos = tl.load(pos_ptr + b * stride_pb + offs_t, mask=t_mask, other=0).to(tl.float32)
            angle = pos[:, None] * inv_freq[None, :]
            cos = tl.cos(angle)
            sin = tl.sin(angle)
            s = tl.sum((k1 * cos - k2 * sin) * q1[None, :] + (k2 * cos + k1 * sin) * q2[None, :], axis=1)
            s = s * rope_scale
            if PASS > 0:
                k3 = _gather(kc, kt_ptr, offs_t, t_mask, offs_p, p_mask, stride_ct, hk, D, C, CODE_BITS, K)
                s += tl.sum(k3 * q3[None, :], axis=1)
        else:
            k = _gather(kc, kt_ptr, offs_t, t_mask, offs_d, d_mask, stride_ct, hk, D, C, CODE_BITS, K)
            s = tl.sum(k * q[None, :], axis=1)
        s = s * sm_scale
        s = tl.where(t_mask, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref)
        v = _gather(vc, vt_ptr, offs_t, t_mask, offs_d, d_mask, stride_ct, hk, D, C, CODE_BITS, K)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
        t0 += BLOCK_T * SPLITS
    out = bh * SPLITS + split
    tl.store(acc_ptr + out * D + offs_d, acc, mask=d_mask)
    tl.store(m_ptr + out, m_i)
    tl.store(l_ptr + out, l_i)


def is_interpreted() -> bool:
    """True when the kernel was compiled for the Triton interpreter (``TRITON_INTERPRET=1`` at import)."""
    return not isinstance(_cq_decode_attention_kernel, triton.runtime.JITFunction)


def cq_decode_attention(q: torch.Tensor, key_codes: torch.Tensor, value_codes: torch.Tensor,
                        key_table: torch.Tensor, value_table: torch.Tensor, *, code_bits: int, sm_scale: float,
                        positions: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
                        rope_scale: float = 1.0, block_t: int = BLOCK_T, splits: int | None = None,
                        num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` [B, H_q, D] (one token per sequence) over a CQ store: ``key_codes``/``value_codes``
    uint8 [B, H_kv, T, packed bytes], tables [H_kv, D/c, 2^code_bits, c]; pre-RoPE keys with ``positions``
    [B, T] and the rotary ``inv_freq`` [r/2]. Returns the store's softmax output [B, H_q, D] (float32) and its
    log-sum-exp [B, H_q] (of the scaled scores), for :func:`merge_attention`. ``splits``: programs per sequence
    and head (default: enough for about ``PROGRAMS`` programs, at most one per tile). The default tile
    (``BLOCK_T`` tokens on ``default_warps(pre_rope)`` warps) compiles without spills for heads of 64 and 128
    channels, pre-RoPE keys included (tests/test_kernel_aot.py)."""
    B, HQ, D = q.shape
    _, HKV, T, _ = key_codes.shape
    _, G, K, C = key_table.shape
    if T == 0:
        raise ValueError("the quantized store is empty")
    if HQ % HKV or G * C != D or K != 1 << code_bits or code_bits not in (1, 2, 4, 8):
        raise ValueError(f"inconsistent shapes: q {tuple(q.shape)}, codes {tuple(key_codes.shape)}, table "
                         f"{tuple(key_table.shape)}, code_bits {code_bits}")
    # One set of strides serves both code tensors (no copy when they are contiguous already).
    key_codes, value_codes, q = key_codes.contiguous(), value_codes.contiguous(), q.contiguous()
    pre_rope = positions is not None
    rot = 2 * inv_freq.numel() if pre_rope else 0
    if pre_rope:
        positions = positions.to(torch.int32).contiguous()
        inv_freq = inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    n_tiles = triton.cdiv(T, block_t)
    splits = max(1, min(splits or triton.cdiv(PROGRAMS, B * HQ), n_tiles))
    acc = torch.empty(B * HQ * splits, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B * HQ * splits, device=q.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    dummy = acc  # an unused pointer argument (no positions / frequencies)
    _cq_decode_attention_kernel[(B * HQ, splits)](
        q, key_codes, value_codes, key_table.contiguous(), value_table.contiguous(),
        positions if pre_rope else dummy, inv_freq if pre_rope else dummy, acc, m, l_sum,
        T, sm_scale, rope_scale,
        q.stride(0), q.stride(1), key_codes.stride(0), key_codes.stride(1), key_codes.stride(2),
        positions.stride(0) if pre_rope else 0,
        HQ=HQ, HKV=HKV, D=D, C=C, CODE_BITS=code_bits, PRE_ROPE=pre_rope,
        ROT=rot, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(D), SPLITS=splits,
        HALF_P=triton.next_power_of_2(max(1, rot // 2)), PASS_P=triton.next_power_of_2(max(1, D - rot)),
        num_warps=num_warps or default_warps(pre_rope), num_stages=1,
    )
    m = m.view(B, HQ, splits)
    m_max = m.max(-1, keepdim=True).values
    w = torch.exp(m - m_max)  # a split with no tile: exp(-inf) = 0
    l_tot = (l_sum.view(B, HQ, splits) * w).sum(-1)
    out = (acc.view(B, HQ, splits, D) * w.unsqueeze(-1)).sum(2) / l_tot.unsqueeze(-1)
    return out, m_max.squeeze(-1) + torch.log(l_tot)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                    ) -> torch.Tensor:
    """Softmax attention over two disjoint sets of keys from each set's normalized output [..., D] and
    log-sum-exp [...]."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
