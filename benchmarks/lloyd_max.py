"""Compute the MSE-optimal (Lloyd–Max) scalar quantizer levels of a standard normal variable, 2–8 bits.

Lloyd's conditions for an optimal quantizer: each boundary is the midpoint of its two levels, and each level is
the mean of the density between its boundaries. For N(0, 1) that mean is closed-form,
``E[X | a < X < b] = (φ(a) − φ(b)) / (Φ(b) − Φ(a))``, so the fixed-point iteration runs in float64 without
sampling. Run ``python -m benchmarks.lloyd_max`` to regenerate ``gaussian_levels.json`` (the grid data that
``quantkit.grids.levels`` reads); the file records each grid's mean squared error as a check.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

__all__ = ["lloyd_max_gaussian"]

OUT = Path(__file__).resolve().parents[1] / "quantkit" / "grids" / "gaussian_levels.json"


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


def _cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.special.erf(x / math.sqrt(2)))


def lloyd_max_gaussian(bits: int, *, tol: float = 1e-13, max_iter: int = 200_000) -> tuple[torch.Tensor, float]:
    """Levels [2**bits] (ascending, float64) and the quantizer's mean squared error on N(0, 1)."""
    n = 2**bits
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    levels = math.sqrt(2) * torch.special.erfinv(2 * p - 1)  # start from the quantiles
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(max_iter):
        edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
        a, b = edges[:-1], edges[1:]
        new = (_pdf(a) - _pdf(b)) / (_cdf(b) - _cdf(a))
        new = (new - new.flip(0)) / 2  # the density is symmetric: keep the grid exactly symmetric
        done = (new - levels).abs().max().item() < tol
        levels = new
        if done:
            break
    edges = torch.cat([-inf, (levels[1:] + levels[:-1]) / 2, inf])
    a, b = edges[:-1], edges[1:]
    # E[(X − c)²] over [a, b] = (1 + c²)(Φ(b) − Φ(a)) + (a − 2c)φ(a) − (b − 2c)φ(b), with x·φ(x) → 0 at ±∞.
    fa = torch.where(a.isinf(), torch.zeros_like(a), (a - 2 * levels) * _pdf(a))
    fb = torch.where(b.isinf(), torch.zeros_like(b), (b - 2 * levels) * _pdf(b))
    mse = ((1 + levels**2) * (_cdf(b) - _cdf(a)) + fa - fb).sum().item()
    return levels, mse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    table: dict[str, dict[str, object]] = {"levels": {}, "mse": {}}
    for bits in range(2, 9):
        levels, mse = lloyd_max_gaussian(bits)
        table["levels"][str(bits)] = [round(v, 12) for v in levels.tolist()]
        table["mse"][str(bits)] = mse
        print(f"{bits} bits: mse {mse:.6g}, max level {levels[-1].item():.6f}")
    table["source"] = "python -m benchmarks.lloyd_max (Lloyd-Max fixed point for N(0, 1), float64)"
    args.out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
