"""Additive codebooks (quantkit.codebooks.aq) and their format ``quantkit-aq``: beam search against greedy codes,
the joint least-squares table update, M = 1 against vq, second-order rounding through the shared OBS loop, exact
packing and bit counts, the pipeline end to end, and the errors."""

from __future__ import annotations

import json

import pytest
import torch

import quantkit
from quantkit import pipeline
from quantkit.algos import get_method
from quantkit.algos.hessian import output_error
from quantkit.codebooks.aq import encode, objective, update_codebooks
from quantkit.config import LayerScheme, Recipe
from quantkit.formats import get_format
from quantkit.nn import QuantizedLinear


def _scheme(method="gptq", **q):
    return LayerScheme.from_dict({"method": {"name": method, "attention_weighted": False},
                                  "quantizer": {"name": "aq", "codebooks": 2, "entries": 16, "dim": 4,
                                                "iters": 2, "beam": 2, "passes": 1, **q}})


def _layer(out=48, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g).add(0.5)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    return W, 2 * X.T @ X / X.shape[0]


def _problem(seed, N=2000, M=3, K=16, d=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, d, generator=g), torch.rand(N, d, generator=g) + 0.1,
            torch.randn(M, K, d, generator=g) * 0.6)


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_is_never_worse_than_greedy(seed):
    X, Wx, C = _problem(seed)
    greedy = encode(X, Wx, C, greedy_only=True)
    # Greedy is residual: table m takes the nearest entry to what tables < m leave (brute force).
    R = X.clone()
    for m in range(C.shape[0]):
        d = (Wx[:, None] * (R[:, None] - C[m][None]) ** 2).sum(-1)
        assert torch.equal(greedy[:, m], d.argmin(1))
        R = R - C[m][greedy[:, m]]
    e_greedy = objective(X, Wx, C, greedy)
    for beam, passes in ((1, 1), (4, 2), (8, 3)):
        codes = encode(X, Wx, C, beam=beam, passes=passes)
        per = lambda c: (Wx.double() * (X.double() - sum(C.double()[m][c[:, m]] for m in range(3))) ** 2).sum(1)  # noqa: E731
        assert bool((per(codes) <= per(greedy) + 1e-9).all())  # vector by vector
        assert objective(X, Wx, C, codes) < 0.97 * e_greedy
    # A wider beam searches more: on the whole it finds lower codes.
    assert objective(X, Wx, C, encode(X, Wx, C, beam=8, passes=3)) <= objective(X, Wx, C, encode(X, Wx, C))


@pytest.mark.parametrize("seed", range(4))
def test_the_joint_least_squares_update_never_increases_the_objective(seed):
    X, Wx, C = _problem(seed)
    codes = encode(X, Wx, C, beam=2, passes=1)
    C1 = update_codebooks(X.double(), Wx.double(), C.double(), codes)
    assert objective(X, Wx, C1, codes) <= objective(X, Wx, C, codes)
    # It is the weighted least squares of all tables jointly: against a dense solve of one coordinate.
    M, K, d = C.shape
    A = torch.zeros(X.shape[0], M * K, dtype=torch.float64)
    for m in range(M):
        A[torch.arange(X.shape[0]), m * K + codes[:, m]] = 1
    j = 3
    Aw = A * Wx[:, j:j + 1].double().sqrt()
    used = A.sum(0) > 0
    ref = torch.linalg.lstsq(Aw[:, used], X[:, j:j + 1].double() * Wx[:, j:j + 1].double().sqrt()).solution
    fit = (A[:, used] @ C1.reshape(M * K, d)[used, j:j + 1] - X[:, j:j + 1].double()) ** 2 * Wx[:, j:j + 1]
    best = (A[:, used] @ ref - X[:, j:j + 1].double()) ** 2 * Wx[:, j:j + 1]
    assert float(fit.sum()) <= float(best.sum()) * (1 + 1e-6)


def test_one_table_is_vq():
    """M = 1 with vq's k-means and no alternation is vq's codebook and codes; alternation only lowers the
    objective."""
    W, H = _layer(seed=2)
    vq = LayerScheme.from_dict({"method": {"name": "rtn"}, "quantizer": {"name": "vq", "dim": 4, "entries": 64,
                                                                        "iters": 25}})
    aq = _scheme("rtn", codebooks=1, entries=64, kmeans_iters=25, iters=0)
    r_vq, r_aq = get_method("rtn").fn(W, H, vq), get_method("rtn").fn(W, H, aq)
    assert torch.equal(r_aq.params["codebooks"][0], r_vq.params["codebook"])
    assert (r_aq.codes == r_vq.codes.long()).float().mean() > 0.999  # ties aside
    assert torch.allclose(r_aq.W_hat, r_vq.W_hat)
    r_alt = get_method("rtn").fn(W, H, _scheme("rtn", codebooks=1, entries=64, kmeans_iters=25, iters=3))

    def weighted(r):  # the fitted objective: the scaled rows, each column weighted by the Hessian's diagonal
        return float(((W - r.W_hat) ** 2 / r.params["scales"] ** 2 * torch.diagonal(H)).sum())

    assert weighted(r_alt) <= weighted(r_vq) * 1.001


def test_gptq_with_additive_codebooks_beats_rtn_with_them():
    W, H = _layer(seed=1)
    e_rtn = output_error(W, get_method("rtn").fn(W, H, _scheme("rtn")).W_hat, H)
    e_gptq = output_error(W, get_method("gptq").fn(W, H, _scheme("gptq")).W_hat, H)
    assert e_gptq < 0.9 * e_rtn
    # Two tables fit better than one of the same size.
    e_one = output_error(W, get_method("gptq").fn(W, H, _scheme("gptq", codebooks=1)).W_hat, H)
    assert e_gptq < e_one


@pytest.mark.parametrize("act_order", [False, True])
def test_format_round_trip_is_exact_and_counts_its_bits(act_order):
    W, H = _layer()
    scheme = LayerScheme.from_dict({"method": {"name": "gptq", "attention_weighted": False, "act_order": act_order},
                                    "quantizer": {"name": "aq", "codebooks": 3, "entries": 32, "dim": 4,
                                                  "iters": 1}})
    r = get_method("gptq").fn(W, H, scheme)
    fmt = get_format(scheme.format)
    assert fmt.name == "quantkit-aq"
    packed = fmt.pack(r, scheme)
    specs = fmt.tensor_specs(scheme, 128, 48)
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == specs
    assert torch.equal(fmt.dequantize(packed, scheme, 128), r.W_hat)
    back = fmt.unpack(packed, scheme, 128)
    assert torch.equal(back.codes, r.codes.long()) and torch.equal(back.W_hat, r.W_hat)
    again = fmt.pack(back, scheme)
    assert all(torch.equal(again[k], packed[k]) for k in packed)
    x = torch.randn(5, 128)
    assert torch.allclose(fmt.linear(x, packed, scheme, None), x @ r.W_hat.T, atol=1e-5)
    # 3 streams of 5-bit codes for 32 vectors a row (160 bits = 5 words), 3×32×4 fp16 tables, a scale per row.
    hand = 3 * 48 * 5 * 32 + 3 * 32 * 4 * 16 + 48 * 16 + (128 * 16 if act_order else 0)
    assert fmt.stored_bits(scheme, 128, 48) == hand


@pytest.mark.parametrize("q,field", [({"entries": 100}, "quantizer.entries"),
                                     ({"codebooks": 0}, "quantizer.codebooks"),
                                     ({"beam": 0}, "quantizer.beam"),
                                     ({"sample": 3}, "quantizer.sample")])
def test_impossible_settings_name_the_field(q, field):
    with pytest.raises(quantkit.RecipeError, match=f"field '{field}'"):
        _scheme(**q)


def test_layer_errors_name_the_field():
    W, _ = _layer(out=48, n=30)
    with pytest.raises(quantkit.QuantkitError, match="quantizer.dim.*does not divide"):
        get_method("rtn").fn(W, None, _scheme("rtn", dim=4))
    W, _ = _layer(out=4, n=32)  # 32 vectors of 4: fewer than 64 entries
    with pytest.raises(quantkit.QuantkitError, match="quantizer.entries"):
        get_method("rtn").fn(W, None, _scheme("rtn", entries=64))
    W, _ = _layer(out=16, n=32)  # 512 weights; 4 tables of 32×4 hold 512 values... 5 hold more
    with pytest.raises(quantkit.QuantkitError, match="quantizer.codebooks.*more values"):
        get_method("rtn").fn(W, None, _scheme("rtn", codebooks=5, entries=32))


def test_aq_model_round_trips_and_counts_its_bits(tiny_model_factory, calib_file, tmp_path, assert_round_trip):
    recipe = Recipe.from_dict({"name": "aq-test", "schemes": [
        {"targets": ["re:.*"], "method": "gptq", "act_order": True, "grid": "aq", "codebooks": 2, "dim": 8,
         "entries": 16, "iters": 1, "kmeans_iters": 5, "rotation": "hadamard"}]})
    res = pipeline.quantize(str(tiny_model_factory("llama")), recipe, tmp_path / "q", calib=str(calib_file),
                            nsamples=4, seqlen=64, progress=False, keep_model=True)
    loaded = assert_round_trip(res.model, tmp_path / "q")
    q = loaded.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantizedLinear) and q.scheme.format == "quantkit-aq"
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {m["format"]["name"] for m in cfg["modules"].values()} == {"quantkit-aq"}
    # Two streams of 4-bit codes per 8 weights + two 16×8 fp16 tables, a scale per row, signs, a permutation.
    expected = sum(2 * o * (((i // 8) * 4 + 31) // 32) * 32 + 2 * 16 * 8 * 16 + o * 16 + i * 8 + i * 16
                   for o, i in (s["shape"] for s in res.report["layers"].values()))
    assert res.report["quantized_bits"] == expected
    # save → reload → save is exact: the resaved folder holds the same packed tensors, bit for bit.
    from safetensors.torch import load_file

    first = load_file(tmp_path / "q" / "model.safetensors")
    again = load_file(tmp_path / "resaved" / "model.safetensors")
    packed = [k for k in first if k.rsplit(".", 1)[-1] in ("codes", "codebooks", "scales", "perm")]
    assert len(packed) == 4 * len(res.report["layers"])  # codes, codebooks, scales, perm per linear
    assert all(torch.equal(first[k], again[k]) for k in packed)


@pytest.mark.parametrize("quantizer,field", [({"dim": 5}, "quantizer.dim"),
                                             ({"dim": 8, "entries": 1024}, "quantizer.codebooks")])
def test_an_impossible_aq_is_refused_before_any_work(quantizer, field, tiny_model_factory, tmp_path):
    """The tiny Llama: q_proj 96 → 96, k/v 96 → 48 (576 vectors of 8), up 96 → 160, down 160 → 96."""
    import yaml
    from faultkit import expect_clean, run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "impossible", "schemes": [
        {"method": {"name": "rtn"}, "quantizer": {"name": "aq", **quantizer}}]}))
    out = tmp_path / "q"
    o = run_cli("quantize", "--model", tiny_model_factory("llama"), "--recipe", recipe, "--out", out)
    line = expect_clean(o, f"field '{field}'", "model.layers.0.")
    assert not out.exists() and not list(tmp_path.glob("q.*")), line
