"""Grids: the scalar value sets that rounding methods snap weights onto."""

from __future__ import annotations

from quantkit.grids.uniform import GridParams, UniformGrid

__all__ = ["GridParams", "UniformGrid"]
