"""Non-uniform scalar grids: a fixed table of levels scaled per group, ``x_hat = scale · levels[code]``.

- ``gaussian``: the MSE-optimal (Lloyd–Max) grid for a standard normal variable at 2–8 bits, which is what
  rotated weights look like (HIGGS, Malinovskii et al. 2024). The levels are data, computed by
  ``python -m quantkit.grids.lloyd_max`` into ``gaussian_levels.json``.
- ``nf4``: QLoRA's NormalFloat4 levels (Dettmers et al. 2023), a quantile grid of the normal distribution.
- ``fp4``: the e2m1 floating-point values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign (LLM-FP4, OCP MX).

The scale of each group is fitted for the grid: the fp16 scale that minimizes the group's squared error among
candidates spread around the one that maps the group's largest magnitude to the grid's largest level.
Levels are rounded to fp16 once, here, because the format stores them in fp16: what a rounding method computes
is exactly what the packed model computes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from importlib import resources

import torch

from quantkit.grids.uniform import GridParams

__all__ = ["LevelGrid", "gaussian_levels", "NF4_LEVELS", "FP4_LEVELS"]

NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# e2m1: 15 distinct values; code 8 (negative zero) decodes to 0 like code 0 and is never produced.
FP4_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# Scale candidates, as multiples of absmax / max|level| (the scale that clips nothing).
_SHRINK = torch.linspace(0.5, 1.25, 31)


@functools.cache
def gaussian_levels(bits: int) -> tuple[float, ...]:
    """The Lloyd–Max levels of N(0, 1) at ``bits`` bits, from the data file."""
    table = json.loads((resources.files("quantkit.grids") / "gaussian_levels.json").read_text())
    try:
        return tuple(table["levels"][str(bits)])
    except KeyError:
        raise ValueError(f"no Gaussian grid for {bits} bits; the data file has {sorted(table['levels'])}") from None


@dataclass(frozen=True)
class LevelGrid:
    """A grid of ``2**bits`` levels (the code is the index into the table) with one scale per row and group."""

    name: str
    bits: int
    levels: tuple[float, ...]
    _table: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.levels) != 2**self.bits:
            raise ValueError(f"grid {self.name!r} needs {2**self.bits} levels for {self.bits} bits")
        object.__setattr__(self, "_table", torch.tensor(self.levels, dtype=torch.float16).float())

    @property
    def table(self) -> torch.Tensor:
        """The levels [2**bits] fp32 holding fp16 values, in code order."""
        return self._table

    @functools.cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, codes = torch.sort(self._table, stable=True)
        return values, codes, (values[1:] + values[:-1]) / 2

    def _round(self, y: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest levels to ``y`` (any shape), ties to the lower level."""
        values, codes, mids = (t.to(y.device) for t in self._sorted)
        return codes[torch.bucketize(y.contiguous(), mids)]

    def fit(self, W: torch.Tensor) -> GridParams:
        """Per-row fp16 scale of the group ``W`` [rows, g] minimizing ``‖W − scale · levels[codes]‖²``."""
        W = W.float()
        top = self._table.abs().max().item()
        absmax = W.abs().amax(dim=1).clamp(min=float(torch.finfo(torch.float16).tiny))
        cand = (absmax[:, None] / top * _SHRINK.to(W.device)[None, :]).to(torch.float16).float()
        cand = cand.clamp(min=float(torch.finfo(torch.float16).tiny))  # [rows, c]
        table = self._table.to(W.device)
        err = torch.empty_like(cand)
        for j in range(cand.shape[1]):  # a loop over candidates keeps memory at one [rows, g] tensor
            s = cand[:, j : j + 1]
            err[:, j] = (W - s * table[self._round(W / s)]).pow(2).sum(1)
        best = cand.gather(1, err.argmin(1, keepdim=True)).squeeze(1)
        return GridParams(scale=best, zero=torch.zeros_like(best))

    def quantize(self, x: torch.Tensor, params: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``x`` [rows] or [rows, k] onto the grid; returns ``(x_hat, codes)``."""
        scale = params.scale[:, None] if x.dim() == 2 else params.scale
        codes = self._round(x / scale)
        return scale * self._table.to(x.device)[codes], codes.to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: GridParams) -> torch.Tensor:
        scale = params.scale[:, None] if codes.dim() == 2 else params.scale
        return scale * self._table.to(codes.device)[codes.long()]
