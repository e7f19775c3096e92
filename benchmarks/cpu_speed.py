"""Speed of the CPU reference path: the Hadamard transform and a quantized model's whole forward.

    python benchmarks/cpu_speed.py --hadamard                 # hadamard_transform at 1 and 1024 rows, model widths
    python benchmarks/cpu_speed.py --forward FOLDER [FOLDER]  # one forward of a [16, 64] batch of token ids

Times are the best of 20 (transform) or 3 (forward) wall-clock runs after a warm-up, with torch's default
threads. Used to compare commits: run it under each commit's install (e.g. ``PYTHONPATH=site-of-that-commit``).
"""

from __future__ import annotations

import argparse
import time

import torch

import quantkit  # noqa: F401  (registers the quantized format with transformers)
from quantkit.rotations import hadamard_layout
from quantkit.rotations.randomized import hadamard_transform


def best_of(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hadamard", action="store_true")
    p.add_argument("--forward", nargs="*", default=[])
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, quantkit at {quantkit.__file__}")
    if args.hadamard:
        for n in (576, 1536, 4096, 11008):
            lay = hadamard_layout(n)
            for rows in (1, 1024):
                x = torch.randn(rows, n)
                t = best_of(lambda: hadamard_transform(x, lay), 20)  # noqa: B023 (called before the next iteration)
                print(f"hadamard_transform n={n} ({lay.describe()}), {rows} rows: {t * 1e6:.1f} µs")
    if args.forward:
        from transformers import AutoModelForCausalLM

        for folder in args.forward:
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            ids = torch.randint(0, 1000, (16, 64), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                t = best_of(lambda: model(ids), 3)  # noqa: B023
            print(f"forward [16, 64] of {folder}: {t:.3f} s")


if __name__ == "__main__":
    main()
