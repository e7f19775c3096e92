"""Rotations applied before rounding: fused into the stored weight, undone online in the forward."""

from __future__ import annotations

from quantkit.rotations.hadamard import HadamardLayout, fwht, hadamard_layout, hadamard_matrix
from quantkit.rotations.randomized import HadamardRotation, hadamard_transform, random_signs

__all__ = ["HadamardLayout", "HadamardRotation", "fwht", "hadamard_layout", "hadamard_matrix",
           "hadamard_transform", "random_signs"]
