"""Scalar quantizers: one code per weight on a grid (quantkit.grids), one set of grid parameters per row and group
of ``group_size`` stored columns (the last group shorter when the input size is not a multiple).

Groups are fitted when the rounding reaches their first column, on the weights as the OBS updates have left them
(GPTQ's dynamic groups), or all at once before any update in original column order (``static_groups``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from quantkit.config.spec import Spec
from quantkit.errors import QuantkitError
from quantkit.grids import GRIDS, Grid, GridParams, LevelGrid, make_grid
from quantkit.quantizers import Window, register_quantizer
from quantkit.quantizers.groups import group_size_of, num_groups

__all__ = ["ScalarQuantizer", "ScalarSpec"]

_FP16_MAX = torch.finfo(torch.float16).max


@dataclasses.dataclass(frozen=True)
class ScalarSpec(Spec):
    """``name`` is the grid: ``uniform`` (affine integers; ``symmetric`` and ``mse_clip`` apply), ``gaussian``,
    ``nf4``, ``fp4`` (level tables with a fitted scale; ``symmetric`` is ignored, as in format versions 1–2)."""

    part = "quantizer"
    default_format: ClassVar[str] = "quantkit-uniform"
    name: str
    bits: int
    group_size: int = 128  # -1: one group per row
    symmetric: bool = False
    mse_clip: bool = False

    def validate(self) -> None:
        if self.name not in GRIDS:
            raise self.bad("name", f"unknown grid; known: {', '.join(sorted(GRIDS))}")
        supported = GRIDS[self.name].bits
        if self.bits not in supported:
            raise self.bad("bits", f"unsupported bit width; grid {self.name!r} supports "
                           f"{', '.join(map(str, supported))} bits")
        if not (self.group_size == -1 or self.group_size >= 8):
            raise self.bad("group_size", "must be -1 (per channel) or an integer >= 8")
        if self.mse_clip and "mse_clip" not in GRIDS[self.name].options:
            raise self.bad("mse_clip", f"applies to the uniform grid; {self.name!r} always fits its scale by "
                           "squared error")

    def build(self, *, static_groups: bool = False) -> ScalarQuantizer:
        return ScalarQuantizer(make_grid(self.name, self.bits, self.symmetric, self.mse_clip), self.group_size,
                               static_groups=static_groups)


for _name in ("uniform", "gaussian", "nf4", "fp4"):
    register_quantizer(_name)(ScalarSpec)


class ScalarQuantizer:
    codesz = 1
    code_dtype = torch.uint8
    shared_params = ("levels",)

    def __init__(self, grid: Grid, group_size: int, *, static_groups: bool = False):
        self.grid = grid
        self.group_size = group_size
        self.static_groups = static_groups
        self._g = 0
        self._perm: torch.Tensor | None = None
        self._groups: list[GridParams | None] = []
        self._current: GridParams | None = None

    def prepare(self, W: torch.Tensor, H: torch.Tensor | None = None, perm: torch.Tensor | None = None) -> None:
        n = W.shape[1]
        self._g = group_size_of(self.group_size, n)
        self._perm = perm
        if self.static_groups:
            self._groups = [self._fit(W[:, c : c + self._g]) for c in range(0, n, self._g)]
        else:
            self._groups = [None] * num_groups(self.group_size, n)

    def _params_at(self, col: int, window: Window | None) -> GridParams:
        if self.static_groups:
            return self._groups[(self._perm[col].item() if self._perm is not None else col) // self._g]
        if col % self._g == 0 and window is not None:
            # The group may run past the caller's block: later columns already carry the earlier blocks' updates.
            self._groups[col // self._g] = self._fit(window(self._g))
        return self._groups[col // self._g]

    def _fit(self, W: torch.Tensor) -> GridParams:
        """The grid's fit of one group ``W`` [rows, g], refused when its scales are not finite: a range that an fp16
        scale cannot hold (past 65504 per grid step) would be stored as inf and decode to NaN."""
        if not torch.isfinite(W).all():
            bad = W[~torch.isfinite(W)]
            raise QuantkitError(f"{bad.numel()} non-finite values ({_kinds(bad)}) in a group of weights being "
                                "rounded (made so by the rounding method's updates); refusing to quantize")
        params = self.grid.fit(W)
        if not (torch.isfinite(params.scale).all() and torch.isfinite(params.zero).all()):
            reach = W.abs().max().item()
            raise QuantkitError(
                f"weight values up to {reach:.4g} overflow the float16 scales of the {self.grid.bits}-bit "
                f"{getattr(self.grid, 'name', 'uniform')} grid (a scale, one grid step, is at most {_FP16_MAX:g}); "
                "refusing to quantize"
            )
        return params

    def quantize(self, x: torch.Tensor, col: int, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        return self.grid.quantize(x, self._params_at(col, window))

    def decode(self, codes: torch.Tensor, col: int) -> torch.Tensor:
        return self.grid.decode(codes, self._params_at(col, None))

    def params(self) -> dict[str, torch.Tensor]:
        out = {"scales": torch.stack([p.scale for p in self._groups], 1),
               "zeros": torch.stack([p.zero for p in self._groups], 1)}
        if isinstance(self.grid, LevelGrid):
            out["levels"] = self.grid.table
        return out


def _kinds(x: torch.Tensor) -> str:
    """``nan, inf, -inf``: which non-finite values ``x`` holds."""
    kinds = [k for k, hit in (("nan", torch.isnan(x)), ("inf", torch.isposinf(x)), ("-inf", torch.isneginf(x)))
             if hit.any()]
    return ", ".join(kinds)
