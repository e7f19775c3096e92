"""Speed ceiling of int8-activation GEMMs on this CPU, for one SmolLM2 up_proj-shaped product ([1024, 576] x
[1536, 576]^T, a [16, 64] forward's tokens), against PyTorch's fp32 GEMM (issue 21, item 2: is there a faster
arithmetic than fp32's own for the packed W4 forward on an AVX2 machine without native bf16?).

    OMP_NUM_THREADS=2 python benchmarks/cpu_int8_probe.py

Rows, mean milliseconds of 20 calls after 2 warm-ups: the fp32 ``F.linear``; ``torch._int_mm`` over the whole K
and per group of 128 columns (what a grouped-scale W4 x int8 product would run); fbgemm's dynamic int8 linear with
a per-channel int8 weight (per-tensor activation scales, with and without ``reduce_range``). Only the arithmetic:
no quantization of the activations is timed except inside fbgemm's dynamic linear, and nothing checks accuracy.
"""

from __future__ import annotations

import time
import warnings

import torch

T, K, N, G = 1024, 576, 1536, 128


def bench(f, n: int = 20) -> float:
    f()
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; x [{T}, {K}] @ W[{N}, {K}]^T")
    x, W = torch.randn(T, K), torch.randn(N, K)
    print(f"fp32 F.linear                      {bench(lambda: torch.nn.functional.linear(x, W)):8.2f} ms")
    xq = torch.randint(-127, 127, (T, K), dtype=torch.int8)
    wq = torch.randint(-15, 15, (K, N), dtype=torch.int8)

    def grouped():
        y = None
        for s in range(0, K, G):
            acc = torch._int_mm(xq[:, s : s + G].contiguous(), wq[s : s + G]).float()
            y = acc if y is None else y.add_(acc)
        return y

    print(f"torch._int_mm, whole K             {bench(lambda: torch._int_mm(xq, wq)):8.2f} ms")
    print(f"torch._int_mm, groups of {G}       {bench(grouped):8.2f} ms")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated in PyTorch
        qw = torch.quantize_per_channel(W, W.abs().amax(1) / 127, torch.zeros(N, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    for reduce_range in (True, False):
        ms = bench(lambda r=reduce_range: torch.ops.quantized.linear_dynamic(x, packed, r))
        print(f"fbgemm linear_dynamic, reduce_range={reduce_range!s:5s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
