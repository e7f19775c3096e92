"""Non-uniform scalar grids: a fixed table of levels scaled per group, ``x_hat = scale · levels[code]``.

- ``gaussian``: the MSE-optimal (Lloyd–Max) grid for a standard normal variable at 2–8 bits, which is what
  rotated weights look like (HIGGS, Malinovskii et al. 2024). The levels are data, computed by
  ``python -m benchmarks.lloyd_max`` into ``gaussian_levels.json``.
- ``nf4``: QLoRA's NormalFloat4 levels (Dettmers et al. 2023), a quantile grid of the normal distribution.
- ``fp4``: the e2m1 floating-point values {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign (LLM-FP4, OCP MX).

The scale of each group is fitted for the grid, to the group's squared error (``LevelGrid.fit``).
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

# Least-squares refinements of the scale after the starting points (each costs one rounding of the group).
_FIT_STEPS = 2


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
    def _lookup(self) -> dict[str, torch.Tensor | float]:
        """Tables for rounding in O(1) per value: a fine uniform partition of the levels' range in which each bin
        holds at most one decision boundary (midpoint), so the bin's first candidate plus one comparison give the
        nearest level (a binary search per value, ``torch.bucketize``, is several times slower on CPU)."""
        values, codes = torch.sort(self._table.double(), stable=True)
        mids = (values[1:] + values[:-1]) / 2
        lo, hi = values[0].item(), values[-1].item()
        gaps = (mids[1:] - mids[:-1]).clamp(min=0)
        min_gap = gaps[gaps > 0].min().item() if (gaps > 0).any() else hi - lo
        nbins = max(1, min(1 << 16, int(2 * (hi - lo) / min_gap) + 1))
        width = (hi - lo) / nbins
        first = torch.bucketize(lo + width * torch.arange(nbins, dtype=torch.float64), mids)
        return {"first": first, "mids": torch.cat([mids, mids.new_tensor([float("inf")])]).float(),
                "codes": codes, "values": values.float(), "lo": lo, "inv_width": 1 / width}

    def _index(self, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Index, in ascending level order, of the nearest level to each value of ``y``; ties to the lower."""
        t = {k: v.to(y.device) if torch.is_tensor(v) else v for k, v in self._lookup.items()}
        # Clamped to [0, nbins - 1] first, so truncation is the floor.
        b = (y - t["lo"]).mul_(t["inv_width"]).clamp_(0, t["first"].numel() - 1).long()
        idx = t["first"][b]
        return idx.add_(y > t["mids"][idx]), t

    def _round(self, y: torch.Tensor) -> torch.Tensor:
        """Codes of the nearest levels to ``y`` (any shape), ties to the lower level."""
        idx, t = self._index(y)
        return t["codes"][idx]

    def fit(self, W: torch.Tensor) -> GridParams:
        """Per-row fp16 scale of the group ``W`` [rows, g], fitted to ``‖W − scale · levels[codes]‖²``.

        Alternating minimization, as Lloyd's algorithm: round with the scale, then set the scale to the least-squares
        one for those codes, ``⟨w, l⟩ / ⟨l, l⟩``. It starts from the better of the scale that clips nothing
        (absmax over the largest level) and, for the Gaussian grid, the group's RMS (the grid is fitted to N(0, 1)).
        The best scale seen is kept, so the result is never worse than a start.
        """
        W = W.float()
        starts = [W.abs().amax(dim=1) / self._table.abs().max()]
        if self.name == "gaussian":
            starts.append(W.pow(2).mean(dim=1).sqrt())
        best_s = best_err = best_q = None
        for s in starts:
            s, q, err = self._evaluate(W, s)
            if best_s is None:
                best_s, best_err, best_q = s, err, q
            else:
                better = err < best_err
                best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
                best_q = torch.where(better[:, None], q, best_q)
        q = best_q
        for _ in range(_FIT_STEPS):
            qq = q.pow(2).sum(1)
            s = torch.where(qq > 0, (W * q).sum(1) / qq.clamp(min=1e-30), best_s)  # least squares for these codes
            s, q, err = self._evaluate(W, torch.where(s > 0, s, best_s))
            better = err < best_err
            best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
        return GridParams(scale=best_s, zero=torch.zeros_like(best_s))

    def _evaluate(self, W: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The scale rounded to fp16 (as stored), the levels W rounds to with it [rows, g], and the error [rows]."""
        s = s.to(torch.float16).float().clamp(min=float(torch.finfo(torch.float16).tiny))
        idx, t = self._index(W / s[:, None])
        q = t["values"][idx]
        return s, q, (W - s[:, None] * q).pow(2).sum(1)

    def quantize(self, x: torch.Tensor, params: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``x`` [rows] or [rows, k] onto the grid; returns ``(x_hat, codes)``."""
        scale = params.scale[:, None] if x.dim() == 2 else params.scale
        codes = self._round(x / scale)
        return scale * self._table.to(x.device)[codes], codes.to(torch.uint8)

    def decode(self, codes: torch.Tensor, params: GridParams) -> torch.Tensor:
        scale = params.scale[:, None] if codes.dim() == 2 else params.scale
        return scale * self._table.to(codes.device)[codes.long()]
