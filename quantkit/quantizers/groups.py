"""Group bookkeeping shared by rounding methods: contiguous groups of ``group_size`` stored columns,
the last one shorter when the input dimension is not a multiple (SmolLM2: 576 = 4 * 128 + 64)."""

from __future__ import annotations

import torch

__all__ = ["group_size_of", "num_groups", "expand_groups"]


def group_size_of(group_size: int, in_features: int) -> int:
    return in_features if group_size == -1 else group_size


def num_groups(group_size: int, in_features: int) -> int:
    g = group_size_of(group_size, in_features)
    return (in_features + g - 1) // g


def expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[out, ngroups] -> [out, in_features], each group's value repeated over its columns."""
    g = group_size_of(group_size, in_features)
    return t.repeat_interleave(g, dim=1)[:, :in_features]
