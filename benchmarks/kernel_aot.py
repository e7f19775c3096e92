"""Compile the Triton kernels for an NVIDIA GPU that is not here, and report what each variant costs in registers.

The interpreter (``TRITON_INTERPRET=1``) checks what the kernels compute, but not that they compile: it accepts
code the compiler rejects (a block shape that is not a power of two, a dtype mix ``tl.dot`` refuses) and says
nothing about register pressure. This module builds every variant the dispatch can launch with Triton's own
compiler and the ``ptxas`` bundled with Triton, for a named target (default ``sm_90``, H100/H200), on a machine
with no GPU and no CUDA driver: a stand-in driver answers "current target" and nothing is launched. The arguments
are specialized exactly as a launch would specialize them (Triton's binder sees mock tensors of the right dtypes
and the real integer arguments), so the code compiled is the code a GPU would run.

``python -m benchmarks.kernel_aot`` prints, per variant, registers, spills, shared memory and the main loop's
machine instructions (also per weight: over each thread's share of the tile): every autotune config of the GEMV
and the GEMM for the Llama shapes of ``benchmarks/kernel_bench.py``, the Hadamard kernel, and the codebook
kernels of ``quantkit-vq`` (GEMV configs and the dequantize kernel, ``--vq d4b8 d8b16``). With ``--warm`` (on
the GPU machine) it only compiles them, in parallel, into Triton's on-disk cache, so that the autotuner of a benchmark
that follows finds each config compiled instead of compiling a few hundred of them one after another. The test
suite compiles a smaller grid (tests/test_kernel_aot.py).

Triton fixes interpreter or compiler per ``@triton.jit`` at import, so this module needs ``TRITON_INTERPRET`` unset
(or 0) when Triton is first imported; tests run it in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget

from benchmarks.kernel_bench import SHAPES, BenchScheme, Codebook, parse_codebook

__all__ = ["Compiled", "Variant", "compile_variant", "fwht_variants", "gemm_variants", "gemv_variants",
           "launch_variants", "loop_stats", "main", "vq_dequant_variants", "vq_gemv_variants"]


@dataclass(frozen=True)
class Variant:
    """One launch of one kernel: its positional arguments (dtypes stand for tensors), constexprs and options."""

    kernel: str  # "gemv", "gemm", "fwht", "vq_gemv", "vq_dequant" or "kv_attention"
    label: str
    args: tuple[Any, ...]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3


@dataclass
class Compiled:
    """A compiled variant's resources, as ptxas and the PTX report them."""

    variant: Variant
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared: int  # bytes of shared memory the launch needs
    loop: dict[str, int] = field(default_factory=dict)  # the main K loop in machine code, see loop_stats
    asm: dict[str, Any] = field(repr=False, default_factory=dict)


class _OfflineDriver:
    """Just enough of a Triton driver to compile: it names a target and never launches."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def parse_target(name: str) -> GPUTarget:
    m = re.fullmatch(r"sm_(\d+)a?", name)
    if m is None:
        raise ValueError(f"target must look like sm_90 or sm_80, got {name!r}")
    return GPUTarget("cuda", int(m.group(1)), 32)


@contextlib.contextmanager
def _offline(target: GPUTarget) -> Iterator[None]:
    from triton.runtime.driver import driver

    previous = driver._active
    driver.set_active(_OfflineDriver(target))
    try:
        yield
    finally:
        driver._active = previous


def _kernels() -> dict[str, Any]:
    from quantkit.kernels import triton_codebook, triton_hadamard, triton_kv, triton_uniform

    if triton_uniform.is_interpreted() or triton_codebook.is_interpreted() or triton_kv.is_interpreted():
        raise RuntimeError(
            "the kernels were loaded for the Triton interpreter (TRITON_INTERPRET=1 when Triton was imported); "
            "ahead-of-time compilation needs a fresh process with TRITON_INTERPRET unset"
        )
    return {"gemv": triton_uniform._gemv_kernel, "gemm": triton_uniform._gemm_kernel,
            "fwht": triton_hadamard._fwht_kernel, "vq_gemv": triton_codebook._gemv_kernel,
            "vq_dequant": triton_codebook._dequant_kernel, "kv_attention": triton_kv._cq_decode_attention_kernel}


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not read ptxas's resource report:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


# an instruction line of nvdisasm's listing: /*0a30*/  [@P0 | @!P1 | @UP0 ...]  OPCODE[.modifiers] operands
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def loop_stats(cubin: bytes, arch: int) -> dict[str, int]:
    """What one iteration of the kernel's main loop costs in machine instructions (SASS, disassembled by the
    ``nvdisasm`` bundled with Triton): the longest block between a label and a branch back to it.
    ``instructions``, ``shared_stores`` (STS: layout changes through shared memory), ``barriers`` (BAR),
    ``global_loads`` (LDG, LDGSTS). Counted in SASS rather than PTX because ptxas fuses bit operations into LOP3
    and pairs fp16 arithmetic (HADD2, HMUL2). A static proxy, not a timing: what can be compared without a GPU."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = Path(get_ptxas(arch).path).with_name("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    body: list[str] = []
    for j, line in enumerate(lines):
        m = re.search(r"\bBRA\b[^`]*`\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), j) < j and j - labels[m.group(1)] > len(body):
            body = lines[labels[m.group(1)]:j + 1]
    ops = [m.group(1) for line in body if (m := _SASS_OPCODE.search(line))]

    def count(*names: str) -> int:
        return sum(1 for op in ops if op in names)

    return {"instructions": len(ops), "shared_stores": count("STS"), "barriers": count("BAR"),
            "global_loads": count("LDG", "LDGSTS")}


def _build(variant: Variant, gpu: GPUTarget) -> Any:
    """Triton's compiled kernel for ``variant``, from its on-disk cache when an identical launch compiled it."""
    with _offline(gpu):
        return _kernels()[variant.kernel].warmup(*variant.args, grid=(1,), num_warps=variant.num_warps,
                                                 num_stages=variant.num_stages, **variant.constexprs)


def compile_variant(variant: Variant, target: str = "sm_90") -> Compiled:
    """Compile ``variant`` for ``target`` (no GPU needed) and read its resource use from ptxas."""
    gpu = parse_target(target)
    kernel = _build(variant, gpu)
    regs, stores, loads = _ptxas_report(kernel.asm["ptx"], gpu.arch)
    loop = loop_stats(kernel.asm["cubin"], gpu.arch)
    return Compiled(variant, regs, stores, loads, kernel.metadata.shared, loop, dict(kernel.asm))


# --- the variants a launch can produce ----------------------------------------------------------------------------
# These mirror the argument lists of quantkit.kernels.triton_uniform.triton_uniform_matmul; a change there that is
# not made here fails to compile (wrong arity or types), which the test suite catches.

_META_DTYPE = torch.float16  # scales and zeros as the packed format stores them
DEFAULT_FORMATS = ("w4g128", "w3g128", "w2g64", "w8g-1")


def _uniform_args(M: int, N: int, K: int, group_size: int, bits: int, dtype: torch.dtype, *, zeros: bool,
                  levels: bool, bias: bool) -> tuple[tuple[Any, ...], tuple[int, ...]]:
    """``(x, qweight, scales, zeros, levels, bias, out)`` as dtypes (None where the launcher passes None) and
    ``(M, N, stride_xm, stride_qn, stride_sn, stride_om)`` of contiguous tensors, as the launcher passes them."""
    from quantkit.formats.packing import packed_words

    ngroups = 1 if group_size == -1 else -(-K // group_size)
    pointers = (dtype, torch.int32, _META_DTYPE, _META_DTYPE if zeros else None, torch.float32 if levels else None,
                dtype if bias else None, dtype)
    return pointers, (M, N, K, packed_words(K, bits), ngroups, N)


def gemv_variants(M: int, N: int, K: int, *, bits: int, group_size: int, dtype: torch.dtype = torch.float16,
                  zeros: bool = True, levels: bool = False, bias: bool = False, rot_block: int = 0,
                  configs: list[triton.Config] | None = None) -> list[Variant]:
    """The GEMV launches for an ``M x K`` input (M <= GEMV_MAX_M): one per autotune config the pruning keeps, or
    per config given."""
    from quantkit.kernels import triton_uniform as tu

    if not 1 <= M <= tu.GEMV_MAX_M:
        raise ValueError(f"the GEMV takes 1 to {tu.GEMV_MAX_M} rows, got {M}")
    pointers, ints = _uniform_args(M, N, K, group_size, bits, dtype, zeros=zeros, levels=levels, bias=bias)
    signs = torch.int8 if rot_block else None  # HadamardRotation.signs
    block_m = triton.next_power_of_2(M)
    flags = tu.launch_flags(K, group_size, bits, zeros=zeros, levels=levels, bias=bias)
    if configs is None:
        configs = tu._prune_gemv(tu._gemv_configs(dtype != torch.bfloat16), {}, BLOCK_M=block_m)
    out_list = []
    for c in configs:
        args = (*pointers, signs, *ints, rot_block**-0.5 if rot_block else 1.0)
        label = (f"gemv M={M} N={N} K={K} w{bits}g{group_size} {str(dtype)[6:]}"
                 f"{' rot' + str(rot_block) if rot_block else ''} "
                 f"BN={c.kwargs['BLOCK_N']} BK={c.kwargs['BLOCK_K']} SK={c.kwargs['SPLIT_K']} warps={c.num_warps}")
        out_list.append(Variant("gemv", label, args, {**flags, "ROT_BLOCK": rot_block, "BLOCK_M": block_m,
                                                      **c.kwargs}, c.num_warps, c.num_stages))
    return out_list


def gemm_variants(M: int, N: int, K: int, *, bits: int, group_size: int, dtype: torch.dtype = torch.float16,
                  zeros: bool = True, levels: bool = False, bias: bool = False,
                  configs: list[triton.Config] | None = None) -> list[Variant]:
    """The GEMM launches for an ``M x K`` input (M > GEMV_MAX_M): one per autotune config the pruning keeps."""
    from quantkit.kernels import triton_uniform as tu

    pointers, ints = _uniform_args(M, N, K, group_size, bits, dtype, zeros=zeros, levels=levels, bias=bias)
    m_bucket, precision = tu.gemm_bucket(M), tu.dot_precision(dtype)
    flags = tu.launch_flags(K, group_size, bits, zeros=zeros, levels=levels, bias=bias)
    if configs is None:
        configs = tu._prune_gemm(tu._gemm_configs(), {"m_bucket": m_bucket})
    variants = []
    for c in configs:
        args = (*pointers, *ints, m_bucket)
        label = (f"gemm M={M} N={N} K={K} w{bits}g{group_size} {str(dtype)[6:]} BM={c.kwargs['BLOCK_M']} "
                 f"BN={c.kwargs['BLOCK_N']} BK={c.kwargs['BLOCK_K']} warps={c.num_warps} stages={c.num_stages}")
        variants.append(Variant("gemm", label, args, {**flags, "DOT_PRECISION": precision, **c.kwargs},
                                c.num_warps, c.num_stages))
    return variants


def fwht_variants(n_rows: int, block: int, dtype: torch.dtype = torch.float16, *, where: int = 1) -> Variant:
    """The Hadamard launch ``triton_rotate`` makes for ``n_rows`` rows of ``block`` (where: 0 none, 1 signs before,
    2 after)."""
    from quantkit.kernels import triton_hadamard as th

    rows, num_warps = th.launch_shape(n_rows, block)
    args = (dtype, dtype, dtype, block**-0.5, n_rows, block)  # without signs the launcher passes x as signs_ptr
    return Variant("fwht", f"fwht rows={n_rows} N={block} {str(dtype)[6:]} signs={where}", args,
                   {"N": block, "ROWS": rows, "SIGNS": where}, num_warps)


# The codebook kernels (quantkit.kernels.triton_codebook.triton_codebook_matmul / triton_codebook_dequantize),
# as benchmarks/kernel_bench.py names them: d4b8 (256 entries of 4, the vq2 preset), d8b16, m2d8b8 (the aq2 preset).
DEFAULT_VQ = ("d4b8", "d8b16", "m2d8b8")


def _perm_dtype(K: int) -> torch.dtype:
    return torch.int16 if K < 2**15 else torch.int32  # quantkit.formats.uniform.perm_dtype


def vq_gemv_variants(M: int, N: int, K: int, *, dim: int, bits: int, dtype: torch.dtype = torch.float16,
                     perm: bool = False, bias: bool = False, configs: list[triton.Config] | None = None,
                     tables: int = 1) -> list[Variant]:
    """The codebook GEMV launches for an ``M x K`` input (M <= GEMV_MAX_M), one per autotune config kept;
    ``tables`` > 1: the additive-codebook kernel (``quantkit-aq``, that many tables of ``2**bits`` entries)."""
    from quantkit.formats.packing import packed_words
    from quantkit.kernels import triton_codebook as tc

    if not 1 <= M <= tc.GEMV_MAX_M:
        raise ValueError(f"the GEMV takes 1 to {tc.GEMV_MAX_M} rows, got {M}")
    block_m = triton.next_power_of_2(M)
    if configs is None:
        configs = tc._prune_gemv(tc._gemv_configs(dtype != torch.bfloat16), {}, BLOCK_M=block_m, DIM=dim,
                                 TABLES=tables)
    # (x, codes, codebook, scales, perm, bias, out, M, N, stride_xm, stride_cn, stride_sn, stride_om, stride_ct,
    # stride_bt); scales [N, 1], stacked tables [tables, N, words] and [tables, entries, dim] (strides 0 for one)
    words = packed_words(K // dim, bits)
    args = (dtype, torch.int32, torch.float16, torch.float16, _perm_dtype(K) if perm else None,
            dtype if bias else None, dtype, M, N, K, words, 1, N, *_table_strides(N, words, dim, bits, tables))
    flags = {"K": K, "DIM": dim, "BITS": bits, "HAS_PERM": perm, "HAS_BIAS": bias, "BLOCK_M": block_m,
             "TABLES": tables}
    kind = f"aq{tables}-" if tables > 1 else ""
    return [Variant("vq_gemv", f"vq-gemv M={M} N={N} K={K} {kind}d{dim}b{bits} {str(dtype)[6:]}"
                    f"{' perm' if perm else ''} "
                    f"BN={c.kwargs['BLOCK_N']} BV={c.kwargs['BLOCK_V']} SK={c.kwargs['SPLIT_K']} warps={c.num_warps}",
                    args, {**flags, **c.kwargs}, c.num_warps, c.num_stages) for c in configs]


def _table_strides(N: int, words: int, dim: int, bits: int, tables: int) -> tuple[int, int]:
    """``(stride_ct, stride_bt)`` as the launcher passes them: 0 with one table, else contiguous stacks."""
    return (0, 0) if tables == 1 else (N * words, 2**bits * dim)


def vq_dequant_variants(N: int, K: int, *, dim: int, bits: int, dtype: torch.dtype = torch.float16,
                        perm: bool = False, tables: int = 1) -> list[Variant]:
    """The codebook dequantize launch (before the cuBLAS GEMM of inputs longer than GEMV_MAX_M rows)."""
    from quantkit.formats.packing import packed_words
    from quantkit.kernels import triton_codebook as tc

    block_n, block_v = tc.dequant_block(dim)
    # (codes, codebook, scales, perm, w, N, stride_cn, stride_sn, stride_wn, stride_ct, stride_bt)
    words = packed_words(K // dim, bits)
    args = (torch.int32, torch.float16, torch.float16, _perm_dtype(K) if perm else None, dtype, N, words, 1, K,
            *_table_strides(N, words, dim, bits, tables))
    kind = f"aq{tables}-" if tables > 1 else ""
    return [Variant("vq_dequant", f"vq-dequant N={N} K={K} {kind}d{dim}b{bits} {str(dtype)[6:]}"
                    f"{' perm' if perm else ''} BN={block_n} BV={block_v}", args,
                    {"K": K, "DIM": dim, "BITS": bits, "HAS_PERM": perm, "BLOCK_N": block_n, "BLOCK_V": block_v,
                     "TABLES": tables})]


def kv_attention_variants(B: int, HQ: int, HKV: int, D: int, T: int, *, channels: int, bits: int,
                          pre_rope: bool = False, dtype: torch.dtype = torch.float16, block_t: int | None = None,
                          splits: int = 4, num_warps: int | None = None) -> list[Variant]:
    """The CQ decode-attention launch (quantkit.kernels.triton_kv.cq_decode_attention) for ``B`` sequences of
    ``HQ`` query heads over ``T`` stored tokens of ``HKV`` KV heads of ``D`` channels, contiguous tensors; tile and
    warps default to the launcher's."""
    from quantkit.kernels import triton_kv
    from quantkit.kvcache.packing import packed_bytes

    block_t = block_t or triton_kv.BLOCK_T  # the launcher's defaults
    num_warps = num_warps or triton_kv.default_warps(pre_rope)
    code_bits = channels * bits
    P = packed_bytes(D // channels, code_bits)
    # (q, key codes, value codes, key table, value table, positions, inv_freq, acc, m, l, T, sm_scale, rope_scale,
    # stride_qb, stride_qh, stride_cb, stride_ch, stride_ct, stride_pb); without pre-RoPE keys the launcher
    # passes the fp32 accumulator for the two unused pointers and 0 for their stride
    unused = torch.float32
    args = (dtype, torch.uint8, torch.uint8, torch.float16, torch.float16, torch.int32 if pre_rope else unused,
            torch.float32, torch.float32, torch.float32, torch.float32, T, D**-0.5, 1.0,
            HQ * D, D, HKV * T * P, T * P, P, T if pre_rope else 0)
    flags = {"HQ": HQ, "HKV": HKV, "D": D, "C": channels, "CODE_BITS": code_bits, "PRE_ROPE": pre_rope,
             "ROT": D if pre_rope else 0, "BLOCK_T": block_t, "BLOCK_D": triton.next_power_of_2(D), "SPLITS": splits,
             "HALF_P": triton.next_power_of_2(D // 2) if pre_rope else 1, "PASS_P": 1}
    return [Variant("kv_attention", f"kv-attention B={B} HQ={HQ} HKV={HKV} D={D} T={T} cq c{channels} b{bits}"
                    f"{' pre-rope' if pre_rope else ''} {str(dtype)[6:]} BT={block_t} S={splits} warps={num_warps}",
                    args, flags, num_warps, 1)]


def vq_launch_variants(shapes: list[tuple[int, int]], batches: list[int], codebooks: list[Codebook],
                       dtype: torch.dtype = torch.float16) -> list[Variant]:
    """Every distinct codebook kernel a launch on these shapes, batches and ``(dim, bits)`` codebooks compiles
    (with act-order, as the presets store it)."""
    from quantkit.kernels.triton_codebook import GEMV_MAX_M

    seen: set[tuple] = set()
    variants = []
    for tables, dim, bits in codebooks:
        for n, k in shapes:
            for M in batches:
                vs = (vq_gemv_variants(M, n, k, dim=dim, bits=bits, dtype=dtype, perm=True, tables=tables)
                      if M <= GEMV_MAX_M
                      else vq_dequant_variants(n, k, dim=dim, bits=bits, dtype=dtype, perm=True, tables=tables))
                for v in vs:
                    key = (v.kernel, tuple(sorted(v.constexprs.items())), v.num_warps, v.num_stages, _specialization(v))
                    if key not in seen:
                        seen.add(key)
                        variants.append(v)
    return variants


def launch_variants(shapes: list[tuple[int, int]], batches: list[int], formats: list[BenchScheme],
                    dtype: torch.dtype = torch.float16, *, rotated: bool = False,
                    gemm_decode: bool = False) -> list[Variant]:
    """Every distinct compiled kernel that a launch on these weight shapes ``(out, in)``, batches and formats
    compiles: each autotune config the pruning keeps. N is a runtime argument, so shapes differing only in N share
    a kernel. With ``rotated``, also the GEMV with the input rotation fused, where the dispatch fuses it (inputs
    whose Hadamard layout is power-of-two blocks, decode batches). With ``gemm_decode``, decode batches on the
    GEMM path too (``benchmarks/kernel_bench.py`` times both)."""
    from quantkit.kernels.triton_uniform import GEMV_MAX_M
    from quantkit.rotations import hadamard_layout

    seen: set[tuple] = set()
    variants = []

    def add(vs: list[Variant]) -> None:
        for v in vs:
            key = (v.kernel, tuple(sorted(v.constexprs.items())), v.num_warps, v.num_stages, _specialization(v))
            if key not in seen:
                seen.add(key)
                variants.append(v)

    for fmt in formats:
        kw = {"bits": fmt.bits, "group_size": fmt.group_size, "dtype": dtype, "zeros": not fmt.symmetric}
        for n, k in shapes:
            for M in batches:
                if M > GEMV_MAX_M:
                    add(gemm_variants(M, n, k, **kw))
                    continue
                add(gemv_variants(M, n, k, **kw))
                if gemm_decode:
                    add(gemm_variants(M, n, k, **kw))
                layout = hadamard_layout(k)
                if rotated and layout.small == 1:
                    add(gemv_variants(M, n, k, **kw, rot_block=layout.block))
    return variants


def _specialization(v: Variant) -> tuple:
    """What Triton's launcher specializes integer arguments on (a value of 1, divisibility by 16): variants that
    differ only in other integer values share one compiled kernel."""
    return tuple((a == 1, a % 16 == 0) if isinstance(a, int) and not isinstance(a, bool) else None for a in v.args)


def _shape(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: expected OUTxIN, e.g. 4096x11008")
    return int(m.group(1)), int(m.group(2))


def _compile_quietly(variant: Variant, target: str) -> Compiled:
    c = compile_variant(variant, target)
    c.asm = {}  # the worker's result crosses a process boundary; the report needs only the figures
    return c


def _warm_one(variant: Variant, target: str) -> str:
    _build(variant, parse_target(target))
    return variant.label


def _pool_map(fn: Any, variants: list[Variant], target: str, jobs: int) -> Iterator[Any]:
    if jobs <= 1:
        yield from (fn(v, target) for v in variants)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the workers import Triton afresh (TRITON_INTERPRET is inherited) and never touch CUDA
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(fn, variants, [target] * len(variants))


def _current_target() -> str:
    if not torch.cuda.is_available():
        raise SystemExit("--target auto needs a visible CUDA GPU; name one instead, e.g. --target sm_90")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def main(argv: list[str] | None = None) -> int:
    import os
    import time

    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="sm_90", help="NVIDIA target, e.g. sm_90 (H100/H200, the default), sm_80; "
                   "auto: the visible GPU's")
    p.add_argument("--models", nargs="*", choices=sorted(SHAPES), default=None,
                   help="whose linear shapes (benchmarks/kernel_bench.py's); default all, unless --shapes are given")
    p.add_argument("--shapes", nargs="+", type=_shape, default=[], help="more weight shapes, OUTxIN")
    p.add_argument("--rotated", action="store_true",
                   help="also the GEMV with the input rotation fused, where the dispatch fuses it")
    p.add_argument("--gemm-decode", action="store_true",
                   help="decode batches (<= 8 rows) on the GEMM path too, as benchmarks/kernel_bench.py times them")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 128],
                   help="rows of the input: GEMV for <= 8, GEMM above (default 1 16 128)")
    p.add_argument("--formats", nargs="*", type=BenchScheme.parse,
                   default=[BenchScheme.parse(f) for f in DEFAULT_FORMATS],
                   help="as benchmarks/kernel_bench.py takes them, e.g. w4g128, w3g-1 (per channel), w4g128-sym; "
                        f"default {' '.join(DEFAULT_FORMATS)}")
    p.add_argument("--vq", nargs="*", type=parse_codebook, default=[parse_codebook(f) for f in DEFAULT_VQ],
                   help="codebook kernels (with act-order) for these [m<tables>]d<dim>b<bits>, e.g. d4b8 m2d8b8 "
                        f"(default {' '.join(DEFAULT_VQ)}; none: --vq with no value)")
    p.add_argument("--warm", action="store_true",
                   help="only compile, in parallel, into Triton's cache (on a GPU machine before benchmarking: "
                        "the autotuner then finds every config compiled); no report")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    args = p.parse_args(argv)
    if min(args.batch) < 1:
        p.error("--batch sizes must be positive")
    target = _current_target() if args.target == "auto" else args.target
    parse_target(target)
    jobs = args.jobs or os.cpu_count() or 1
    models = args.models if args.models is not None else ([] if args.shapes else sorted(SHAPES))
    shapes = [(n, k) for m in models for _, n, k in SHAPES[m]] + args.shapes
    if not shapes:
        p.error("no shapes: give --models and/or --shapes")
    variants = launch_variants(shapes, args.batch, args.formats, rotated=args.rotated, gemm_decode=args.gemm_decode)
    variants += vq_launch_variants(shapes, args.batch, args.vq)
    if args.warm:
        t0 = time.perf_counter()
        for _ in _pool_map(_warm_one, variants, target, jobs):
            pass
        cache = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")
        print(f"compiled {len(variants)} kernel variants for {target} into {cache} in "
              f"{time.perf_counter() - t0:.1f} s with {jobs} processes")
        return 0
    print("| variant | registers | spill stores (B) | shared memory (B) | loop: SASS instructions | per weight | STS "
          "| BAR |\n|---|---|---|---|---|---|---|---|")
    variants += [fwht_variants(16, block) for block in (64, 128, 4096)]
    for c in _pool_map(_compile_quietly, variants, target, jobs):
        print(_row(c), flush=True)
    return 0


def _row(c: Compiled) -> str:
    loop = c.loop or {}
    per_weight = "-"
    if c.variant.kernel != "fwht" and loop.get("instructions"):
        # each thread's share of the tile's weights per iteration (one split's tile for split-K)
        cx = c.variant.constexprs
        block_k = cx["BLOCK_K"] if "BLOCK_K" in cx else cx["BLOCK_V"] * cx["DIM"]
        weights = cx["BLOCK_N"] * block_k / (32 * c.variant.num_warps)
        per_weight = f"{loop['instructions'] / weights:.2f}"
    return (f"| {c.variant.label} | {c.registers} | {c.spill_stores} | {c.shared} | {loop.get('instructions', '-')} | "
            f"{per_weight} | {loop.get('shared_stores', '-')} | {loop.get('barriers', '-')} |")


if __name__ == "__main__":
    raise SystemExit(main())
