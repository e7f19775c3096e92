"""What the online Hadamard rotation costs next to the dequant-matmul it precedes (issue: rotations, item 4).

    python benchmarks/rotation_cost.py                # CPU: the PyTorch reference path, per token
    python benchmarks/rotation_cost.py --device cuda  # GPU: the Triton W4 g128 kernel at batch 1, with and without

For each weight shape [out, in] (SmolLM2, Llama-2-7B and Llama-3-8B linears) it times, at the given batch (tokens):
- ``rotate``: ``HadamardRotation.apply`` on the activation [batch, in] (a launch of its own on CUDA);
- ``matmul``: the W4 g128 dequant-matmul of the same layer through quantkit's dispatch (the Triton kernel on
  CUDA, the PyTorch reference on CPU), with random packed weights, unrotated;
- ``separate``: the rotation, then the dequant-matmul (two launches on CUDA);
- ``forward``: what a rotated ``QuantizedLinear.forward`` runs, the dispatch given the rotation: on CUDA, for
  power-of-two blocks (Llama's 4096 and 11008 = 43·256), the GEMV computes ``R x`` inside the same launch
  (``kernels/triton_uniform.py``); other layouts (a 12/20/28 factor: SmolLM2's 576, Llama-3's 14336 = 28·512) run
  as ``separate``;
and prints the times and the rotation's share of the matmul, ``(forward - matmul) / matmul`` (on CPU, where
nothing is fused or overlapped, ``rotate / matmul``). CPU times are the median of repeated wall-clock runs after a
warm-up, single-process with torch's default threads. CUDA times are those of ``benchmarks.kernel_bench``: each
call captured in a CUDA graph (no Python launch overhead timed) and replayed by ``triton.testing.do_bench`` with
the L2 cache flushed, median.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch

from quantkit.config import LayerScheme
from quantkit.formats.packing import pack_codes
from quantkit.kernels import dispatch
from quantkit.nn import QuantizedLinear
from quantkit.quantizers.groups import num_groups
from quantkit.rotations import hadamard_layout, random_signs

SHAPES = {
    "smollm2-135m": [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536)],
    "llama2-7b": [("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008)],
    "llama3-8b": [("k/v", 1024, 4096), ("gate/up", 14336, 4096), ("down", 4096, 14336)],
}


def _time_cpu(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_cuda(fn) -> float:
    try:
        from benchmarks.kernel_bench import time_ms
    except ModuleNotFoundError as e:  # run as ``python benchmarks/rotation_cost.py``: this folder is on sys.path
        if e.name != "benchmarks":
            raise
        from kernel_bench import time_ms

    return time_ms(fn, warmup=25, rep=100) / 1e3


W4G128 = dict(method="rtn", bits=4, group_size=128)


def _layer(tensors: dict[str, torch.Tensor], rotated: bool) -> QuantizedLinear:
    """A W4 g128 ``QuantizedLinear`` holding ``tensors`` (and random signs when ``rotated``)."""
    scheme = LayerScheme.from_dict({**W4G128, "rotation": "hadamard" if rotated else "none"})
    N, K = tensors["qweight"].shape[0], tensors["rot_in_signs"].numel()
    return QuantizedLinear.from_packed(tensors, scheme, K, N)


def _separate(layer, rot, x):
    """``R x`` by itself, then the dequant-matmul of the rotated activation."""
    return dispatch.linear(rot.apply(x), layer)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=50, help="CPU repetitions (median)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    print(f"device {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, batch {args.batch}, "
          f"activations {dtype}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| model | layer | [out, in] | transform | rotate (µs) | W4 g128 matmul (µs) | rotate, then matmul (µs) | "
          "forward (µs) | rotation's share of the matmul |")
    print("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for model in args.models.split(","):
        for name, N, K in SHAPES[model]:
            G = num_groups(128, K)
            qweight = pack_codes(torch.randint(0, 16, (N, K), generator=g), 4).to(dev)
            scales = (0.01 * torch.rand(N, G, generator=g)).half().to(dev)
            zeros = torch.randint(0, 16, (N, G), generator=g).half().to(dev)
            x = torch.randn(args.batch, K, generator=g).to(dtype).to(dev)
            tensors = {"qweight": qweight, "scales": scales, "zeros": zeros, "rot_in_signs": random_signs(K, 0, name)}
            plain, rotated = _layer(tensors, rotated=False).to(dev), _layer(tensors, rotated=True).to(dev)
            rot = rotated.rotations[0]

            rotate = functools.partial(rot.apply, x)
            matmul = functools.partial(dispatch.linear, x, plain)
            separate = functools.partial(_separate, plain, rot, x)
            forward = functools.partial(rotated, x)  # QuantizedLinear.forward: the rotation fused where it can
            if dev.type == "cuda":  # the fused path computes what the separate one does
                a, b = separate().float(), forward().float()
                err = ((a - b).abs().max() / a.abs().max()).item()
                if err > 1e-2:
                    raise SystemExit(f"{model} {name}: fused rotation disagrees with rotate-then-matmul ({err:.2e})")
            timer = _time_cuda if dev.type == "cuda" else lambda f: _time_cpu(f, args.reps)
            t_rot, t_mm, t_sep = timer(rotate), timer(matmul), timer(separate)
            t_fwd = timer(forward) if dev.type == "cuda" else t_sep  # on CPU the forward is rotate, then matmul
            share = (t_fwd - t_mm) / t_mm if dev.type == "cuda" else t_rot / t_mm
            print(f"| {model} | {name} | [{N}, {K}] | {hadamard_layout(K).describe()} | {t_rot * 1e6:.1f} | "
                  f"{t_mm * 1e6:.1f} | {t_sep * 1e6:.1f} | {t_fwd * 1e6:.1f} | {share:.3f} |", flush=True)


if __name__ == "__main__":
    main()
