"""Uniform integer grid, asymmetric (min/max with a zero point) or symmetric, as in GPTQ's quantizer.

The range is the group's min and max, or with ``mse_clip`` the shrunk range ``p · [min, max]`` with the least
squared error over a grid of ``p`` (GPTQ's ``mse`` option, llm-compressor's MSE observer): clipping the few
largest weights buys a finer step for all the others.

Scales and zero points are rounded to fp16 when they are fitted, because that is how they are stored:
the weights a rounding method sees are then exactly the weights the packed model will compute with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["GridParams", "UniformGrid"]


@dataclass
class GridParams:
    """Per-row parameters of one group: ``x_hat = scale * (code - zero)``."""

    scale: torch.Tensor  # [rows] fp32 holding fp16-representable values
    zero: torch.Tensor  # [rows] fp32 holding integers


# Shrink factors tried by the MSE clip search: 1.00, 0.99, ..., 0.50.
CLIP_SHRINKS = tuple(1 - i / 100 for i in range(51))


@dataclass(frozen=True)
class UniformGrid:
    bits: int
    symmetric: bool = False
    mse_clip: bool = False

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def fit(self, W: torch.Tensor) -> GridParams:
        """Fit per-row scale and zero to the group ``W`` [rows, g]: by its min and max, or with ``mse_clip`` by the
        shrunk range with the least squared error (the full range is a candidate, so never worse than min/max)."""
        W = W.float()
        xmin = W.min(dim=1).values.clamp(max=0)
        xmax = W.max(dim=1).values.clamp(min=0)
        if not self.mse_clip:
            return self._fit_range(xmin, xmax)
        best = best_err = None
        for p in CLIP_SHRINKS:
            params = self._fit_range(p * xmin, p * xmax)
            err = (self.quantize(W, params)[0] - W).pow(2).sum(1)
            if best is None:
                best, best_err = params, err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = GridParams(
                torch.where(better, params.scale, best.scale), torch.where(better, params.zero, best.zero)
            )
        return best

    def _fit_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> GridParams:
        if self.symmetric:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        degenerate = (xmax - xmin) == 0
        xmin = torch.where(degenerate, torch.full_like(xmin, -1.0), xmin)
        xmax = torch.where(degenerate, torch.ones_like(xmax), xmax)
        scale = ((xmax - xmin) / self.maxq).to(torch.float16).float()
        # A scale that underflows fp16 would make every code meaningless; floor it at fp16's smallest normal.
        scale = scale.clamp(min=float(torch.finfo(torch.float16).tiny))
        if self.symmetric:
            zero = torch.full_like(scale, (self.maxq + 1) / 2)
        else:
            zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return GridParams(scale=scale, zero=zero)

    def quantize(self, x: torch.Tensor, params: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``x`` [rows] or [rows, k] onto the grid; returns ``(x_hat, codes)``."""
        scale, zero = params.scale, params.zero
        if x.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        codes = torch.clamp(torch.round(x / scale) + zero, 0, self.maxq)
        return scale * (codes - zero), codes.to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: GridParams) -> torch.Tensor:
        scale, zero = params.scale, params.zero
        if codes.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return scale * (codes.float() - zero)
