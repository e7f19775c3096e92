"""Decode attention over a CQ KV cache on a GPU: the Triton kernel reading the packed codes
(quantkit.kvcache.attention.decode_attention) against the path generate() takes today (the store dequantized,
then PyTorch's scaled_dot_product_attention) and against an fp16 cache of the same length (SDPA alone).

    python benchmarks/kv_attention_bench.py                          # Llama-3-8B heads, 1k-32k tokens, batch 1 and 8
    python benchmarks/kv_attention_bench.py --contexts 4096 --batches 1 --bits 1 --channels 8
    TRITON_INTERPRET=1 python benchmarks/kv_attention_bench.py --device cpu --smoke   # the script itself, tiny

One decoder layer's attention for one new token per sequence: ``--heads`` query heads over ``--kv-heads`` KV
heads of ``--head-dim`` channels; the cache holds ``context`` tokens (all in the quantized store: no sink, no
residual) with random tables and codes. Each row: median microseconds of each path, on CUDA captured once in a
CUDA graph and replayed by ``triton.testing.do_bench``, which clears the L2 cache before every replay (so neither
Python nor launch overhead is timed, and a short cache is not read from L2; a path that cannot be captured is
timed eagerly and its row says so); the bytes the kernel reads (codes and tables) and its effective bandwidth.
Every kernel output is checked against the dequantize-then-attend reference before it is timed.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def _layer(B: int, HKV: int, D: int, T: int, bits: int, channels: int, device: str, pre_rope: bool):
    from quantkit.kvcache.layers import CQLayer
    from quantkit.kvcache.packing import pack_uint8
    from quantkit.kvcache.rope import Rope

    g = torch.Generator().manual_seed(0)
    code_bits = bits * channels
    G = D // channels
    tables = [torch.randn(HKV, G, 2**code_bits, channels, generator=g).half().to(device) for _ in range(2)]
    rope = Rope(1.0 / 500000 ** (torch.arange(0, D, 2, dtype=torch.float) / D)) if pre_rope else None
    layer = CQLayer(code_bits=code_bits, key_centroids=tables[0], value_centroids=tables[1], residual=0, sink=0,
                    rope=rope)
    empty = torch.zeros(B, HKV, 0, D, dtype=torch.float16, device=device)
    layer.lazy_initialization(empty, empty)
    for kind in ("keys", "values"):
        codes = torch.randint(0, 2**code_bits, (B, HKV, T, G), generator=g)
        store = {"codes": pack_uint8(codes, code_bits).to(device)}
        if kind == "keys" and pre_rope:
            store["positions"] = torch.arange(T, dtype=torch.int32, device=device).expand(B, 1, T).contiguous()
        setattr(layer, f"store_{kind}", store)
    layer.stored_tokens = layer.cumulative_length = T
    return layer


EAGER: list[str] = []  # the paths of the current row that could not be captured in a CUDA graph


def _time(fn, iters: int, device: str, what: str) -> float:
    """Median microseconds of ``fn()``: on CUDA a CUDA-graph replay with L2 cleared before each (eager if the
    capture fails, noted in ``EAGER``); elsewhere wall-clock calls."""
    for _ in range(3):
        fn()
    if device != "cuda":
        import time

        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
        return statistics.median(times)
    import triton.testing

    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        run = graph.replay
    except RuntimeError:
        torch.cuda.synchronize()
        EAGER.append(what)
        run = fn
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median") * 1e3


def _row(B: int, T: int, a: argparse.Namespace) -> str:
    """One table row: the three paths timed at batch ``B`` and ``T`` cached tokens, after the kernel's check."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from quantkit.kvcache.attention import decode_attention

    dev = a.device
    layer = _layer(B, a.kv_heads, a.head_dim, T, a.bits, a.channels, dev, a.pre_rope)
    q = torch.randn(B, a.heads, a.head_dim, dtype=torch.float16, device=dev)
    K = layer.decode(layer.store_keys, "keys").half()
    V = layer.decode(layer.store_values, "values").half()
    ref = sdpa(q.unsqueeze(2), K, V, enable_gqa=True).squeeze(2).float()
    opts = {k: v for k, v in (("block_t", a.block_t), ("num_warps", a.num_warps), ("splits", a.splits)) if v}
    err = ((decode_attention(layer, q, **opts) - ref).abs().max() / ref.abs().max()).item()
    if err > 5e-3:
        raise SystemExit(f"kernel output differs from the reference by {err:.2e} (batch {B}, context {T})")

    def dequantized():
        k = layer.decode(layer.store_keys, "keys").half()
        v = layer.decode(layer.store_values, "values").half()
        return sdpa(q.unsqueeze(2), k, v, enable_gqa=True)

    EAGER.clear()
    t_fp = _time(lambda: sdpa(q.unsqueeze(2), K, V, enable_gqa=True), a.iters, dev, "fp16")
    t_dq = _time(dequantized, a.iters, dev, "dequantize")
    t_k = _time(lambda: decode_attention(layer, q, **opts), a.iters, dev, "kernel")
    held = (*layer.store_keys.values(), *layer.store_values.values(), *layer.centroids.values())
    nbytes = sum(t.numel() * t.element_size() for t in held)
    timed = "eager: " + ", ".join(EAGER) if EAGER else "graph" if dev == "cuda" else "wall clock"
    return (f"| {B} | {T} | {t_fp:.1f} | {t_dq:.1f} | {t_k:.1f} | {t_fp / t_k:.2f}× | {nbytes / 2**20:.2f} | "
            f"{nbytes / t_k / 1e3:.1f} | {timed} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--pre-rope", action="store_true", help="keys coded before RoPE (turned in the kernel)")
    p.add_argument("--iters", type=int, default=50, help="repetitions off CUDA (CUDA: do_bench's 100 ms)")
    p.add_argument("--block-t", type=int, default=None, help="kernel tokens per tile (default: the kernel's)")
    p.add_argument("--num-warps", type=int, default=None, help="kernel warps (default: the kernel's)")
    p.add_argument("--splits", type=int, default=None, help="kernel programs per sequence and head (default: the "
                   "kernel's)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 iterations: checks the script runs")
    a = p.parse_args(argv)
    if a.smoke:
        a.heads, a.kv_heads, a.head_dim, a.contexts, a.batches, a.iters = 4, 2, 32, [100], [1], 2
    HQ, HKV, D = a.heads, a.kv_heads, a.head_dim
    name = torch.cuda.get_device_name() if a.device == "cuda" else a.device
    print(f"{name}; one layer, {HQ} query / {HKV} KV heads of {D}; CQ {a.bits} bits per channel, c = {a.channels}"
          f"{', pre-RoPE keys' if a.pre_rope else ''}; kernel block_t {a.block_t or 'default'}, num_warps "
          f"{a.num_warps or 'default'}, splits {a.splits or 'default'}; "
          + ("medians of CUDA-graph replays with L2 cleared" if a.device == "cuda" else f"median of {a.iters}"))
    print("| batch | context | fp16 SDPA µs | dequantize + SDPA µs | kernel µs | kernel vs fp16 | codes+tables MiB |"
          " kernel GB/s | timed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for B in a.batches:
        for T in a.contexts:
            print(_row(B, T, a))

if __name__ == "__main__":
    main()
