"""The one OBS loop (quantkit.algos.gptq) with vector codes: ``codesz`` columns rounded jointly, their error fed
forward through the block of the inverse Hessian's Cholesky factor (LDLQ). Checked against a plain,
column-block-at-a-time implementation of the same update, written here without lazy batching."""

from __future__ import annotations

import pytest
import torch

from quantkit.algos.gptq import gptq, inverse_hessian_factor
from quantkit.algos.hessian import output_error
from quantkit.algos.rtn import rtn


class PairQuantizer:
    """Two columns per code: each coordinate on a symmetric 4-bit grid with one scale per row, the pair's two
    4-bit indices packed into one 8-bit code. (A Cartesian-product codebook: the simplest vector quantizer.)"""

    codesz = 2
    group_size = -1
    code_dtype = torch.uint8
    shared_params = ()

    def prepare(self, W, H, perm):
        self.scale = (W.abs().amax(1, keepdim=True) / 7).clamp(min=1e-8)

    def quantize(self, x, col, window):
        idx = torch.clamp(torch.round(x / self.scale), -8, 7) + 8  # [rows, k]
        pairs = idx.view(x.shape[0], -1, 2)
        codes = (pairs[..., 0] + 16 * pairs[..., 1]).to(torch.uint8)
        return self.decode(codes, col), codes

    def decode(self, codes, col):
        c = codes.long()
        idx = torch.stack([c % 16, c // 16], -1).reshape(c.shape[0], -1)
        return (idx - 8).float() * self.scale

    def params(self):
        return {"scales": self.scale}


def _problem(out=24, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    return W, 2 * X.T @ X / X.shape[0]


def _reference(W, H, q, damp):
    """Block OBS, eagerly: round ``c`` columns, E = Δ U_bb⁻¹, W_rest -= E U_b,rest."""
    W = W.clone()
    q.prepare(W, H, None)
    U, _ = inverse_hessian_factor(H, damp)
    c, n = q.codesz, W.shape[1]
    codes, Q = [], torch.zeros_like(W)
    for j in range(0, n, c):
        Q[:, j : j + c], k = q.quantize(W[:, j : j + c], j, lambda m, j=j: W[:, j : j + m])
        codes.append(k)
        E = torch.linalg.solve_triangular(U[j : j + c, j : j + c], W[:, j : j + c] - Q[:, j : j + c], upper=True,
                                          left=False)
        W[:, j + c :] -= E @ U[j : j + c, j + c :]
    return torch.cat(codes, 1), Q


@pytest.mark.parametrize("block_size", [2, 16, 64])
def test_vector_codes_follow_the_block_obs_update(block_size):
    W, H = _problem()
    r = gptq(W, H, PairQuantizer(), block_size=block_size)
    codes, Q = _reference(W, H, PairQuantizer(), 0.01)
    assert r.codes.shape == (24, 32) and r.codes.dtype == torch.uint8
    assert torch.equal(r.codes, codes)
    torch.testing.assert_close(r.W_hat, Q)
    # Second-order feedback pays on its own objective, and its loss estimate tracks it.
    base = rtn(W, PairQuantizer())
    assert output_error(W, r.W_hat, H) < 0.9 * output_error(W, base.W_hat, H)
    assert r.loss == pytest.approx(output_error(W, r.W_hat, H) / 2, rel=0.25)


class TripleQuantizer(PairQuantizer):
    """Three columns per code, each on the same 4-bit grid: a 12-bit code."""

    codesz = 3
    code_dtype = torch.int32

    def quantize(self, x, col, window):
        idx = torch.clamp(torch.round(x / self.scale), -8, 7) + 8
        t = idx.view(x.shape[0], -1, 3).long()
        codes = (t[..., 0] + 16 * t[..., 1] + 256 * t[..., 2]).to(torch.int32)
        return self.decode(codes, col), codes

    def decode(self, codes, col):
        c = codes.long()
        idx = torch.stack([c % 16, c // 16 % 16, c // 256], -1).reshape(c.shape[0], -1)
        return (idx - 8).float() * self.scale


@pytest.mark.parametrize("block_size", [16, 128])
def test_codes_wider_than_a_block_boundary_keep_whole_codes_in_a_block(block_size):
    """Blocks that 3-column codes do not tile (16, the default 128) shrink to whole codes (15, 126): the lazy
    batching changes only rounding, so the result is the eager update's."""
    W, H = _problem(n=192)
    r = gptq(W, H, TripleQuantizer(), block_size=block_size)
    codes, Q = _reference(W, H, TripleQuantizer(), 0.01)
    assert r.codes.shape == (24, 64)
    assert torch.equal(r.codes, codes)
    torch.testing.assert_close(r.W_hat, Q)


def test_vector_codes_with_act_order_and_row_blocks():
    W, H = _problem(seed=1)
    q = PairQuantizer()
    r = gptq(W, H, q, act_order=True)
    # Codes are in processing (stored) order: they decode to the weight's columns in that order.
    assert r.perm is not None and torch.equal(q.decode(r.codes, 0), r.W_hat[:, r.perm])
    heads = torch.stack([H, H + torch.eye(64)])
    rb = gptq(W, heads, PairQuantizer(), act_order=True)
    assert rb.codes.shape == (24, 32) and rb.params["scales"].shape == (24, 1)


def test_codes_must_tile_the_columns():
    W, H = _problem(n=64)
    with pytest.raises(Exception, match="do not tile"):
        gptq(W[:, :63], H[:63, :63], PairQuantizer())
