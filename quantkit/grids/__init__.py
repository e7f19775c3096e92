"""Grids: the scalar value sets that rounding methods snap weights onto, registered by name.

A grid fits per-row parameters to a group of columns (``fit``), rounds onto itself (``quantize`` returning
``(x_hat, codes)``) and decodes codes (``decode``); the scalar quantizer (quantkit.quantizers.scalar) drives any
of them for RTN and GPTQ.
"""

from __future__ import annotations

from collections.abc import Callable

from quantkit.grids.levels import FP4_LEVELS, NF4_LEVELS, LevelGrid, gaussian_levels
from quantkit.grids.uniform import GridParams, UniformGrid

__all__ = ["GRIDS", "Grid", "GridParams", "LevelGrid", "UniformGrid", "make_grid", "register_grid"]

Grid = UniformGrid | LevelGrid

# name -> (factory(bits, symmetric, mse_clip), the bit widths it supports)
GRIDS: dict[str, tuple[Callable[[int, bool, bool], Grid], tuple[int, ...]]] = {}


def register_grid(name: str, bits: tuple[int, ...]):
    def wrap(factory: Callable[[int, bool, bool], Grid]) -> Callable[[int, bool, bool], Grid]:
        GRIDS[name] = (factory, bits)
        return factory

    return wrap


def make_grid(name: str, bits: int, symmetric: bool = False, mse_clip: bool = False) -> Grid:
    factory, supported = GRIDS[name]
    if bits not in supported:
        raise ValueError(f"grid {name!r} supports {', '.join(map(str, supported))} bits, not {bits}")
    return factory(bits, symmetric, mse_clip)


@register_grid("uniform", (2, 3, 4, 8))
def _uniform(bits: int, symmetric: bool, mse_clip: bool) -> Grid:
    return UniformGrid(bits, symmetric, mse_clip)


@register_grid("gaussian", (2, 3, 4, 8))
def _gaussian(bits: int, symmetric: bool, mse_clip: bool) -> Grid:
    return LevelGrid("gaussian", bits, gaussian_levels(bits))


@register_grid("nf4", (4,))
def _nf4(bits: int, symmetric: bool, mse_clip: bool) -> Grid:
    return LevelGrid("nf4", 4, NF4_LEVELS)


@register_grid("fp4", (4,))
def _fp4(bits: int, symmetric: bool, mse_clip: bool) -> Grid:
    return LevelGrid("fp4", 4, FP4_LEVELS)
