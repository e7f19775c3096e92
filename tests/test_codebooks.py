"""Vector codebooks (quantkit.codebooks.vq) and their format: k-means, nearest-codeword rounding, exact packing,
second-order rounding through the shared OBS loop, the pipeline end to end, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from faultkit import expect_clean, run_cli

import quantkit
from quantkit import pipeline
from quantkit.algos import get_method
from quantkit.algos.hessian import output_error
from quantkit.codebooks import weighted_kmeans
from quantkit.config import LayerScheme, Recipe
from quantkit.formats import get_format
from quantkit.nn import QuantizedLinear


def _scheme(method="gptq", **q):
    return LayerScheme.from_dict({"method": {"name": method, "attention_weighted": False},
                                  "quantizer": {"name": "vq", "dim": 4, "entries": 64, **q}})


def _layer(out=48, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, n, generator=g) * torch.rand(out, 1, generator=g).add(0.5)
    X = torch.randn(4 * n, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    return W, 2 * X.T @ X / X.shape[0]


def test_kmeans_lowers_the_weighted_error_and_assigns_the_nearest():
    g = torch.Generator().manual_seed(0)
    X, Wx = torch.randn(4000, 4, generator=g), torch.rand(4000, 4, generator=g) + 0.1
    C0 = weighted_kmeans(X, Wx, 32, iters=0, seed=0)
    C = weighted_kmeans(X, Wx, 32, iters=20, seed=0)

    def err(C):
        d = (Wx[:, None, :] * (X[:, None, :] - C[None]) ** 2).sum(-1)  # brute force [N, K]
        return d.min(1).values.sum()

    assert err(C) < 0.8 * err(C0)
    # Fitting on a sample of the vectors costs little on the whole set.
    assert err(weighted_kmeans(X, Wx, 32, iters=20, seed=0, sample=1000)) < 1.1 * err(C)
    with pytest.raises(ValueError, match="cannot fill"):
        weighted_kmeans(X[:10], Wx[:10], 32, iters=1, seed=0)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_codes_are_nearest_and_pack_exactly(method):
    W, H = _layer()
    scheme = _scheme(method)
    r = get_method(method).fn(W, H, scheme)
    assert r.codes.shape == (48, 32) and int(r.codes.max()) < 64
    fmt = get_format(scheme.format)
    packed = fmt.pack(r, scheme)
    assert set(packed) == {"codes", "codebook", "scales"}
    assert torch.equal(fmt.dequantize(packed, scheme, 128), r.W_hat)
    back = fmt.unpack(packed, scheme, 128)
    assert torch.equal(back.codes, r.codes.long())
    if method == "rtn":  # round to nearest (data-free: unweighted): no codeword is closer to any vector
        C, s = r.params["codebook"], r.params["scales"]
        v = (W / s).view(48, 32, 1, 4)
        d = ((v - C.view(1, 1, 64, 4)) ** 2).sum(-1)
        chosen = d.gather(-1, r.codes.long()[..., None]).squeeze(-1)
        assert torch.allclose(chosen, d.min(-1).values, rtol=1e-5, atol=1e-6)


def test_gptq_with_a_codebook_beats_rtn_with_it():
    W, H = _layer(seed=1)
    e_rtn = output_error(W, get_method("rtn").fn(W, H, _scheme("rtn")).W_hat, H)
    e_gptq = output_error(W, get_method("gptq").fn(W, H, _scheme("gptq")).W_hat, H)
    assert e_gptq < 0.9 * e_rtn


@pytest.mark.parametrize("doc,msg", [
    ({"quantizer": {"name": "vq", "entries": 100}}, "field 'quantizer.entries': must be a power of two"),
    ({"quantizer": {"name": "vq", "dim": 9}}, "field 'quantizer.dim'"),
    ({"quantizer": {"name": "vq", "entries": 256, "sample": 100}}, "field 'quantizer.sample'"),
    ({"quantizer": {"name": "vq"}, "method": {"name": "gptq", "static_groups": True, "act_order": True}},
     "field 'method.static_groups'"),
    ({"quantizer": {"name": "vq"}, "format": "quantkit-uniform"}, "field 'format'"),
])
def test_impossible_codebooks_name_the_field(doc, msg):
    with pytest.raises(quantkit.RecipeError, match=msg):
        LayerScheme.from_dict({"method": {"name": "gptq"}, **doc})


def test_codebook_larger_than_the_layer_or_dim_not_dividing_is_a_clear_error():
    W, H = _layer(out=4, n=32)
    with pytest.raises(quantkit.QuantkitError, match="quantizer.entries"):
        get_method("rtn").fn(W, None, _scheme("rtn", entries=64))
    W, H = _layer(out=48, n=30)
    with pytest.raises(quantkit.QuantkitError, match="quantizer.dim"):
        get_method("rtn").fn(W, None, _scheme("rtn", dim=4))


@pytest.mark.parametrize("quantizer,field", [({"dim": 5, "entries": 16}, "quantizer.dim"),
                                             ({"dim": 7}, "quantizer.dim"),
                                             ({"dim": 8, "entries": 4096}, "quantizer.entries")])
def test_an_impossible_codebook_is_refused_before_any_work(quantizer, field, tiny_model_factory, tmp_path):
    """The pipeline asks each linear's format (``check_layer``) before it writes anything: the error names the
    field and the module (the tiny Llama: q_proj is 96 → 96, k/v 96 → 48, up 96 → 160, down 160 → 96)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "impossible", "schemes": [
        {"method": {"name": "rtn"}, "quantizer": {"name": "vq", **quantizer}}]}))
    out = tmp_path / "q"
    o = run_cli("quantize", "--model", tiny_model_factory("llama"), "--recipe", recipe, "--out", out)
    line = expect_clean(o, f"field '{field}'", "model.layers.0.")
    assert not out.exists() and not list(tmp_path.glob("q.*")), line


def test_vq_model_round_trips_and_counts_its_bits(tiny_model_factory, calib_file, tmp_path, assert_round_trip):
    recipe = Recipe.from_dict({"name": "vq-test", "schemes": [
        {"targets": ["re:.*"], "method": "gptq", "act_order": True, "grid": "vq", "dim": 4, "entries": 64,
         "iters": 5, "rotation": "hadamard"}]})
    res = pipeline.quantize(str(tiny_model_factory("llama")), recipe, tmp_path / "q", calib=str(calib_file),
                            nsamples=4, seqlen=64, progress=False, keep_model=True)
    loaded = assert_round_trip(res.model, tmp_path / "q")
    q = loaded.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantizedLinear) and q.scheme.format == "quantkit-vq"
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert {m["format"]["name"] for m in cfg["modules"].values()} == {"quantkit-vq"}
    # 6-bit codes per 4 weights (1.5 bits) + a 64×4 fp16 codebook, a scale per row, signs, a permutation.
    expected = sum(o * (((i // 4) * 6 + 31) // 32) * 32 + 64 * 4 * 16 + o * 16 + i * 8 + i * 16
                   for o, i in (s["shape"] for s in res.report["layers"].values()))
    assert res.report["quantized_bits"] == expected
    assert 1.5 < res.report["bits_per_weight"] < 3.0


@pytest.mark.parametrize("preset, dim, bits", [("hadamard-gptq-vq3", 2, 6)])  # vq2's: test_faults_input
def test_vector_presets_quantize_and_round_trip(preset, dim, bits, tiny_model_factory, calib_file, tmp_path,
                                                assert_round_trip):
    """The preset as shipped (its 6-bit codes straddle the 32-bit words), counted as above."""
    res = pipeline.quantize(str(tiny_model_factory("llama")), preset, tmp_path / "q", calib=str(calib_file),
                            nsamples=4, seqlen=64, progress=False, keep_model=True)
    assert_round_trip(res.model, tmp_path / "q")
    shapes = [s["shape"] for s in res.report["layers"].values()]
    expected = {"codes": sum(o * (((i // dim) * bits + 31) // 32) * 32 for o, i in shapes),
                "codebook": len(shapes) * 2**bits * dim * 16, "scales": sum(o * 16 for o, _ in shapes),
                "rot_in_signs": sum(i * 8 for _, i in shapes), "perm": sum(i * 16 for _, i in shapes)}
    assert res.report["quantized_bits"] == sum(expected.values())
    weights = res.report["quantized_weights"]  # the report splits the bits by tensor
    assert res.report["bits_per_weight_by_tensor"] == pytest.approx({k: b / weights for k, b in expected.items()})


def test_per_head_hessians_cannot_split_one_codebook():
    """Row blocks would fit one codebook per head; the format stores one per layer, so the loop refuses (the
    quantize step gives codebook schemes the plain Hessian instead)."""
    from quantkit.algos.gptq import gptq

    W, H = _layer()
    with pytest.raises(quantkit.QuantkitError, match="different 'codebook'"):
        gptq(W, torch.stack([H, 2 * H + torch.eye(128)]), _scheme().quantizer.build())
