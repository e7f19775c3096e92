"""GPTQ: second-order (OBS) rounding with lazy block updates.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers" (2022),
building on Optimal Brain Compression (Frantar & Alistarh, 2022). Columns are rounded one at a time in
(optionally activation-ordered) sequence; each rounding error is spread over the not-yet-rounded columns
through the upper Cholesky factor of the inverse Hessian, and updates to far columns are batched per block.
The grid is injected, so the same loop serves any scalar grid.
"""

from __future__ import annotations

import logging

import torch

from quantkit.algos import QuantResult, register_method
from quantkit.algos.groups import group_size_of, num_groups
from quantkit.errors import QuantkitError
from quantkit.grids import Grid, GridParams, grid_for

__all__ = ["gptq", "inverse_hessian_factor"]

logger = logging.getLogger(__name__)


def inverse_hessian_factor(H: torch.Tensor, damp: float, *, retries: int = 6) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``.

    If ``H + λI`` is not numerically positive definite, retry with ten times the damping. Computed in float64
    (cheap at these sizes) so the factor is as stable as the data allows. Returns the factor and the damping used.
    """
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
    grid: Grid,
    *,
    group_size: int = 128,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    perm: torch.Tensor | None = None,
) -> QuantResult:
    """Quantize ``W`` column by column against ``H``. ``H`` may also be [h, in, in]: one Hessian per block of
    ``out / h`` consecutive rows (the attention-weighted value projections); the blocks then share one
    act-order permutation, from the summed diagonals, so the packed layer keeps a single one. ``perm``
    overrides the act-order permutation (``act_order`` must be set)."""
    if perm is not None and not act_order:
        raise ValueError("a column permutation is only used with act_order")
    if H.dim() == 3:
        return _gptq_row_blocks(W, H, grid, group_size=group_size, block_size=block_size, damp=damp,
                                act_order=act_order, static_groups=static_groups, perm=perm)
    if not torch.isfinite(H).all():
        raise QuantkitError("the Hessian has non-finite values (NaN or inf in the calibration activations)")
    if not torch.isfinite(W).all():
        raise QuantkitError("the weight has non-finite values")
    W = W.clone().float()
    H = H.clone().float()
    n = W.shape[1]
    g = group_size_of(group_size, n)

    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    static = [grid.fit(W[:, c : c + g]) for c in range(0, n, g)] if static_groups else None
    if act_order and perm is None:
        perm = _act_order(H)
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, _ = inverse_hessian_factor(H, damp)

    codes = torch.zeros(n, W.shape[0], dtype=torch.uint8, device=W.device)  # transposed while filling
    Q = torch.zeros(n, W.shape[0], device=W.device)
    losses = torch.zeros(W.shape[0], dtype=torch.float64, device=W.device)
    fitted: list[GridParams | None] = [None] * num_groups(group_size, n)
    params: GridParams | None = None

    # The inner loop works on transposed blocks so that a column of W is a contiguous row in memory.
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].T.contiguous()  # [b, out]
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static is not None:
                params = static[(perm[col].item() if perm is not None else col) // g]
            elif col % g == 0:
                # The group may run past this block: later columns already carry the earlier blocks' updates.
                group = W1[i : i + g].T if i + g <= i2 - i1 else torch.cat([W1[i:].T, W[:, i2:]], 1)[:, :g]
                params = grid.fit(group)
                fitted[col // g] = params
            w = W1[i]
            d = U1[i, i]
            q, k = grid.quantize(w, params)
            Q[col] = q
            codes[col] = k
            err = (w - q) / d
            losses += (err.double() ** 2) / 2
            W1[i:].sub_(torch.outer(U1[i, i:], err))
            Err1[i] = err
        W[:, i2:] -= Err1.T @ U[i1:i2, i2:]

    Q, codes = Q.T, codes.T.contiguous()
    groups = static if static is not None else fitted
    scales = torch.stack([p.scale for p in groups], 1)
    zeros = torch.stack([p.zero for p in groups], 1)
    W_hat = Q.contiguous()
    stored_perm = None
    if perm is not None:
        inv = torch.argsort(perm)
        W_hat = Q[:, inv].contiguous()
        if static_groups:
            codes = codes[:, inv]  # groups live in original order: store in original order, no permutation
        else:
            stored_perm = perm
    return QuantResult(codes=codes, scales=scales, zeros=zeros, perm=stored_perm, W_hat=W_hat, loss=losses.sum().item())


def _act_order(H: torch.Tensor) -> torch.Tensor:
    """Columns by decreasing Hessian diagonal (ties keep their order, so the result is deterministic)."""
    return torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), descending=True, stable=True)


def _gptq_row_blocks(W: torch.Tensor, H: torch.Tensor, grid: Grid, *, perm, act_order, **kw) -> QuantResult:
    h = H.shape[0]
    if W.shape[0] % h:
        raise QuantkitError(f"{h} Hessians do not split the {W.shape[0]} rows evenly")
    if act_order and perm is None:
        perm = _act_order(H.sum(0))
    rows = W.shape[0] // h
    parts = [gptq(W[i * rows : (i + 1) * rows], H[i], grid, act_order=act_order, perm=perm, **kw) for i in range(h)]
    return QuantResult(
        codes=torch.cat([p.codes for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=torch.cat([p.zeros for p in parts]),
        perm=parts[0].perm,
        W_hat=torch.cat([p.W_hat for p in parts]),
        loss=sum(p.loss for p in parts),
    )


@register_method("gptq", needs_hessian=True)
def _gptq_method(W: torch.Tensor, H: torch.Tensor | None, scheme) -> QuantResult:
    if H is None:
        raise QuantkitError("gptq needs calibration statistics (a Hessian)")
    return gptq(
        W,
        H,
        grid_for(scheme),
        group_size=scheme.group_size,
        block_size=scheme.block_size,
        damp=scheme.damp,
        act_order=scheme.act_order,
        static_groups=scheme.static_groups,
    )
