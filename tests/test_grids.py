"""Grids: the Lloyd–Max data against its generator and the published optimum, rounding to the nearest level,
scale fitting, the packed level table, and that each grid helps where it claims to."""

import pytest
import torch

from benchmarks.lloyd_max import lloyd_max_gaussian
from quantkit.algos import get_method
from quantkit.algos.gptq import gptq
from quantkit.algos.hessian import output_error
from quantkit.algos.rtn import rtn
from quantkit.config import LayerScheme
from quantkit.errors import RecipeError
from quantkit.formats import get_format
from quantkit.grids import FP4_LEVELS, NF4_LEVELS, gaussian_levels, make_grid
from quantkit.nn import QuantizedLinear
from quantkit.quantizers.scalar import ScalarQuantizer


def S(**flat):
    return LayerScheme.from_dict(flat)

# Max (1960), "Quantizing for minimum distortion": MSE of the optimal quantizer of N(0, 1).
MAX_1960_MSE = {2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lloyd_max_data_is_what_the_script_computes(bits):
    levels, mse = lloyd_max_gaussian(bits)
    assert torch.allclose(torch.tensor(gaussian_levels(bits), dtype=torch.float64), levels, atol=1e-9)
    assert mse == pytest.approx(MAX_1960_MSE[bits], rel=2e-3)
    # The grid's error on normal samples is the computed optimum (and beats a uniform grid on the same range).
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    edges = (levels[1:] + levels[:-1]) / 2
    emp = (x - levels[torch.bucketize(x, edges)]).pow(2).mean().item()
    assert emp == pytest.approx(mse, rel=0.03)
    uni = torch.linspace(levels[0].item(), levels[-1].item(), 2**bits, dtype=torch.float64)
    assert (x - uni[torch.bucketize(x, (uni[1:] + uni[:-1]) / 2)]).pow(2).mean().item() > emp


def test_gaussian_data_covers_every_packable_width():
    for bits in (2, 3, 4, 8):
        lv = gaussian_levels(bits)
        assert len(lv) == 2**bits and list(lv) == sorted(lv) and lv[0] == -lv[-1]


def test_nf4_and_fp4_tables():
    assert len(NF4_LEVELS) == 16 and NF4_LEVELS[0] == -1.0 and NF4_LEVELS[-1] == 1.0 and 0.0 in NF4_LEVELS
    assert sorted(set(abs(v) for v in FP4_LEVELS)) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="supports 4 bits"):
        make_grid("nf4", 3)


@pytest.mark.parametrize("name", ["gaussian", "nf4", "fp4"])
def test_level_grid_rounds_to_the_nearest_level(name):
    grid = make_grid(name, 4)
    W = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    params = grid.fit(W)
    W_hat, codes = grid.quantize(W, params)
    assert codes.dtype == torch.uint8 and int(codes.max()) < 16
    assert torch.equal(grid.decode(codes, params), W_hat)
    # Brute force: every weight's distance to its level is the smallest over all levels.
    all_levels = params.scale[:, None, None] * grid.table[None, None, :]  # [rows, 1, 16]
    best = (W[:, :, None] - all_levels).abs().min(-1).values
    assert torch.allclose((W - W_hat).abs(), best, atol=1e-6)
    # Scales are fp16 values, and the fitted scale beats the plain absmax one.
    assert torch.equal(params.scale.half().float(), params.scale)
    absmax = (W.abs().amax(1) / grid.table.abs().max()).half().float()
    err_absmax = (W - absmax[:, None] * grid.table[grid._round(W / absmax[:, None])]).pow(2).sum()
    assert (W - W_hat).pow(2).sum() <= err_absmax


def test_gaussian_grid_beats_uniform_on_gaussian_weights_at_equal_bits():
    """At 4 bits, no zero points either way (symmetric uniform): same bits per weight, lower error."""
    W = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    gauss = rtn(W, ScalarQuantizer(make_grid("gaussian", 4), 128)).W_hat
    uniform = rtn(W, ScalarQuantizer(make_grid("uniform", 4, symmetric=True), 128)).W_hat
    assert (W - gauss).pow(2).mean() < 0.9 * (W - uniform).pow(2).mean()


@pytest.mark.parametrize("name", ["gaussian", "nf4"])
def test_gptq_with_a_level_grid_beats_rtn_on_its_objective(name):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(128, 1024, generator=g) * torch.linspace(0.2, 3, 128)[:, None]
    X[:64] += 0.8 * X[64:]  # correlated inputs: where second-order rounding gains
    H = 2 * X @ X.T / X.shape[1]
    W = torch.randn(32, 128, generator=g)
    grid = make_grid(name, 4)
    q_gptq = gptq(W, H, ScalarQuantizer(grid, 64), act_order=True)
    q_rtn = rtn(W, ScalarQuantizer(grid, 64))
    assert output_error(W, q_gptq.W_hat, H) < 0.8 * output_error(W, q_rtn.W_hat, H)
    # The codes and scales decode to the weight GPTQ reports (columns stored in act-order).
    stored = q_gptq.W_hat[:, q_gptq.perm]
    assert torch.equal(q_gptq.params["scales"].repeat_interleave(64, 1) * grid.table[q_gptq.codes.long()], stored)


@pytest.mark.parametrize("name,bits", [("gaussian", 2), ("gaussian", 3), ("gaussian", 8), ("nf4", 4), ("fp4", 4)])
def test_level_grid_pack_round_trip_is_exact(name, bits):
    W = torch.randn(24, 200, generator=torch.Generator().manual_seed(3))
    scheme = S(method="rtn", bits=bits, group_size=64, grid=name)
    res = rtn(W, ScalarQuantizer(make_grid(name, bits), 64))
    packed = get_format(scheme.format).pack(res, scheme)
    assert set(packed) == {"qweight", "scales", "levels"}
    assert packed["levels"].dtype == torch.float16 and packed["levels"].numel() == 2**bits
    q = QuantizedLinear.from_packed(packed, scheme, 200, 24)
    assert torch.equal(q.dequantize(), res.W_hat)
    x = torch.randn(3, 200)
    assert torch.allclose(q(x), x @ res.W_hat.T, atol=1e-5)


def test_scheme_rejects_bad_grid_and_rotation_fields():
    with pytest.raises(RecipeError, match="field 'grid'"):
        S(method="rtn", bits=4, grid="lattice")
    with pytest.raises(RecipeError, match="field 'bits'.*nf4"):
        S(method="rtn", bits=3, grid="nf4")
    with pytest.raises(RecipeError, match="field 'rotation'"):
        S(method="rtn", bits=4, rotation="givens")
    with pytest.raises(RecipeError, match="field 'rotate_output'"):
        S(method="rtn", bits=4, rotate_output=True)
    with pytest.raises(RecipeError, match="field 'mse_clip'.*uniform grid"):
        S(method="rtn", bits=4, grid="gaussian", mse_clip=True)
    with pytest.raises(RecipeError, match="field 'mse_clip'"):
        S(method="rtn", bits=4, mse_clip="yes")
    with pytest.raises(RecipeError, match="field 'rotation_seed'"):
        S(method="rtn", bits=4, rotation="hadamard", rotation_seed=-1)
    fmt = get_format("quantkit-uniform")
    assert "levels" in fmt.tensor_specs(S(method="rtn", bits=4, grid="nf4"), 64, 8)
    assert "zeros" not in fmt.tensor_specs(S(method="rtn", bits=4, grid="gaussian"), 64, 8)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_clip_never_loses_to_min_max_and_wins_on_heavy_tails(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 128, generator=g)
    W[:, 5] *= 8  # one outlier column: min/max spends much of the range on it
    plain = make_grid("uniform", bits, symmetric)
    clipped = make_grid("uniform", bits, symmetric, mse_clip=True)
    p_plain, p_clip = plain.fit(W), clipped.fit(W)
    err_plain = (plain.quantize(W, p_plain)[0] - W).pow(2).sum(1)
    err_clip = (clipped.quantize(W, p_clip)[0] - W).pow(2).sum(1)
    assert (err_clip <= err_plain).all()
    assert err_clip.sum() < 0.95 * err_plain.sum()
    # Still the stored format: fp16 scales, integer zero points on the grid, and codes that decode exactly.
    assert torch.equal(p_clip.scale.half().float(), p_clip.scale)
    assert torch.equal(p_clip.zero, p_clip.zero.round()) and 0 <= p_clip.zero.min() <= p_clip.zero.max() <= 2**bits - 1
    W_hat, codes = clipped.quantize(W, p_clip)
    assert torch.equal(clipped.decode(codes, p_clip), W_hat)


def test_mse_clip_reaches_rtn_and_gptq_through_the_scheme():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(32, 256, generator=g) * torch.rand(1, 256, generator=g).pow(4).mul(6).add(0.2)
    X = torch.randn(256, 512, generator=g)
    H = 2 * X @ X.T / X.shape[1]
    for method in ("rtn", "gptq"):
        errs = {}
        for clip in (False, True):
            scheme = S(method=method, bits=3, group_size=128, mse_clip=clip)
            errs[clip] = output_error(W, get_method(method).fn(W, H, scheme).W_hat, H)
        assert errs[True] < errs[False], (method, errs)
