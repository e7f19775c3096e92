"""CPU kernels for ``quantkit-uniform``: PyTorch's own weight-only int4 and int8 matmuls, the weight repacked once.

Two paths, picked by the number of rows ``M`` of ``x`` (``LARGE_M``, by bits):

- **Decode-sized inputs**: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (tinygemm: 4-bit codes with a scale and a
  float zero per group of 32/64/128/256 columns, weight ``(q - 8) * scale + zero``) or
  ``torch.ops.aten._weight_int8pack_mm`` (int8 codes, one scale per output channel). The weight is repacked for
  them once per module (``_convert_weight_to_int4pack_for_cpu``; ``code - 128`` as int8) and cached on the module
  (``QuantizedLinear.kernel_cache``), rebuilt only when one of the module's tensors is replaced, edited in place or
  moved (``_signature``).
- **Long inputs** (prefill): the dense weight in the stored column order, dequantized from the module's own
  tensors in fp32 exactly as the reference does, then one GEMM: bf16 (the weight rounded once to bf16) where the CPU
  multiplies bf16 natively (AMX or AVX512-BF16, ``NATIVE_BF16``), else fp32 with the output rounded to the
  activations' dtype (without native bf16 a bf16 GEMM is several times slower than fp32: 121 ms against 11.8 ms for
  [1024, 576] x [576, 1536] on a 2-core AVX2 box). From ``LARGE_M`` rows on the dequantization costs less than
  tinygemm's per-row loop.
- **fp32 activations** (default): the same dequantize-then-GEMM in fp32 at every ``M``, the reference's own
  arithmetic bit for bit (a dense weight ``c * s - z * s``, each term and the sum exact), without its copies.

Layout mapping (exact): our weight is ``s * (c - z)`` with fp16 ``s`` and integer ``z`` per group of ``g`` stored
columns. Tinygemm's is ``(c - 8) * s' + z'`` per group of ``g'`` columns, so ``s' = s`` and ``z' = s * (8 - z)``
with ``g'`` the largest of 256/128/64/32 that divides ``g`` (a per-channel scale takes any), in the fewest padded
columns: SmolLM2's 576 columns in groups of 128 (4 full groups and one of 64) become 9 tinygemm groups of 64.
``K`` is padded to a multiple of ``g'`` with zero columns of ``x``. The 8-bit path computes
``y = s * (x @ (c - 128)ᵀ) + s * (128 - z) * Σ_k x_k``. Act-order gathers ``x`` by ``perm`` (stored column ``j`` is
original column ``perm[j]``), as the reference does; an input rotation is applied first (``rotation.apply``).

Precision: on x86 PyTorch vectorizes these kernels for bf16 activations only (fp32 and fp16 take a scalar loop,
slower than the reference), so the kernels compute with bf16 operands and fp32 accumulation. The extra error per
weight (bf16 ``s'`` and ``z'``, at most ``2**-9 * 16 * s``, typically ``s / 200``) is far below the 4-bit rounding
error itself (rms ``s / √12``); the 8-bit path keeps the scale in fp32 (applied to the kernel's output). Against
the bf16 reference the outputs differ by bf16 rounding (tests/test_kernel_cpu.py states the tolerance); the
long-input path is the reference's own bf16 computation, bit for bit.

``QUANTKIT_CPU_KERNELS`` (read on each call) chooses what the kernels serve:

- unset or ``1``: bf16 activations; fp32 activations take the exact fp32 path (``cpu-dequant``): quantkit never
  rounds an fp32 model's activations behind its back (load with ``dtype=torch.bfloat16`` for speed).
- ``bf16``: fp32 activations through the bf16 kernels too (the input rounded to bf16, the output returned in fp32);
  long inputs keep an fp32 GEMM where the CPU lacks native bf16.
- ``0``: none (every CPU call takes the reference), for comparisons.

Served layouts: 4-bit uniform (symmetric or asymmetric) whose group size is a multiple of 32 or per-channel, with
``out_features`` a multiple of 16; 8-bit uniform per-channel; with act-order, bias and input rotations; not when
autograd needs the input's gradient, nor under ``torch.compile`` (the reference traces). Everything else (2 and 3
bits, non-uniform grids, grouped 8-bit, fp16 activations) keeps the reference.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.formats.packing import unpack_codes
from quantkit.quantizers.groups import group_size_of, num_groups

__all__ = ["ENV_VAR", "LARGE_M", "NATIVE_BF16", "CpuPlan", "linear", "plan_for", "register_cpu_kernels", "repack",
           "served_dtypes", "supports"]

ENV_VAR = "QUANTKIT_CPU_KERNELS"
# Rows from which dequantize-then-GEMM beats the weight-only kernels, by bits: measured on SmolLM2's shapes (1536 x
# 576 and 576 x 1536) with 1 and 2 threads on an AVX-512/AMX Xeon, where tinygemm's time grows by ~0.02 ms a row and
# the dequantization costs ~1.2 ms (4 bits) or ~0.8 ms (8 bits) once.
LARGE_M = {4: 96, 8: 64}
TINYGEMM_GROUPS = (256, 128, 64, 32)  # the group sizes _weight_int4pack_mm_for_cpu accepts
_COMPUTE = torch.bfloat16


def _native_bf16() -> bool:
    """PyTorch's own CPU feature probes (``torch.cpu``; older releases had them in ``torch._C._cpu``)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(mod, p, lambda: False)() for mod in (torch.cpu, getattr(torch._C, "_cpu", None))
               if mod is not None for p in probes)


NATIVE_BF16 = _native_bf16()  # the CPU multiplies bf16 in hardware (AMX or AVX512-BF16): long inputs GEMM in bf16
_CACHE_KEY = "cpu"
_PLAN_KEY = "cpu-plan"

# Looked up at call time, so tests can count the repacks.
_convert_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu
_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
_int8_mm = torch.ops.aten._weight_int8pack_mm


def _mode() -> str:
    mode = os.environ.get(ENV_VAR, "1").strip().lower()
    return "0" if mode in ("0", "false", "off", "no") else mode


def served_dtypes() -> tuple[torch.dtype, ...]:
    """The activation dtypes the bf16 kernels (``cpu-int4pack``, ``cpu-int8pack``) serve now, from
    ``QUANTKIT_CPU_KERNELS`` (module docstring)."""
    mode = _mode()
    if mode == "0":
        return ()
    return (torch.bfloat16, torch.float32) if mode == "bf16" else (torch.bfloat16,)


def exact_fp32(x: torch.Tensor) -> bool:
    """fp32 activations in the default mode: the exact fp32 path at every size (``cpu-dequant``)."""
    return x.dtype == torch.float32 and _mode() not in ("0", "bf16")


@dataclass(frozen=True)
class CpuPlan:
    """What the kernels make of one layer's scheme and shape (no tensors)."""

    bits: int  # 4 or 8
    group: int  # the scheme's group size in stored columns (in_features when per-channel)
    ngroups: int
    tiny_group: int  # 4 bits: tinygemm's group size; 8 bits: 0
    k_pad: int  # in_features padded to a multiple of tiny_group (4 bits) or of 16 (8 bits: aligned loads)


def plan_for(module) -> CpuPlan | None:
    """The plan for ``module`` (a ``QuantizedLinear`` of ``quantkit-uniform``), or None where the layout needs the
    reference."""
    q = module.scheme.quantizer
    K, N = module.in_features, module.out_features
    if q.name != "uniform" or q.bits not in (4, 8) or sys.byteorder != "little":  # _codes_u8 reads bytes
        return None
    g, ng = group_size_of(q.group_size, K), num_groups(q.group_size, K)
    if q.bits == 8:
        return CpuPlan(8, g, ng, 0, -(-K // 16) * 16) if ng == 1 else None
    if N % 16:  # tinygemm's repack works on blocks of 16 output channels
        return None
    fits = [t for t in TINYGEMM_GROUPS if ng == 1 or g % t == 0]
    if not fits:
        return None
    tiny = min(fits, key=lambda t: (-(-K // t) * t, -t))  # fewest padded columns, then the largest group
    return CpuPlan(4, g, ng, tiny, -(-K // tiny) * tiny)


def _plan(module) -> CpuPlan | None:
    """:func:`plan_for`, kept on the module (a scheme and shape never change under it)."""
    cache = module.kernel_cache
    if _PLAN_KEY not in cache:
        cache[_PLAN_KEY] = plan_for(module)
    return cache[_PLAN_KEY]


def supports(x: torch.Tensor, module, bits: int | None = None, *, exact: bool = False) -> bool:
    """The dispatch predicate: a layout the kernels take (of ``bits`` bits, if given), a plain CPU tensor of a dtype
    served now (:func:`served_dtypes`; with ``exact``, fp32 activations in the default mode, :func:`exact_fp32`)."""
    plan = _plan(module)
    return (
        plan is not None
        and (bits is None or plan.bits == bits)
        and type(x) is torch.Tensor  # not a FakeTensor or another subclass
        and x.device.type == "cpu"
        and (exact_fp32(x) if exact else x.dtype in served_dtypes() and not exact_fp32(x))
        and x.numel() > 0
        and not (x.requires_grad and torch.is_grad_enabled())  # the aten kernels have no backward
        and module.qweight.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )


def _version(t: torch.Tensor) -> int:
    return -1 if t.is_inference() else t._version


def _signature(module) -> tuple:
    """Identity of the module's stored tensors: a replaced, moved or in-place edited tensor changes it. (Read from
    the module's own dicts: this runs on every call.)"""
    params, buffers = module._parameters, module._buffers
    stored = (params[n] if n in params else buffers[n] for n in module._tensor_names)
    return tuple((t.data_ptr(), _version(t)) for t in stored)


@dataclass
class CpuPack:
    """A module's tensors repacked for the CPU kernels (built once, by :func:`repack`)."""

    signature: tuple
    plan: CpuPlan
    # None when built for the dequantize path only (kernel=False), else 4 bits: tinygemm's uint8 layout
    # [N, k_pad / 2]; 8 bits: int8 codes - 128 [N, k_pad]
    weight: torch.Tensor | None
    scales: torch.Tensor | None  # 4 bits: bf16 [k_pad / tiny_group, N, 2] (s, s * (8 - z)); 8 bits: fp32 [N]
    offset: torch.Tensor | None  # 8 bits asymmetric: fp32 [N], s * (128 - z)
    ones: torch.Tensor | None  # 8 bits: bf16 ones [N], the kernel's scales (ours multiply its output in fp32)
    perm: torch.Tensor | None  # int64 [K]
    s32: torch.Tensor  # fp32 [N, ngroups, 1], for the long-input dequantization
    zs: torch.Tensor  # fp32 [N, ngroups, 1], -z * s


def _zeros(module, plan: CpuPlan, scales: torch.Tensor) -> torch.Tensor:
    t = module.tensors
    if "zeros" in t:
        return t["zeros"].float()
    return torch.full_like(scales, float(2 ** (plan.bits - 1)))


def repack(module, plan: CpuPlan, kernel: bool = True) -> CpuPack:
    """Build the kernels' layout of ``module``'s weight (what :func:`linear` caches); without ``kernel``, only what
    the dequantize path reads."""
    t = module.tensors
    K, N = module.in_features, module.out_features
    s = t["scales"].float()  # [N, ngroups]
    z = _zeros(module, plan, s)
    weight = scales = offset = ones = None
    if kernel and plan.bits == 4:
        codes = F.pad(unpack_codes(t["qweight"], 4, K, torch.int32), (0, plan.k_pad - K))  # zero columns of x
        block = torch.arange(plan.k_pad // plan.tiny_group) * plan.tiny_group // plan.group  # scheme group of each
        sz = torch.stack([s[:, block], (s * (8.0 - z))[:, block]], dim=-1)  # [N, blocks, 2], exact in fp32
        weight = _convert_int4(codes.contiguous(), 2)
        scales = sz.transpose(0, 1).to(_COMPUTE).contiguous()
    elif kernel:
        codes = F.pad(unpack_codes(t["qweight"], 8, K, torch.int32), (0, plan.k_pad - K))
        weight = (codes - 128).to(torch.int8).contiguous()
        scales = s[:, 0].contiguous()
        offset = (s * (128.0 - z))[:, 0].contiguous() if "zeros" in t else None
        ones = torch.ones(N, dtype=_COMPUTE)
    perm = t["perm"].long() if "perm" in t else None
    return CpuPack(_signature(module), plan, weight, scales, offset, ones, perm, s.unsqueeze(-1),
                   (-z * s).unsqueeze(-1))


def _pack_of(module, plan: CpuPlan, kernel: bool) -> CpuPack:
    cache = module.kernel_cache
    pack = cache.get(_CACHE_KEY)
    if (pack is None or pack.plan is not plan or pack.signature != _signature(module)
            or (kernel and pack.weight is None)):
        with torch.no_grad():
            pack = cache[_CACHE_KEY] = repack(module, plan, kernel)
    return pack


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous with 64-byte aligned rows start: the int8 kernel's AVX-512 loads are aligned loads."""
    x = x.contiguous()
    return x if x.data_ptr() % 64 == 0 else x.clone()


def _codes_u8(qweight: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """Codes [N, K] as uint8 from the little-endian bit stream, read byte by byte (4 bits: low nibble first)."""
    b = qweight.view(torch.uint8)
    if bits == 4:
        b = torch.stack((b & 15, b >> 4), dim=-1).view(b.shape[0], -1)
    return b[:, :K]


def _dense(module, pack: CpuPack, dtype: torch.dtype) -> torch.Tensor:
    """The weight [N, K] in stored column order as ``dtype``: ``c * s - z * s`` in fp32 (each term and the sum
    exact, so the reference's ``s * (c - z)``), rounded once to ``dtype`` as it is written; the short last group
    separately."""
    if dtype != torch.float32:  # the same single rounding; addcmul writing bf16 is ~1.7x slower than fp32 + a cast
        return _dense(module, pack, torch.float32).to(dtype)
    plan = pack.plan
    N, K, g = module.out_features, module.in_features, plan.group
    c = _codes_u8(module.qweight, plan.bits, K)
    W = torch.empty(N, K, dtype=dtype)
    full = K // g
    for lo, hi, n in ((0, full, g), (full, plan.ngroups, K - full * g)):
        if hi > lo:
            torch.addcmul(pack.zs[:, lo:hi], c[:, lo * g:hi * g].view(N, hi - lo, n), pack.s32[:, lo:hi],
                          out=W[:, lo * g:hi * g].view(N, hi - lo, n))
    return W


def _gather_columns(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[:, perm]``, contiguous: the same values as ``index_select(1, perm)``, which is ~5x slower for bf16 here
    ([1024, 576]: 1.2 ms against 0.26 ms on 2 AVX-512 cores)."""
    return torch.gather(x, 1, perm.expand(x.shape[0], -1))


def linear(x: torch.Tensor, module, *, bias: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    """``(R x) @ W.T (+ bias)`` for a ``quantkit-uniform`` module on CPU (the dispatch table's ``cpu-int4pack`` and
    ``cpu-int8pack``)."""
    if rotation is not None:
        x = rotation.apply(x)
    plan = _plan(module)
    K, N = module.in_features, module.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    exact = exact_fp32(x)
    dequantize = exact or x2.shape[0] >= LARGE_M[plan.bits]
    pack = _pack_of(module, plan, kernel=not dequantize)
    if dequantize:
        dtype = _COMPUTE if NATIVE_BF16 and not exact else torch.float32
        xd = x2.to(dtype)
        if pack.perm is not None:
            xd = _gather_columns(xd, pack.perm)
        W = _dense(module, pack, dtype)
        if dtype == x.dtype:  # the reference's own GEMM (bias included), bit for bit
            return F.linear(xd, W, bias).view(*lead, N)
        y = F.linear(xd, W).to(x.dtype)
    elif plan.bits == 4:
        xb = x2.to(_COMPUTE)
        xb = _gather_columns(xb, pack.perm) if pack.perm is not None else xb
        xb = F.pad(xb, (0, plan.k_pad - K)) if plan.k_pad != K else xb.contiguous()
        y = _int4_mm(xb, pack.weight, plan.tiny_group, pack.scales).to(x.dtype)
    else:
        xb = x2.to(_COMPUTE)
        xb = _gather_columns(xb, pack.perm) if pack.perm is not None else xb
        xb = _aligned(F.pad(xb, (0, plan.k_pad - K)) if plan.k_pad != K else xb)
        y = _int8_mm(xb, pack.weight, pack.ones).float().mul_(pack.scales)
        if pack.offset is not None:
            y.addr_(xb.sum(-1, dtype=torch.float32), pack.offset)
        y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias)
    return y.view(*lead, N)


def _supports_bits(bits: int):
    def predicate(x: torch.Tensor, module) -> bool:
        return supports(x, module, bits)

    return predicate


def _supports_exact(x: torch.Tensor, module) -> bool:
    return supports(x, module, exact=True)


def register_cpu_kernels() -> None:
    """The dispatch table's CPU entries (quantkit.kernels.dispatch registers them on first use): ``cpu-int4pack``
    and ``cpu-int8pack`` (bf16), ``cpu-dequant`` (exact fp32), one implementation, named apart so
    ``quantkit.nn.kernel_for`` tells which serves."""
    from quantkit.kernels import dispatch

    dispatch.register_kernel("cpu-int4pack", "quantkit-uniform", _supports_bits(4), linear)
    dispatch.register_kernel("cpu-int8pack", "quantkit-uniform", _supports_bits(8), linear)
    dispatch.register_kernel("cpu-dequant", "quantkit-uniform", _supports_exact, linear)
