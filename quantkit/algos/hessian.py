"""Calibration statistics: the layer-input Hessian ``H = 2 X Xᵀ / n`` of a linear's least-squares objective."""

from __future__ import annotations

import torch

__all__ = ["HessianAccumulator", "output_error"]


class HessianAccumulator:
    """Accumulates ``Σ x xᵀ`` over calibration tokens (fp32 products, float64 running sum)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.S = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, X: torch.Tensor) -> None:
        X = X.reshape(-1, X.shape[-1]).float()
        self.S += (X.T @ X).double()
        self.n += X.shape[0]

    @property
    def H(self) -> torch.Tensor:
        if self.n == 0:
            raise ValueError("no calibration tokens were accumulated")
        return (2.0 / self.n * self.S).float()


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr(ΔW H ΔWᵀ)`` = ``(2/n) ‖(W − Ŵ) X‖²``: the layer objective GPTQ minimizes, for any method.
    ``H`` [h, in, in] holds one Hessian per block of ``out / h`` consecutive rows."""
    D = (W.float() - W_hat.float()).double()
    if H.dim() == 3:
        D = D.reshape(H.shape[0], -1, D.shape[1])
        return torch.einsum("hoi,hij,hoj->", D, H.double(), D).item()
    return torch.einsum("oi,ij,oj->", D, H.double(), D).item()
