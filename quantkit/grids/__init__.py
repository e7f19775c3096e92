"""Grids: the scalar value sets that rounding snaps weights onto, registered by name.

A grid fits per-row parameters to a group of columns (``fit``), rounds onto itself (``quantize`` returning
``(x_hat, codes)``) and decodes codes (``decode``); the scalar quantizer (quantkit.quantizers.scalar) drives any
of them for RTN and GPTQ. A grid registers its factory with the bit widths it supports and the options it takes
(``symmetric`` and ``mse_clip`` for the uniform grid; none for the level tables).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from quantkit.grids.levels import FP4_LEVELS, NF4_LEVELS, LevelGrid, gaussian_levels
from quantkit.grids.uniform import GridParams, UniformGrid

__all__ = ["FP4_LEVELS", "GRIDS", "Grid", "GridEntry", "GridParams", "LevelGrid", "NF4_LEVELS", "UniformGrid",
           "gaussian_levels", "make_grid", "register_grid"]


class Grid(Protocol):
    bits: int

    def fit(self, W: torch.Tensor) -> GridParams:
        """Per-row parameters of the group ``W`` [rows, g]."""

    def quantize(self, x: torch.Tensor, params: GridParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``x`` [rows] or [rows, k]: ``(x_hat, codes)``."""

    def decode(self, codes: torch.Tensor, params: GridParams) -> torch.Tensor: ...


@dataclass(frozen=True)
class GridEntry:
    factory: Callable[..., Grid]  # (bits, **options) -> Grid
    bits: tuple[int, ...]  # the bit widths it supports
    options: tuple[str, ...] = ()  # the options it takes


GRIDS: dict[str, GridEntry] = {}


def register_grid(name: str, bits: tuple[int, ...], options: tuple[str, ...] = ()):
    def wrap(factory: Callable[..., Grid]) -> Callable[..., Grid]:
        GRIDS[name] = GridEntry(factory, bits, options)
        return factory

    return wrap


def make_grid(name: str, bits: int, symmetric: bool = False, mse_clip: bool = False, **options: Any) -> Grid:
    """The grid ``name`` at ``bits``; options it does not take (``symmetric`` for a level table) are ignored."""
    entry = GRIDS[name]
    if bits not in entry.bits:
        raise ValueError(f"grid {name!r} supports {', '.join(map(str, entry.bits))} bits, not {bits}")
    options = {"symmetric": symmetric, "mse_clip": mse_clip, **options}
    return entry.factory(bits, **{k: v for k, v in options.items() if k in entry.options})


@register_grid("uniform", (2, 3, 4, 8), options=("symmetric", "mse_clip"))
def _uniform(bits: int, symmetric: bool = False, mse_clip: bool = False) -> Grid:
    return UniformGrid(bits, symmetric, mse_clip)


@register_grid("gaussian", (2, 3, 4, 8))
def _gaussian(bits: int) -> Grid:
    return LevelGrid("gaussian", bits, gaussian_levels(bits))


@register_grid("nf4", (4,))
def _nf4(bits: int) -> Grid:
    return LevelGrid("nf4", 4, NF4_LEVELS)


@register_grid("fp4", (4,))
def _fp4(bits: int) -> Grid:
    return LevelGrid("fp4", 4, FP4_LEVELS)
