"""Hadamard rotations: orthogonal matrices, exact inverses, fused weights that preserve a layer's output, the
rotated Hessian, and rotated models that save and reload to the same logits."""

import json

import pytest
import torch

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.algos.hessian import output_error
from quantkit.algos.rtn import rtn
from quantkit.grids import UniformGrid
from quantkit.quantizers.scalar import ScalarQuantizer
from quantkit.rotations import HadamardRotation, fwht, hadamard_layout, hadamard_matrix, random_signs
from quantkit.rotations.hadamard import small_hadamard

# Dimensions of SmolLM2 (hidden, MLP, K/V width, head), Llama-2-7B (hidden, MLP) and Llama-3-8B (hidden, MLP, K/V)
DIMS = [576, 1536, 192, 64, 4096, 11008, 14336, 1024]


@pytest.mark.parametrize("n", [12, 20, 28, 144, 192, 576, 1536, 2048, 1344])
def test_built_matrices_are_orthogonal_up_to_scale(n):
    H = hadamard_matrix(n)
    lay = hadamard_layout(n)
    assert set(H.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(H @ H.T, lay.block * torch.eye(n, dtype=torch.float64))


def test_block_diagonal_matrix_of_llama2_mlp_width():
    """11008 = 43 · 256: 43 copies of the order-256 matrix on the diagonal (checked by blocks: the dense product
    of an 11008² matrix would cost most of a minute)."""
    H = hadamard_matrix(11008)
    B = hadamard_matrix(256)
    assert torch.equal(B @ B.T, 256 * torch.eye(256, dtype=torch.float64))
    for i in range(43):
        rows = H[256 * i : 256 * (i + 1)]
        assert torch.equal(rows[:, 256 * i : 256 * (i + 1)], B)
        assert rows.abs().sum().item() == 256 * 256  # nothing outside the diagonal block


@pytest.mark.parametrize("m", [12, 20, 28, 144, 240, 336, 560])
def test_small_orders_and_their_products(m):
    S = small_hadamard(m)
    assert torch.equal(S @ S.T, m * torch.eye(m, dtype=torch.float64))


def test_layouts_of_model_dimensions():
    assert hadamard_layout(576).full and hadamard_layout(1536).full and hadamard_layout(14336).full
    assert (hadamard_layout(14336).small, hadamard_layout(14336).pow2) == (28, 512)
    lay = hadamard_layout(11008)  # 43 · 256: no Hadamard of order 11008 is built here
    assert not lay.full and lay.block == 256
    assert "block-diagonal (43 blocks)" in lay.describe()
    with pytest.raises(ValueError):
        small_hadamard(36)  # 36 = 4 · 9 is not a product of 12, 20, 28


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_fwht_is_the_sylvester_matrix(n):
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ hadamard_matrix(n).T, atol=1e-10)
    with pytest.raises(ValueError):
        fwht(torch.randn(2, 12))


@pytest.mark.parametrize("n", DIMS)
def test_rotation_then_inverse_preserves_a_layers_output(n):
    g = torch.Generator().manual_seed(n)
    W = torch.randn(24, n, generator=g) / n**0.5
    x = torch.randn(5, n, generator=g)
    y = x @ W.T
    r_in = HadamardRotation(random_signs(n, 0, "in"), "input")
    assert (r_in.invert(r_in.apply(x)) - x).abs().max().item() <= 1e-5
    assert torch.allclose(r_in.apply(x).norm(dim=1), x.norm(dim=1), rtol=1e-5)  # an isometry
    W_in = r_in.fuse(W)
    assert (r_in.online(x) @ W_in.T - y).abs().max().item() <= 1e-5
    assert (r_in.unfuse(W_in) - W).abs().max().item() <= 1e-5
    # Output side: the same layer with n outputs.
    Wo = torch.randn(n, 24, generator=g) / 24**0.5
    xo = torch.randn(5, 24, generator=g)
    r_out = HadamardRotation(random_signs(n, 0, "out"), "output")
    assert (r_out.online(xo @ r_out.fuse(Wo).T) - xo @ Wo.T).abs().max().item() <= 1e-5


def test_apply_is_the_dense_randomized_hadamard():
    n = 192
    signs = random_signs(n, 3, "layer")
    R = hadamard_matrix(n) @ torch.diag(signs.double()) / n**0.5
    x = torch.randn(4, n, dtype=torch.float64)
    rot = HadamardRotation(signs)
    assert torch.allclose(rot.apply(x.float()).double(), x @ R.T, atol=1e-5)
    assert torch.allclose(rot.invert(x.float()).double(), x @ R, atol=1e-5)


def _butterfly_transform(x: torch.Tensor, n: int, transpose: bool) -> torch.Tensor:
    """Reference for hadamard_transform: each block viewed as [small, pow2], the fast Walsh–Hadamard butterfly on
    the power-of-two axis and the dense small factor on the other (float64)."""
    lay = hadamard_layout(n)
    y = fwht(x.double().reshape(-1, lay.small, lay.pow2))
    S = small_hadamard(lay.small) if lay.small > 1 else torch.ones(1, 1, dtype=torch.float64)
    return ((S.T if transpose else S) @ y).reshape(x.shape) / lay.block**0.5


@pytest.mark.parametrize("n", DIMS + [192, 2048, 43, 28])
@pytest.mark.parametrize("transpose", [False, True])
def test_kronecker_gemm_transform_matches_the_butterfly(n, transpose):
    """The CPU path applies each Kronecker factor as one GEMM (Sylvester factors of order <= 64); it must be the
    same transform as the O(n log n) butterfly, and for small n the same as the dense matrix."""
    from quantkit.rotations import hadamard_transform

    x = torch.randn(3, 2, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = hadamard_transform(x, hadamard_layout(n), transpose=transpose)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert torch.allclose(got, _butterfly_transform(x, n, transpose), atol=1e-10)
    if n <= 2048:
        H = hadamard_matrix(n) / hadamard_layout(n).block ** 0.5
        assert torch.allclose(got, x @ (H if transpose else H.T), atol=1e-10)


def test_signs_come_from_the_seed_and_the_layer_name():
    a = random_signs(576, 0, "model.layers.0.mlp.up_proj")
    assert a.dtype == torch.int8 and set(a.unique().tolist()) == {-1, 1}
    assert torch.equal(a, random_signs(576, 0, "model.layers.0.mlp.up_proj"))
    assert not torch.equal(a, random_signs(576, 1, "model.layers.0.mlp.up_proj"))
    assert not torch.equal(a, random_signs(576, 0, "model.layers.1.mlp.up_proj"))


def test_rotated_hessian_keeps_the_objective():
    """``tr(ΔW H ΔWᵀ)`` is the same in the rotated basis with ``R H Rᵀ`` (2-D and per-head 3-D Hessians)."""
    n = 96
    X = torch.randn(n, 400)
    H = 2 * X @ X.T / 400
    W, W_hat = torch.randn(8, n), torch.randn(8, n)
    rot = HadamardRotation(random_signs(n, 0, "h"))
    ref = output_error(W, W_hat, H)
    assert output_error(rot.fuse(W), rot.fuse(W_hat), rot.rotate_hessian(H)) == pytest.approx(ref, rel=1e-4)
    H3 = torch.stack([H, 2 * H])
    ref3 = output_error(W, W_hat, H3)
    assert output_error(rot.fuse(W), rot.fuse(W_hat), rot.rotate_hessian(H3)) == pytest.approx(ref3, rel=1e-4)


def test_rotation_spreads_outliers_and_rtn_gains():
    """Outlier weight columns (the thing rotations are for): rotating before RTN lowers the layer objective."""
    g = torch.Generator().manual_seed(0)
    n = 576
    W = torch.randn(64, n, generator=g) * 0.02
    W[:, torch.randperm(n, generator=g)[:6]] *= 40
    X = torch.randn(n, 2048, generator=g)
    H = 2 * X @ X.T / X.shape[1]
    grid = UniformGrid(3, symmetric=True)
    plain = output_error(W, rtn(W, ScalarQuantizer(grid, 128)).W_hat, H)
    rot = HadamardRotation(random_signs(n, 0, "w"))
    rotated = output_error(W, rot.unfuse(rtn(rot.fuse(W), ScalarQuantizer(grid, 128)).W_hat), H)
    assert rotated < 0.8 * plain


# --- rotated models through the pipeline ---------------------------------------------------------------------

# Linears each data-free preset keeps unrotated (chosen on C4, see the recipes); the others rotate every linear.
UNROTATED = {
    "hadamard-rtn-w4g128": ("v_proj", "down_proj"),
    "hadamard-gaussian-w4g128": ("v_proj", "gate_proj", "up_proj", "down_proj"),
}
ROTATED = {
    "hadamard-rtn-w4g128": None,
    "hadamard-gaussian-w4g128": None,
    "hadamard-gptq-w3g128": None,
    "output-rotation": {"name": "rot-io", "schemes": [{"targets": ["re:.*"], "method": "gptq", "bits": 4,
                                                        "group_size": 32, "rotation": "hadamard",
                                                        "rotate_output": True, "rotation_seed": 7}]},
}


@pytest.mark.parametrize("recipe", list(ROTATED))
def test_rotated_model_saves_reloads_and_generates_like_in_memory(recipe, tiny_model_factory, calib_file, tmp_path,
                                                                  assert_round_trip):
    from quantkit.config import Recipe
    from quantkit.nn import QuantizedLinear

    spec = Recipe.from_dict(ROTATED[recipe]) if ROTATED[recipe] else recipe
    folder = tiny_model_factory("qwen2")  # q/k/v carry a bias: it must stay in the unrotated basis
    res = pipeline.quantize(str(folder), spec, tmp_path / "q", calib=str(calib_file), nsamples=6, seqlen=64,
                            progress=False, keep_model=True)
    modules = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"]
    rotated = {n for n, m in modules.items() if m["scheme"]["rotation"]["kind"] == "hadamard"}
    unrotated = UNROTATED.get(recipe, ())
    assert rotated == {n for n in modules if not n.endswith(unrotated)}
    layers = res.report["layers"]
    if unrotated:
        assert "rotation_input" not in layers["model.layers.0.mlp.down_proj"]
        assert layers["model.layers.0.self_attn.q_proj"]["rotation_input"].startswith("full Hadamard of order")
    else:
        assert layers["model.layers.0.mlp.down_proj"]["rotation_input"].startswith("full Hadamard of order 160")
    loaded = assert_round_trip(res.model, tmp_path / "q")
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and q.rot_in_signs is not None
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The layer's forward equals the dense weight it decodes to, in the original basis.
        h = torch.randn(3, q.in_features)
        assert torch.allclose(q(h), h @ q.dequantize().T + q.bias, atol=1e-5)
        gen = loaded.generate(x[:1, :8], max_new_tokens=4, do_sample=False)
        gen_ref = res.model.generate(x[:1, :8], max_new_tokens=4, do_sample=False)
    assert torch.equal(gen, gen_ref)
