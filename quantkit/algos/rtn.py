"""Round to nearest, group by group: the baseline every other method must beat."""

from __future__ import annotations

import torch

from quantkit.algos import QuantResult, register_method
from quantkit.algos.groups import group_size_of
from quantkit.grids import Grid, grid_for

__all__ = ["rtn"]


def rtn(W: torch.Tensor, grid: Grid, *, group_size: int) -> QuantResult:
    """W: [out, in]. Each group of columns gets its own per-row grid parameters."""
    W = W.float()
    g = group_size_of(group_size, W.shape[1])
    codes, scales, zeros, W_hat = [], [], [], []
    for c in range(0, W.shape[1], g):
        params = grid.fit(W[:, c : c + g])
        q, k = grid.quantize(W[:, c : c + g], params)
        codes.append(k)
        W_hat.append(q)
        scales.append(params.scale)
        zeros.append(params.zero)
    return QuantResult(
        codes=torch.cat(codes, 1),
        scales=torch.stack(scales, 1),
        zeros=torch.stack(zeros, 1),
        perm=None,
        W_hat=torch.cat(W_hat, 1),
    )


@register_method("rtn", needs_hessian=False)
def _rtn_method(W: torch.Tensor, H: torch.Tensor | None, scheme) -> QuantResult:
    return rtn(W, grid_for(scheme), group_size=scheme.group_size)
