"""GPTQ: second-order (OBS) rounding with lazy block updates, for any quantizer.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2022),
building on Optimal Brain Compression (Frantar & Alistarh, 2022). Columns are rounded in (optionally
activation-ordered) sequence, ``codesz`` at a time (one for scalar grids, ``d`` for a vector codebook, as LDLQ in
QuIP# and the second-order feedback of VPTQ/AQLM); each block's rounding error is spread over the not-yet-rounded
columns through the upper Cholesky factor ``U`` of the inverse Hessian, and updates to far columns are batched
per lazy block. The quantizer is injected (quantkit.quantizers), so this is the one loop every quantizer uses.
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

from quantkit.algos import QuantResult, register_method
from quantkit.errors import QuantkitError
from quantkit.quantizers import Quantizer

__all__ = ["gptq", "inverse_hessian_factor", "reuse_factors"]

logger = logging.getLogger(__name__)


class _Factors:
    """The last ``size`` factors computed, with the ``H`` and damping each came from (see :func:`reuse_factors`)."""

    def __init__(self, size: int):
        self.size, self.entries = size, []

    def get(self, H: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
        for Hc, d, (U, used) in self.entries:
            if d == damp and Hc.shape == H.shape and Hc.dtype == H.dtype and Hc.device == H.device \
                    and torch.equal(Hc, H):
                return U.clone(), used
        U, used = _inverse_hessian_factor(H, damp, retries)
        self.entries = [(H.clone(), damp, (U.clone(), used)), *self.entries][: self.size]
        return U, used


_reused: _Factors | None = None


@contextlib.contextmanager
def reuse_factors(size: int = 4):
    """Inside the block, :func:`inverse_hessian_factor` returns the factor it already computed for an equal
    ``H`` (compared exactly, element by element) and damping, among the last ``size`` it computed. For callers that
    round one layer many ways (the allocation's measurement tries every candidate on each linear): the factor is
    an O(n³) float64 computation, the comparison O(n²). Results are those of a fresh computation, bit for bit."""
    global _reused
    outer, _reused = _reused, _Factors(size)
    try:
        yield
    finally:
        _reused = outer


def inverse_hessian_factor(H: torch.Tensor, damp: float, *, retries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``.

    If ``H + λI`` is not numerically positive definite, retry with ten times the damping. Computed in float64
    (cheap at these sizes) so the factor is as stable as the data allows. Returns the factor and the damping used.
    """
    if _reused is not None:
        return _reused.get(H, damp, retries)
    return _inverse_hessian_factor(H, damp, retries)


def _inverse_hessian_factor(H: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    H = H.double()
    mean_diag = torch.diagonal(H).mean().item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(retries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info.item() == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info.item() == 0:
                return U.float(), damp
        logger.warning("Cholesky failed with damp=%g; retrying with %g (attempt %d)", damp, damp * 10, attempt + 1)
        damp *= 10
    raise QuantkitError(f"Hessian is not positive definite even with relative damping {damp / 10:g}")


def gptq(
    W: torch.Tensor,  # [out, in]
    H: torch.Tensor,  # [in, in], 2 X Xᵀ / n
    quantizer: Quantizer,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    perm: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize ``W`` against ``H``. ``H`` may also be [h, in, in]: one Hessian per block of ``out / h``
    consecutive rows (the attention-weighted value projections), each with a copy of ``quantizer``; the blocks
    then share one act-order permutation, from the summed diagonals, so the packed layer keeps a single one.
    ``perm`` overrides the act-order permutation (``act_order`` must be set)."""
    if perm is not None and not act_order:
        raise ValueError("a column permutation is only used with act_order")
    if H.dim() == 3:
        return _gptq_row_blocks(W, H, quantizer, block_size=block_size, damp=damp, act_order=act_order, perm=perm)
    if not torch.isfinite(H).all():
        raise QuantkitError("the Hessian has non-finite values (NaN or inf in the calibration activations)")
    if not torch.isfinite(W).all():
        raise QuantkitError("the weight has non-finite values")
    W = W.clone().float()
    H = H.clone().float()
    n, c = W.shape[1], quantizer.codesz
    if n % c:
        raise QuantkitError(f"{c}-column codes do not tile the {n} columns")
    # Lazy blocks only batch the updates (the result is the same up to rounding), so a block holds whole codes:
    # 126 columns for 3-column codes and the default 128.
    block_size = max(c, block_size // c * c)

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if act_order and perm is None:
        perm = _act_order(H)
    quantizer.prepare(W, H, perm)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, _ = inverse_hessian_factor(H, damp)

    codes = torch.zeros(n // c, W.shape[0], dtype=quantizer.code_dtype, device=W.device)  # transposed while filling
    Q = torch.zeros(n, W.shape[0], device=W.device)
    losses = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)

    # The inner loop works on transposed blocks so that a column of W is a contiguous row in memory.
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].T.contiguous()  # [b, out]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]

        def window(k: int, i: int, W1: torch.Tensor = W1, i2: int = i2) -> torch.Tensor:
            """Current weights of stored columns [i1 + i, i1 + i + k): the block's, then those after it."""
            return W1[i : i + k].T if i + k <= W1.shape[0] else torch.cat([W1[i:].T, W[:, i2:]], 1)[:, :k]

        for i in range(0, i2 - i1, c):
            col = i1 + i
            w = W1[i : i + c]  # [c, out]
            q, k = quantizer.quantize(w.T, col, lambda m, i=i: window(m, i))
            q = q.T
            Q[col : col + c] = q
            codes[col // c] = k.reshape(-1)
            if c == 1:
                err = (w - q) / U1[i, i]
            else:  # the block's error in the basis where U is the identity: E U_bb⁻¹ (LDLQ)
                err = torch.linalg.solve_triangular(U1[i : i + c, i : i + c].T, w - q, upper=False)
            losses += (err.double() ** 2).sum(0) / 2
            W1[i:].sub_(U1[i : i + c, i:].T @ err if c > 1 else torch.outer(U1[i, i:], err[0]))
            Err1[i : i + c] = err
        W[:, i2:] -= Err1.T @ U[i1:i2, i2:]

    Q, codes = Q.T, codes.T.contiguous()
    W_hat = Q.contiguous()
    if perm is not None:
        W_hat = Q[:, torch.argsort(perm)].contiguous()
        if getattr(quantizer, "static_groups", False):
            # Static groups live in original column order: store in that order, no permutation.
            codes, perm = codes[:, torch.argsort(perm)], None
    return QuantResult(codes=codes, W_hat=W_hat, params=quantizer.params(), perm=perm, loss=losses.sum().item())


def _act_order(H: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing Hessian diagonal (ties keep their order, so the result is deterministic)."""
    return torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), descending=True, stable=True)


def _gptq_row_blocks(W: torch.Tensor, H: torch.Tensor, quantizer: Quantizer, *, perm, act_order, **kw) -> QuantResult:
    h = H.shape[0]
    if W.shape[0] % h:
        raise QuantkitError(f"{h} Hessians do not split the {W.shape[0]} rows evenly")
    if act_order and perm is None:
        perm = _act_order(H.sum(0))
    rows = W.shape[0] // h
    parts = [gptq(W[i * rows : (i + 1) * rows], H[i], copy.deepcopy(quantizer), act_order=act_order, perm=perm, **kw)
             for i in range(h)]
    for k in set(quantizer.shared_params) & set(parts[0].params):
        if not all(torch.equal(p.params[k], parts[0].params[k]) for p in parts):
            raise QuantkitError(f"per-head Hessians fitted {h} different '{k}' tensors; the format stores one")
    params = {k: v if k in quantizer.shared_params else torch.cat([p.params[k] for p in parts])
              for k, v in parts[0].params.items()}
    return QuantResult(codes=torch.cat([p.codes for p in parts]), W_hat=torch.cat([p.W_hat for p in parts]),
                       params=params, perm=parts[0].perm, loss=sum(p.loss for p in parts))


@register_method("gptq", needs_hessian=True)
def _gptq_method(W: torch.Tensor, H: torch.Tensor | None, scheme) -> QuantResult:
    if H is None:
        raise QuantkitError("gptq needs calibration statistics (a Hessian)")
    m = scheme.method
    return gptq(W, H, scheme.quantizer.build(static_groups=m.static_groups), block_size=m.block_size, damp=m.damp,
                act_order=m.act_order)
