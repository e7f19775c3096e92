"""Rounding methods on a small layer with a known Hessian: GPTQ must beat round-to-nearest on ‖(W−Q)X‖²."""

import pytest
import torch

from quantkit.algos import get_method
from quantkit.algos import gptq as gptq_module
from quantkit.algos.gptq import gptq, inverse_hessian_factor, reuse_factors
from quantkit.algos.hessian import HessianAccumulator, output_error
from quantkit.algos.rtn import rtn
from quantkit.config import LayerScheme
from quantkit.errors import QuantkitError
from quantkit.formats import get_format
from quantkit.grids import UniformGrid
from quantkit.quantizers.scalar import ScalarQuantizer


def Q(grid, group_size):
    return ScalarQuantizer(grid, group_size)


def _layer(out=48, n=160, tokens=2048, seed=0):
    """A weight with a few outlier input channels and correlated activations, like real layers."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * 0.05
    mix = torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    X = torch.randn(tokens, n, generator=g) @ mix
    X[:, :4] *= 8.0  # outlier channels
    acc = HessianAccumulator(n)
    acc.add(X)
    return W, X, acc.H


def _packed_weight(result, scheme, n):
    fmt = get_format(scheme.format)
    return fmt.dequantize(fmt.pack(result, scheme), scheme, n)


def test_hessian_accumulator_matches_definition():
    X = torch.randn(100, 8)
    acc = HessianAccumulator(8)
    acc.add(X[:30])
    acc.add(X[30:])
    torch.testing.assert_close(acc.H, 2 * X.T @ X / 100)
    W, W_hat = torch.randn(4, 8), torch.randn(4, 8)
    assert output_error(W, W_hat, acc.H) == pytest.approx(2 / 100 * ((W - W_hat) @ X.T).pow(2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_beats_rtn_and_packs_exactly(bits, group_size, act_order, static_groups, symmetric):
    W, X, H = _layer()
    n = W.shape[1]  # 160: with groups of 64 or 128 the last group is shorter
    scheme = LayerScheme.from_dict(dict(method="gptq", bits=bits, group_size=group_size, symmetric=symmetric,
                                        act_order=act_order, static_groups=static_groups))
    r = get_method("gptq").fn(W, H, scheme)
    base = rtn(W, Q(UniformGrid(bits, symmetric), group_size))
    assert r.codes.shape == W.shape and torch.isfinite(r.W_hat).all()
    assert int(r.codes.max()) < 2**bits
    # The objective GPTQ minimizes, measured directly on the activations.
    err_gptq = ((W - r.W_hat) @ X.T).pow(2).sum()
    err_rtn = ((W - base.W_hat) @ X.T).pow(2).sum()
    assert err_gptq < err_rtn
    # What is stored decodes to exactly the weight GPTQ computed with.
    assert torch.equal(_packed_weight(r, scheme, n), r.W_hat)
    assert (r.perm is not None) == (act_order and not static_groups)


def test_reuse_factors_computes_each_factor_once_and_changes_no_result(monkeypatch):
    W, _, H = _layer()
    calls = []
    real = gptq_module._inverse_hessian_factor
    monkeypatch.setattr(gptq_module, "_inverse_hessian_factor", lambda *a: calls.append(a[1]) or real(*a))
    schemes = [LayerScheme.from_dict(dict(method="gptq", bits=b, group_size=g, act_order=True))
               for b in (2, 3, 4) for g in (64, 128)]
    fresh = [get_method("gptq").fn(W, H, s) for s in schemes]
    assert len(calls) == len(schemes)
    calls.clear()
    with reuse_factors():
        reused = [get_method("gptq").fn(W, H.clone(), s) for s in schemes]
        U, _ = inverse_hessian_factor(H, 0.01)
        U.add_(1.0)  # a caller changing its factor in place does not change the next one handed out
        again, _ = inverse_hessian_factor(H, 0.01)
        other, _ = inverse_hessian_factor(H * 2, 0.01)  # another Hessian: computed
    assert len(calls) == 3  # the six schemes' act-ordered H once, then H and H * 2
    for a, b in zip(fresh, reused, strict=True):
        assert torch.equal(a.W_hat, b.W_hat) and torch.equal(a.codes, b.codes)
    assert not torch.equal(other, again)
    assert torch.equal(again, inverse_hessian_factor(H, 0.01)[0])  # outside the block: computed afresh
    assert len(calls) == 4


def test_rtn_packs_exactly_and_is_nearest():
    W, _, _ = _layer()
    scheme = LayerScheme.from_dict(dict(method="rtn", bits=3, group_size=64))
    r = get_method("rtn").fn(W, None, scheme)
    assert torch.equal(_packed_weight(r, scheme, W.shape[1]), r.W_hat)
    # Nearest: no other code of the same group grid is closer to any weight.
    g = UniformGrid(3)
    p = g.fit(W[:, :64])
    levels = torch.stack([g.decode(torch.full((W.shape[0],), c), p) for c in range(8)], 1)
    best = (W[:, :64, None] - levels[:, None, :]).abs().min(-1).values
    torch.testing.assert_close((W[:, :64] - r.W_hat[:, :64]).abs(), best)


def test_gptq_loss_estimate_tracks_output_error():
    W, X, H = _layer()
    r = gptq(W, H, Q(UniformGrid(3), 64))
    assert r.loss > 0
    # With light damping, the OBS loss sum is close to half the true objective tr(ΔW H ΔWᵀ) / 2.
    assert r.loss == pytest.approx(output_error(W, r.W_hat, H) / 2, rel=0.25)


def test_gptq_dead_columns_and_singular_hessian():
    W, X, _ = _layer(n=64)
    X[:, 5] = 0  # a dead input channel
    X = X[:16]  # fewer tokens than dimensions: H is singular, damping makes it definite
    H = 2 * X.T @ X / 16
    r = gptq(W, H, Q(UniformGrid(4), 32), act_order=True)
    assert torch.isfinite(r.W_hat).all()
    assert torch.all(r.W_hat[:, 5].abs() <= r.params["scales"].max())


def test_cholesky_retry_with_more_damping():
    H = -torch.eye(8)  # negative definite: no relative damping can fix it
    with pytest.raises(QuantkitError, match="not positive definite"):
        inverse_hessian_factor(H, 0.01, retries=2)
    U, damp = inverse_hessian_factor(torch.diag(torch.tensor([1.0, 1, 1, -0.02])), 0.01)
    assert damp > 0.01 and torch.isfinite(U).all()


def test_non_finite_hessian_is_a_clear_error():
    W, _, H = _layer(n=32)
    H[3, 3] = float("nan")
    with pytest.raises(QuantkitError, match="non-finite"):
        gptq(W, H, Q(UniformGrid(4), 32))


def test_grid_params_are_fp16_exact():
    W = torch.randn(16, 128) * 1e-3
    for sym in (False, True):
        p = UniformGrid(4, sym).fit(W)
        assert torch.equal(p.scale, p.scale.half().float())
        assert torch.equal(p.zero, p.zero.half().float())
