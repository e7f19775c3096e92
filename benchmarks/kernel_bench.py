"""Benchmark: the fused dequant-matmul against ``torch.matmul`` with fp16 weights, on Llama linear shapes.

    python -m benchmarks.kernel_bench                      # all shapes, batches 1..128, W4 g128, W3 g128, W2 g64,
                                                           # and the 2-bit codebooks d4b8, d8b16
    python -m benchmarks.kernel_bench --formats w4g128 --batches 1,16 --peak-gbps 3350
    python -m benchmarks.kernel_bench --models llama2-7b --formats "" --vq d4b8,d8b16,m2d8b8 --batches 1  # codebooks

For every weight shape ``[out, in]`` (Llama-2-7B: 4096x4096, 11008x4096, 4096x11008; Llama-3-8B: 1024x4096,
14336x4096, 4096x14336), batch size and format it prints the time of ``torch.ops.quantkit.uniform_matmul`` (the op
``QuantizedLinear`` runs on CUDA) and of ``torch.matmul(x, W.T)`` with an fp16 ``W``, the speedup, and the bandwidth
each achieves (bytes of packed weights, scales, zeros, permutation, activations and output, divided by the time)
as a fraction of the card's peak. For decode batches (the GEMV path) a last column times the same product on the
tensor-core GEMM path instead, which decides where the switch between the two belongs.

Codebook rows (``--vq``, with act-order as the presets store it): ``dNbB`` is a vector codebook (``quantkit-vq``)
of ``2**B`` entries of ``N`` weights, ``B / N`` bits per weight for the codes: ``d4b8`` (256 entries of 4, the
hadamard-gptq-vq2 preset) and ``d8b16`` (65,536 entries of 8, AQLM's 1x16) are both 2 bits. ``mTdNbB`` is an
additive codebook (``quantkit-aq``) of ``T`` such tables whose codewords are summed: ``m2d8b8`` is AQLM's 2x8, the
hadamard-gptq-aq2 preset, 2 bits. They time ``torch.ops.quantkit.codebook_matmul`` (GEMV up to 8 rows,
dequantize-then-cuBLAS beyond) against the same fp16 ``torch.matmul``; the last column is the dequantize-then-GEMM
path at decode batches.

Timing: each call is captured once in a CUDA graph (so Python and dispatcher overhead are not timed) and replayed
by ``triton.testing.do_bench``, which clears the L2 cache before every replay; without that a 4096x4096 4-bit
weight (8 MiB) would be read from L2 and report more than the card's memory bandwidth. The median is reported.
Autotuning happens in the eager call before capture. CUDA only; the packed weights are random, built with
quantkit's own packing.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from quantkit.formats.packing import pack_codes
from quantkit.formats.uniform import uniform_matmul_ref
from quantkit.quantizers.groups import num_groups

__all__ = ["SHAPES", "BenchScheme", "Codebook", "main", "parse_codebook", "vq_packed_layer"]

SHAPES = {  # weight shapes [out, in] of the linear layers
    "llama2-7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "llama3-8b": [("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)],
}
# Memory bandwidth in GB/s by device name (first match wins; more specific names first).
PEAK_GBPS = [
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("H800", 3350.0),
    ("A100-SXM4-80GB", 2039.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0), ("L40S", 864.0), ("RTX 4090", 1008.0),
]


@dataclass(frozen=True)
class BenchScheme:
    """A random packed weight to benchmark: bits, group size, symmetric grid, act-order (not a storage format)."""

    bits: int
    group_size: int
    symmetric: bool = False
    act_order: bool = False

    @classmethod
    def parse(cls, text: str) -> BenchScheme:
        """``w4g128``, ``w3g-1`` (per channel); suffixes ``-sym`` and ``-act`` (act-order)."""
        m = re.fullmatch(r"w([2348])g(\d+|-1)((?:-sym|-act)*)", text)
        if not m:
            raise argparse.ArgumentTypeError(f"bad format {text!r}; expected e.g. w4g128, w3g-1, w4g128-sym-act")
        return cls(int(m[1]), int(m[2]), "-sym" in m[3], "-act" in m[3])

    def __str__(self) -> str:
        return f"w{self.bits}g{self.group_size}{'-sym' if self.symmetric else ''}{'-act' if self.act_order else ''}"


def packed_layer(N: int, K: int, fmt: BenchScheme, device: torch.device) -> dict[str, torch.Tensor | None]:
    G = num_groups(fmt.group_size, K)
    codes = torch.randint(0, 2**fmt.bits, (N, K), device=device, dtype=torch.uint8)
    return {
        "qweight": pack_codes(codes, fmt.bits),
        "scales": (0.005 + 0.01 * torch.rand(N, G, device=device)).half(),
        "zeros": None if fmt.symmetric else torch.randint(0, 2**fmt.bits, (N, G), device=device).half(),
        "perm": torch.randperm(K, device=device).to(torch.int16) if fmt.act_order else None,
    }


class Codebook(NamedTuple):
    """A random codebook layer to benchmark: ``tables`` summed tables (1: ``quantkit-vq``, more: ``quantkit-aq``)
    of ``2**bits`` codewords of ``dim`` weights."""

    tables: int
    dim: int
    bits: int

    def __str__(self) -> str:
        return f"vq-d{self.dim}b{self.bits}" if self.tables == 1 else f"aq{self.tables}x{self.bits}-d{self.dim}"


def parse_codebook(text: str) -> Codebook:
    """``d4b8``: vectors of 4 weights, codes of 8 bits (256 entries); ``m2d8b8``: two such tables of 8, summed."""
    m = re.fullmatch(r"(?:m([1-8]))?d([2-8])b(\d+)", text)
    if m is None or not 2 <= int(m[3]) <= 16:
        raise argparse.ArgumentTypeError(f"bad codebook {text!r}: expected [m<tables>]d<dim>b<bits>, e.g. d4b8, "
                                         "d8b16, m2d8b8")
    return Codebook(int(m[1] or 1), int(m[2]), int(m[3]))


def vq_packed_layer(N: int, K: int, cb: Codebook, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tensors of a [N, K] codebook layer with act-order, as the kernel op takes them: codes, codebook
    (``[entries, dim]``, or ``[tables, entries, dim]`` stacked for more than one table), scales, perm."""
    from quantkit.formats.packing import pack_bits

    codes = torch.stack([pack_bits(torch.randint(0, 2**cb.bits, (N, K // cb.dim), device=device), cb.bits)
                         for _ in range(cb.tables)])
    tables = (0.02 * torch.randn(cb.tables, 2**cb.bits, cb.dim, device=device)).half()
    return {
        "codes": codes[0] if cb.tables == 1 else codes,
        "codebook": tables[0] if cb.tables == 1 else tables,
        "scales": (0.5 + torch.rand(N, 1, device=device)).half(),
        "perm": torch.randperm(K, device=device).to(torch.int16 if K < 2**15 else torch.int32),
    }


def _vq_reference(x: torch.Tensor, q: dict[str, torch.Tensor], cb: Codebook) -> torch.Tensor:
    """The storage format's own PyTorch forward on the same tensors."""
    from quantkit.config import LayerScheme
    from quantkit.formats import get_format

    quantizer = {"name": "vq", "dim": cb.dim, "entries": 2**cb.bits}
    if cb.tables > 1:
        quantizer = {"name": "aq", "codebooks": cb.tables, "dim": cb.dim, "entries": 2**cb.bits}
        q = {**q, "codebooks": q["codebook"]}
    scheme = LayerScheme.from_dict({"method": {"name": "gptq", "act_order": True, "attention_weighted": False},
                                    "quantizer": quantizer})
    return get_format("quantkit-aq" if cb.tables > 1 else "quantkit-vq").linear(x, q, scheme, None)


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def time_ms(fn: Callable[[], torch.Tensor], warmup: int, rep: int) -> float:
    """Median time of one call, replayed from a CUDA graph with the L2 cache cleared before each replay."""
    import triton.testing

    fn()  # autotune and compile outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep, return_mode="median")


def peak_bandwidth(name: str) -> float | None:
    return next((gbps for key, gbps in PEAK_GBPS if key in name), None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128", help="comma-separated batch sizes (rows of x)")
    p.add_argument("--formats", default="w4g128,w3g128,w2g64", help="comma-separated, e.g. w4g128,w3g-1-sym-act")
    p.add_argument("--vq", default="d4b8,d8b16,m2d8b8",
                   help="comma-separated codebooks [m<tables>]d<dim>b<bits> (quantkit-vq, or quantkit-aq with m > 1; "
                        "act-order); empty for none")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16", help="activation dtype")
    p.add_argument("--peak-gbps", type=float, default=None, help="memory bandwidth; default from the device name")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    args = p.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
        args.formats = [BenchScheme.parse(f) for f in args.formats.split(",") if f]
        args.vq = [parse_codebook(f) for f in args.vq.split(",") if f]
    except (ValueError, argparse.ArgumentTypeError) as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_bench.py times CUDA kernels and needs an NVIDIA GPU; none is visible.",
              file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("benchmarks/kernel_bench.py needs Triton: pip install 'quantkit[triton]'", file=sys.stderr)
        return 2
    import quantkit.kernels.ops  # noqa: F401  (registers torch.ops.quantkit.uniform_matmul and codebook_matmul)

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_gbps or peak_bandwidth(name)
    if peak is None:
        print(f"unknown memory bandwidth for {name!r}: pass --peak-gbps", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    print(f"# {name}, peak {peak:.0f} GB/s; torch {torch.__version__}, triton {triton.__version__}; "
          f"activations {args.dtype}; times are medians of CUDA-graph replays with L2 cleared")
    dense = "fp16" if dtype == torch.float16 else "bf16"
    from quantkit.kernels.triton_uniform import GEMV_MAX_M, triton_uniform_matmul

    header = (f"{'model':<10} {'layer':<8} {'out x in':>12} {'batch':>5} {'format':<10} {dense + ' us':>9} "
              f"{'quant us':>9} {'speedup':>7} {'quant GB/s':>10} {'of peak':>7} {dense + ' GB/s':>9} {'of peak':>7} "
              f"{'GEMM us':>8}")
    print(header)
    torch.manual_seed(0)
    for model in args.models:
        for layer, N, K in SHAPES[model]:
            W = torch.randn(N, K, device=device, dtype=dtype)
            for fmt in args.formats:
                q = packed_layer(N, K, fmt, device)
                # A sanity check that what we time computes the right thing, on the GEMV and the GEMM path.
                for M in {min(args.batches), max(args.batches)}:
                    x = torch.randn(M, K, device=device, dtype=dtype)
                    ref = uniform_matmul_ref(x, **q, bias=None, bits=fmt.bits, group_size=fmt.group_size)
                    outs = {"kernel": torch.ops.quantkit.uniform_matmul(x, **q, bias=None, bits=fmt.bits,
                                                                        group_size=fmt.group_size)}
                    if M <= GEMV_MAX_M:  # longer inputs take the GEMM path already
                        outs["GEMM path"] = triton_uniform_matmul(x, **q, bias=None, bits=fmt.bits,
                                                                  group_size=fmt.group_size, gemv_max_m=0)
                    for what, out in outs.items():
                        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                        if err > 2e-2:
                            print(f"{model} {layer} {fmt} batch {M}: the {what} disagrees with the reference "
                                  f"({err:.2e})")
                            return 1
                for M in args.batches:
                    x = torch.randn(M, K, device=device, dtype=dtype)
                    t_q = time_ms(
                        lambda x=x, q=q, fmt=fmt: torch.ops.quantkit.uniform_matmul(
                            x, **q, bias=None, bits=fmt.bits, group_size=fmt.group_size
                        ),
                        args.warmup, args.rep,
                    )
                    t_16 = time_ms(lambda x=x, W=W: torch.matmul(x, W.t()), args.warmup, args.rep)
                    # Decode batches also on the tensor-core GEMM (rows padded to its 16-row tiles), to place the
                    # switch between the paths (triton_uniform.GEMV_MAX_M) on measurements.
                    t_gemm = None if M > GEMV_MAX_M else time_ms(
                        lambda x=x, q=q, fmt=fmt: triton_uniform_matmul(
                            x, **q, bias=None, bits=fmt.bits, group_size=fmt.group_size, gemv_max_m=0
                        ),
                        args.warmup, args.rep,
                    )
                    io = nbytes(x) + nbytes(x) * N // K  # activations in, output [M, N] out (same dtype)
                    gbps_q = (nbytes(*q.values()) + io) / t_q / 1e6
                    gbps_16 = (nbytes(W) + io) / t_16 / 1e6
                    print(f"{model:<10} {layer:<8} {f'{N}x{K}':>12} {M:>5} {str(fmt):<10} {t_16 * 1e3:>9.1f} "
                          f"{t_q * 1e3:>9.1f} {t_16 / t_q:>7.2f} {gbps_q:>10.0f} {gbps_q / peak:>7.1%} "
                          f"{gbps_16:>9.0f} {gbps_16 / peak:>7.1%} "
                          f"{'-' if t_gemm is None else f'{t_gemm * 1e3:.1f}':>8}", flush=True)
            for cb in args.vq:
                if _bench_vq(model, layer, N, K, W, cb, args, peak) != 0:
                    return 1
            del W
    return 0


def _bench_vq(model: str, layer: str, N: int, K: int, W: torch.Tensor, cb: Codebook,
              args: argparse.Namespace, peak: float) -> int:
    """The rows of one codebook on one shape (the same columns as the scalar formats'); 1 if it computes wrong."""
    from quantkit.kernels.triton_codebook import GEMV_MAX_M, triton_codebook_matmul

    q = vq_packed_layer(N, K, cb, W.device)
    name, dim, bits = str(cb), cb.dim, cb.bits
    for M in {min(args.batches), max(args.batches)}:
        x = torch.randn(M, K, device=W.device, dtype=W.dtype)
        ref = _vq_reference(x, q, cb)
        outs = {"kernel": torch.ops.quantkit.codebook_matmul(x, **q, bias=None, dim=dim, bits=bits)}
        if M <= GEMV_MAX_M:
            outs["dequantize path"] = triton_codebook_matmul(x, **q, bias=None, dim=dim, bits=bits, gemv_max_m=0)
        for what, out in outs.items():
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            if err > 2e-2:
                print(f"{model} {layer} {name} batch {M}: the {what} disagrees with the reference ({err:.2e})")
                return 1
    for M in args.batches:
        x = torch.randn(M, K, device=W.device, dtype=W.dtype)
        t_q = time_ms(lambda x=x: torch.ops.quantkit.codebook_matmul(x, **q, bias=None, dim=dim, bits=bits),
                      args.warmup, args.rep)
        t_16 = time_ms(lambda x=x: torch.matmul(x, W.t()), args.warmup, args.rep)
        t_deq = None if M > GEMV_MAX_M else time_ms(
            lambda x=x: triton_codebook_matmul(x, **q, bias=None, dim=dim, bits=bits, gemv_max_m=0),
            args.warmup, args.rep,
        )
        io = nbytes(x) + nbytes(x) * N // K
        gbps_q = (nbytes(*q.values()) + io) / t_q / 1e6
        gbps_16 = (nbytes(W) + io) / t_16 / 1e6
        print(f"{model:<10} {layer:<8} {f'{N}x{K}':>12} {M:>5} {name:<10} {t_16 * 1e3:>9.1f} {t_q * 1e3:>9.1f} "
              f"{t_16 / t_q:>7.2f} {gbps_q:>10.0f} {gbps_q / peak:>7.1%} {gbps_16:>9.0f} {gbps_16 / peak:>7.1%} "
              f"{'-' if t_deq is None else f'{t_deq * 1e3:.1f}':>8}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
