"""Round to nearest, group by group: the baseline every other method must beat."""

from __future__ import annotations

import torch

from quantkit.algos import QuantResult, register_method
from quantkit.quantizers import Quantizer
from quantkit.quantizers.groups import group_size_of

__all__ = ["rtn"]


def rtn(W: torch.Tensor, quantizer: Quantizer) -> QuantResult:
    """W: [out, in]. Each group of columns (``quantizer.group_size``) is fitted and rounded in one call."""
    W = W.float()
    quantizer.prepare(W, None, None)
    g = group_size_of(quantizer.group_size, W.shape[1])
    codes, W_hat = [], []
    for c in range(0, W.shape[1], g):
        q, k = quantizer.quantize(W[:, c : c + g], c, lambda n, c=c: W[:, c : c + n])
        codes.append(k)
        W_hat.append(q)
    return QuantResult(codes=torch.cat(codes, 1), W_hat=torch.cat(W_hat, 1), params=quantizer.params())


@register_method("rtn", needs_hessian=False)
def _rtn_method(W: torch.Tensor, H: torch.Tensor | None, scheme) -> QuantResult:
    return rtn(W, scheme.quantizer.build())
