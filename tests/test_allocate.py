"""quantkit allocate (quantkit/allocate): the solver against brute force, the measured relative errors and KL
sensitivities against direct computations on the whole model, resume after a kill, the recipe quantize consumes
(its stored bits exactly the solver's), and the clear errors."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.algos.hessian import HessianAccumulator
from quantkit.allocate import allocate, load_candidates, parse_candidates, solve
from quantkit.allocate.candidates import default_candidates
from quantkit.allocate.emit import allocation_cells, folder_cells, heatmap, items
from quantkit.allocate.measure import (
    MeasureStep,
    SensitivitySettings,
    noise_kl,
    plan,
    reference_log_probs,
    relative_error,
    weight_kl,
)
from quantkit.allocate.solve import Item
from quantkit.calibration.quantize import quantize_linear
from quantkit.cli import main
from quantkit.config import Recipe
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.errors import QuantkitError, RecipeError
from quantkit.formats import get_format
from quantkit.loading import load_tokenizer, resolve_model

CANDIDATES = [
    "rtn-w2g64",
    {"name": "gptq-w3g32", "method": "gptq", "bits": 3, "group_size": 32, "act_order": True},
    {"name": "hgptq-w4g32", "method": "gptq", "bits": 4, "group_size": 32, "act_order": True,
     "rotation": "hadamard"},
    "fp16",
]
CALIB = dict(nsamples=6, seqlen=48, seed=0)
WINDOWS = SensitivitySettings(windows=2, tokens=32, noise=0.01)


# --- the solver -----------------------------------------------------------------------------------------------------


def _brute(its: list[Item], max_bits: int) -> float:
    best = float("inf")
    for pick in itertools.product(*[range(len(it.bits)) for it in its]):
        if sum(it.bits[k] for it, k in zip(its, pick, strict=True)) <= max_bits:
            best = min(best, sum(it.cost[k] for it, k in zip(its, pick, strict=True)))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force(seed):
    rng = random.Random(seed)
    its = [Item(f"l{i}", tuple(rng.randrange(10, 200) for _ in range(4)), tuple(rng.random() for _ in range(4)))
           for i in range(rng.randrange(2, 6))]
    lo = sum(min(it.bits) for it in its)
    hi = sum(max(it.bits) for it in its)
    for max_bits in (lo, (lo + hi) // 2, lo + (hi - lo) // 5, hi):
        sol = solve(its, max_bits)
        assert sol.unit == 1 and sol.bits <= max_bits
        assert sol.bits == sum(it.bits[sol.choice[it.name]] for it in its)
        assert sol.cost == pytest.approx(_brute(its, max_bits), abs=1e-12)


def test_dp_with_coarse_units_stays_within_budget():
    rng = random.Random(0)
    its = [Item(f"l{i}", tuple(rng.randrange(1000, 100000) for _ in range(5)), tuple(rng.random() for _ in range(5)))
           for i in range(6)]
    lo = sum(min(it.bits) for it in its)
    hi = sum(max(it.bits) for it in its)
    max_bits = (lo + hi) // 2
    sol = solve(its, max_bits, resolution=50)
    assert sol.unit > 1 and sol.bits <= max_bits
    assert sol.cost >= _brute(its, max_bits) - 1e-12
    assert sol.cost <= _brute(its, lo + (max_bits - lo) * 9 // 10)  # no worse than the optimum of a 10% tighter budget


# --- the measurement ------------------------------------------------------------------------------------------------


def test_relative_error_is_the_output_error_ratio():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 40, generator=g), torch.randn(300, 40, generator=g) * torch.linspace(0.1, 3, 40)
    W_hat = W + 0.1 * torch.randn(24, 40, generator=g)
    acc = HessianAccumulator(40)
    acc.add(X)
    direct = ((W - W_hat) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum()
    assert relative_error(W, W_hat, acc.H) == pytest.approx(direct.item(), rel=1e-5)


@pytest.fixture(scope="module")
def measured(tiny_llama, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("alloc")
    cands = parse_candidates(CANDIDATES)
    m, res = allocate(str(tiny_llama), cands, [3.0, 5.0], out, calib=str(calib_file), settings=WINDOWS,
                      progress=False, **CALIB)
    return out, m, res


def _inputs(model, calib_file, n: int, seqlen: int) -> torch.Tensor:
    tok = load_tokenizer(resolve_model(str(model)))
    ids = calibration_ids(tok, load_calibration_texts(str(calib_file)), nsamples=CALIB["nsamples"],
                          seqlen=CALIB["seqlen"], seed=0)
    return ids[:n, :seqlen]


def _captured(model, ids: torch.Tensor, name: str) -> torch.Tensor:
    X = []
    h = model.get_submodule(name).register_forward_hook(lambda m, i, o: X.append(i[0].detach().reshape(-1,
                                                                                                   i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return torch.cat(X)


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"])
def test_measured_errors_match_a_direct_computation_with_X(measured, tiny_llama, calib_file, name):
    _, m, _ = measured
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    X = _captured(model, _inputs(tiny_llama, calib_file, CALIB["nsamples"], CALIB["seqlen"]), name)
    lin = model.get_submodule(name)
    W = lin.weight.detach()
    cands = parse_candidates(CANDIDATES)
    for k in (0, 3):  # rtn and fp16: data-free, so their stored weights do not depend on the walk's Hessian
        packed, _ = quantize_linear(name, lin, cands[k].scheme, None)
        W_hat = get_format(cands[k].scheme.format).dequantize(packed, cands[k].scheme, lin.in_features)
        direct = ((W - W_hat) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum()
        assert m["linears"][name]["error"][k] == pytest.approx(direct.item(), rel=1e-3)
        fmt = get_format(cands[k].scheme.format)
        assert m["linears"][name]["bits"][k] == fmt.stored_bits(cands[k].scheme, lin.in_features, lin.out_features)
    errs = m["linears"][name]["error"]
    assert errs[3] < errs[2] < errs[1] < errs[0]  # fp16 < 4-bit < 3-bit < 2-bit


def test_batched_kl_matches_noise_in_the_whole_model_and_grows_with_the_noise(measured, tiny_llama, calib_file):
    _, m, _ = measured
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = _inputs(tiny_llama, calib_file, CALIB["nsamples"], CALIB["seqlen"])
    windows = ids[: WINDOWS.windows, : WINDOWS.tokens]
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"):
        acc = HessianAccumulator(model.get_submodule(name).in_features)
        acc.add(_captured(model, ids, name))
        kl = noise_kl(model, windows, name, WINDOWS.noise, acc.H)
        # the fp model's log-probabilities computed once (as benchmarks/sensitivity_noise.py does) give the same KL
        ref = reference_log_probs(model, windows)
        assert noise_kl(model, windows, name, WINDOWS.noise, acc.H, ref) == pytest.approx(kl, rel=1e-9)
        r = m["linears"][name]["probes"]["noise"]
        assert r["kl"] == pytest.approx(kl, rel=2e-3)
        kls = [noise_kl(model, windows, name, e, acc.H) for e in (0.001, 0.01, 0.1, 0.5)]
        assert all(a < b for a, b in zip(kls, kls[1:], strict=False)), kls
        assert kls[1] / kls[0] == pytest.approx(10, rel=0.3)  # linear in the relative error while it is small
        assert r["used"] == "noise" and r["error"] == WINDOWS.noise and r["coeff"] == r["kl"] / WINDOWS.noise


PROBES = SensitivitySettings(windows=2, tokens=32, probe="rtn-w2g64,hgptq-w4g32")


@pytest.fixture(scope="module")
def probed(tiny_llama, calib_file, tmp_path_factory):
    """A measurement with two probes: rtn-w2g64 for the unrotated candidates, hgptq-w4g32 for the rotated one."""
    out = tmp_path_factory.mktemp("probed")
    m, _ = allocate(str(tiny_llama), parse_candidates(CANDIDATES), [3.0], out, calib=str(calib_file),
                    settings=PROBES, progress=False, **CALIB)
    return out, m


def test_a_candidate_probe_measures_the_kl_of_that_candidates_own_error(probed, tiny_llama, calib_file):
    """--kl-probe rtn-w2g64,hgptq-w4g32: each linear's KL per probe is that of the model with this linear alone
    given the probe's rounding (rtn: data-free, so the stored weight is exactly reproducible here), coeff = KL /
    the candidate's error, and each candidate is priced by its family's probe."""
    _, m = probed
    cands = parse_candidates(CANDIDATES)
    assert m["sensitivity"]["probe"] == "rtn-w2g64,hgptq-w4g32"
    # rtn-w2g64 itself; gptq-w3g32 the same family (no rotation, uniform); hgptq-w4g32 itself; fp16 the same rotation
    assert m["sensitivity"]["probe_of"] == ["rtn-w2g64", "rtn-w2g64", "hgptq-w4g32", "rtn-w2g64"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    windows = _inputs(tiny_llama, calib_file, 2, 32)
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.2.mlp.down_proj"):
        r = m["linears"][name]
        lin = model.get_submodule(name)
        packed, _ = quantize_linear(name, lin, cands[0].scheme, None)
        W_hat = get_format(cands[0].scheme.format).dequantize(packed, cands[0].scheme, lin.in_features)
        rtn, rot = r["probes"]["rtn-w2g64"], r["probes"]["hgptq-w4g32"]
        assert rtn["used"] == "rtn-w2g64" and rtn["error"] == r["error"][0]
        assert rtn["kl"] == pytest.approx(weight_kl(model, windows, name, W_hat), rel=2e-3)
        assert rtn["coeff"] == pytest.approx(rtn["kl"] / r["error"][0])
        assert rot["used"] == "hgptq-w4g32" and rot["error"] == r["error"][2] and rot["kl"] != rtn["kl"]
        assert rot["coeff"] == pytest.approx(rot["kl"] / r["error"][2])
        cost = {it.name: it.cost for it in items(m)}[name]
        assert cost[:3] == (rtn["coeff"] * r["error"][0], rtn["coeff"] * r["error"][1], rot["coeff"] * r["error"][2])


def test_the_default_probes_are_gptq_w3g128_and_hadamard_gptq_vq3(tiny_llama, calib_file):
    from quantkit.allocate.measure import probe_of, resolve_probe

    cands = default_candidates()
    assert resolve_probe(None, cands) == "gptq-w3g128,hadamard-gptq-vq3"
    assert resolve_probe(None, parse_candidates(CANDIDATES)) == "noise"
    of = dict(zip([c.name for c in cands], probe_of("gptq-w3g128,hadamard-gptq-vq3", cands), strict=True))
    assert of["gptq-w4g128"] == of["rtn-w8"] == of["fp16"] == "gptq-w3g128"
    assert of["hadamard-gptq-vq2.5"] == of["hadamard-gptq-w2g64"] == "hadamard-gptq-vq3"
    assert set(probe_of("noise,hadamard-gptq-vq3", cands)) == {"noise", "hadamard-gptq-vq3"}
    p = plan(str(tiny_llama), cands, calib=str(calib_file), nsamples=2, seqlen=48,
             settings=SensitivitySettings(windows=1, tokens=32))
    assert p.settings.probe == "gptq-w3g128,hadamard-gptq-vq3"
    with pytest.raises(QuantkitError, match="--kl-probe gptq-w9: not a candidate"):
        resolve_probe("gptq-w9", parse_candidates(CANDIDATES))
    with pytest.raises(QuantkitError, match="names a probe twice"):
        resolve_probe("rtn-w2g64,rtn-w2g64", parse_candidates(CANDIDATES))


def test_reused_errors_measure_only_the_sensitivities(measured, probed, tiny_llama, calib_file, tmp_path,
                                                      monkeypatch):
    """--reuse-errors: a measurement with other sensitivity settings takes the kept one's candidate errors (the
    non-probe candidates are not rounded again) and equals a full measurement with those settings."""
    out0, m0, _ = measured
    _, full = probed
    rounded = []
    import importlib

    measure_mod = importlib.import_module("quantkit.allocate.measure")
    real = measure_mod.stored_weight
    monkeypatch.setattr(measure_mod, "stored_weight", lambda name, lin, scheme, H: (rounded.append(scheme),
                                                                                   real(name, lin, scheme, H))[1])
    m, _ = allocate(str(tiny_llama), parse_candidates(CANDIDATES), [3.0], tmp_path, calib=str(calib_file),
                    settings=PROBES, progress=False, reuse=out0 / "measurement.json", **CALIB)
    assert len(rounded) == 2 * len(m["linears"])  # the two probes only
    assert m["errors_from"]["path"] == str(out0 / "measurement.json")
    for name, r in m["linears"].items():
        assert r["error"] == m0["linears"][name]["error"]
        for probe, v in r["probes"].items():
            assert v["kl"] == pytest.approx(full["linears"][name]["probes"][probe]["kl"], rel=1e-6, abs=1e-12)
    assert m["fingerprint"] == full["fingerprint"] and m["sensitivity"] == full["sensitivity"]


def test_reused_errors_from_other_inputs_are_refused(measured, tiny_llama, calib_file, tmp_path):
    out0, m0, _ = measured
    cands = parse_candidates(CANDIDATES)
    with pytest.raises(QuantkitError, match="another calibration"):
        allocate(str(tiny_llama), cands, [3.0], tmp_path / "a", calib=str(calib_file), settings=PROBES,
                 progress=False, reuse=out0 / "measurement.json", **{**CALIB, "seed": 1})
    # Same fingerprint, but a probe's error is not what the walk measures: its errors came from other inputs.
    name = "model.layers.1.mlp.up_proj"
    bad = json.loads((out0 / "measurement.json").read_text())
    bad["linears"][name]["error"][0] *= 1.01
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(QuantkitError, match=f"bad.json: {name} under rtn-w2g64 has relative error"):
        allocate(str(tiny_llama), cands, [3.0], tmp_path / "b", calib=str(calib_file), settings=PROBES,
                 progress=False, reuse=tmp_path / "bad.json", **CALIB)
    assert not (tmp_path / "b" / "measurement.json").exists()
    with pytest.raises(QuantkitError, match="not a quantkit measurement"):
        allocate(str(tiny_llama), cands, [3.0], tmp_path / "c", calib=str(calib_file), settings=PROBES,
                 progress=False, reuse=calib_file, **CALIB)


def test_a_measurement_of_an_older_version_is_refused_naming_it(measured, tiny_llama, calib_file, tmp_path):
    out, m, _ = measured
    (tmp_path / "measurement.json").write_text(json.dumps({**m, "quantkit_measurement": 1}))
    with pytest.raises(QuantkitError, match="older quantkit .measurement version 1"):
        allocate(str(tiny_llama), parse_candidates(CANDIDATES), [4.0], tmp_path, calib=str(calib_file),
                 settings=WINDOWS, progress=False, **CALIB)


def test_measurement_lwq_scores(measured):
    _, m, _ = measured
    assert set(m["layers"]) == {f"model.layers.{i}" for i in range(3)}
    assert all(0 < v < 2 for v in m["layers"].values())


def test_resume_after_a_kill_gives_an_identical_measurement(measured, tiny_llama, calib_file, tmp_path, monkeypatch):
    out0, _, _ = measured
    cands = parse_candidates(CANDIDATES)
    run = MeasureStep.run
    calls = []

    def killed(self, ctx, stats):
        calls.append(ctx.index)
        if ctx.index == 2:
            raise KeyboardInterrupt
        return run(self, ctx, stats)

    monkeypatch.setattr(MeasureStep, "run", killed)
    with pytest.raises(KeyboardInterrupt):
        allocate(str(tiny_llama), cands, [3.0], tmp_path, calib=str(calib_file), settings=WINDOWS, progress=False,
                 **CALIB)
    assert not (tmp_path / "measurement.json").exists() and (tmp_path / "measurement.partial").is_dir()
    assert not list(tmp_path.glob("recipe-*"))
    monkeypatch.setattr(MeasureStep, "run", lambda self, ctx, stats: (calls.append(ctx.index), run(self, ctx,
                                                                                                  stats))[1])
    allocate(str(tiny_llama), cands, [3.0], tmp_path, calib=str(calib_file), settings=WINDOWS, progress=False,
             **CALIB)
    assert calls == [0, 1, 2, 2]  # the rerun measured only the layer the kill interrupted
    assert (tmp_path / "measurement.json").read_bytes() == (out0 / "measurement.json").read_bytes()
    assert not (tmp_path / "measurement.partial").exists()


# --- the recipes ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(measured, tiny_llama, calib_file, tmp_path_factory):
    _, _, res = measured
    out = tmp_path_factory.mktemp("quantized") / "q"
    return pipeline.quantize(str(tiny_llama), str(res[0].recipe), out, calib=str(calib_file), progress=False,
                             **CALIB)


def test_quantize_consumes_the_recipe_with_the_predicted_bits(measured, quantized, tmp_path):
    out, m, res = measured
    for a in res:
        assert a.bits <= a.budget * m["weights"]
        recipe = yaml.safe_load(a.recipe.read_text())
        assert f"{a.predicted:.4g} nats/token" in recipe["description"]
        assert a.plot.is_file()
    a, q = res[0], quantized
    assert q.report["quantized_bits"] == a.bits and q.report["quantized_weights"] == m["weights"]
    assert q.report["bits_per_weight"] <= a.budget
    chosen = {n: s["method"] + str(s["bits"]) for n, s in q.report["layers"].items()}
    assert len(set(chosen.values())) > 1  # a mixed allocation
    # The picture of the quantized folder is the allocation's.
    assert folder_cells(q.out) == allocation_cells(m, a.choice)
    assert heatmap([("a", folder_cells(q.out)), ("b", allocation_cells(m, res[1].choice))],
                   tmp_path / "bits.png").read_bytes().startswith(b"\x89PNG")


def test_report_draws_the_bits_of_each_linear(quantized, data_dir, tmp_path, capsys):
    results = tmp_path / "r.json"
    assert main(["eval", str(quantized.out), "--ppl", "wikitext2", "--ppl-windows", "1", "--seqlen", "64",
                 "--device", "cpu", "--data-dir", str(data_dir), "--out", str(results)]) == 0
    png, md = tmp_path / "bits.png", tmp_path / "r.md"
    assert main(["report", str(results), "--out", str(md), "--bits-plot", str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG") and "bits.png" in md.read_text()


def test_fp16_candidate_stores_the_float16_weight(tiny_llama, calib_file, tmp_path):
    recipe = Recipe.from_dict({"name": "fp16", "schemes": [{"targets": ["re:.*"], "method": "rtn", "grid": "fp16"}]})
    q = pipeline.quantize(str(tiny_llama), recipe, tmp_path / "q", calib=str(calib_file), progress=False, **CALIB)
    assert q.report["bits_per_weight"] == 16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for n, mod in ref.named_modules():
        if n.endswith("_proj"):
            mod.weight.data = mod.weight.data.half().float()
    x = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, ref(x).logits, atol=1e-5)


def test_layer_granularity_gives_each_layer_one_scheme(measured):
    _, m, _ = measured
    its = items(m, granularity="layer")
    assert [it.name for it in its] == ["layer:0", "layer:1", "layer:2"]
    sol = solve(its, int(4 * m["weights"]))
    assert sol.bits <= 4 * m["weights"]


def test_default_candidates_parse_and_round_trip():
    cands = default_candidates()
    assert {"fp16", "gptq-w3g128", "hadamard-gptq-w2g64", "rtn-w8", "hadamard-gptq-vq2", "hadamard-gptq-vq3",
            "hadamard-gptq-vq2.5", "hadamard-gptq-vq3.5", "hadamard-gptq-vq4"} <= {c.name for c in cands}
    assert len(cands) == 29
    vq4 = next(c for c in cands if c.name == "hadamard-gptq-vq4").scheme.quantizer
    assert (vq4.dim, vq4.entries) == (2, 256)
    again = parse_candidates([{"name": c.name, **c.scheme.to_dict()} for c in cands])
    assert again == cands


# --- clear errors ---------------------------------------------------------------------------------------------------


def _cli(capsys, *args) -> tuple[int, str]:
    rc = main(list(args))
    return rc, capsys.readouterr().err.strip()


def test_unknown_method_in_a_candidates_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"candidates": ["rtn-w4g128", {"method": "awq", "bits": 4}]}))
    with pytest.raises(RecipeError, match=r"candidates\[1\]: field 'method': unknown method"):
        load_candidates(path)
    rc, err = _cli(capsys, "allocate", "--candidates", str(path), "--budget", "3", "--out", str(tmp_path / "o"))
    assert rc == 2 and err.count("\n") == 0 and "unknown method" in err and "candidates[1]" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("budget, what", [("1", "below the cheapest"), ("17", "above the most expensive")])
def test_budget_out_of_range(tiny_llama, calib_file, tmp_path, capsys, budget, what):
    cands = tmp_path / "c.yaml"
    cands.write_text(yaml.safe_dump(CANDIDATES))
    rc, err = _cli(capsys, "allocate", "--model", str(tiny_llama), "--candidates", str(cands), "--budget",
                   f"3,{budget}", "--out", str(tmp_path / "o"), "--calib", str(calib_file), "--nsamples", "6",
                   "--seqlen", "48")
    assert rc == 2 and err.count("\n") == 0 and what in err and f"--budget {budget}" in err
    assert not (tmp_path / "o").exists()


def test_measurement_of_another_model_or_candidate_set_is_refused(measured, tiny_model_factory, calib_file,
                                                                  tmp_path):
    out, _, _ = measured
    before = sorted(p.name for p in out.iterdir())
    other = parse_candidates(CANDIDATES[:3])
    with pytest.raises(QuantkitError, match="another candidate set"):
        allocate(str(tiny_model_factory("llama")), other, [3.0], out, calib=str(calib_file), settings=WINDOWS,
                 progress=False, **CALIB)
    with pytest.raises(QuantkitError, match="another model"):
        allocate(str(tiny_model_factory("qwen2")), parse_candidates(CANDIDATES), [3.0], out, calib=str(calib_file),
                 settings=WINDOWS, progress=False, **CALIB)
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_measurement_serves_another_budget(measured, tiny_llama, calib_file):
    out, m, _ = measured
    stamp = (out / "measurement.json").stat().st_mtime_ns
    m2, res = allocate(str(tiny_llama), parse_candidates(CANDIDATES), [4.0], out, calib=str(calib_file),
                       settings=WINDOWS, progress=False, **CALIB)
    assert m2 == m and (out / "measurement.json").stat().st_mtime_ns == stamp
    assert res[0].recipe.name == "recipe-4.0.yaml" and res[0].bits <= 4 * m["weights"]
    assert json.loads((out / "allocation.json").read_text())["measurement_seconds"] is None


def test_plan_checks_the_sensitivity_windows(tiny_llama, calib_file):
    with pytest.raises(QuantkitError, match="--kl-windows"):
        plan(str(tiny_llama), parse_candidates(CANDIDATES), calib=str(calib_file), nsamples=2, seqlen=48,
             settings=SensitivitySettings(windows=3))


def test_codebook_candidates_are_measured_and_allocated(tiny_llama, calib_file, tmp_path):
    """Codebook quantizers are candidates like any scheme: their bits are the format's count (codes, the codebook,
    scales), their errors the stored weight's, and the emitted recipe mixing them with scalar grids quantizes to
    the solver's bits exactly."""
    cands = parse_candidates([
        "rtn-w2g64",
        {"name": "hgptq-vq3", "method": "gptq", "act_order": True, "grid": "vq", "dim": 2, "entries": 8, "iters": 3,
         "rotation": "hadamard"},
        {"name": "gptq-w4g32", "method": "gptq", "bits": 4, "group_size": 32, "act_order": True},
    ])
    m, res = allocate(str(tiny_llama), cands, [2.9], tmp_path / "a", calib=str(calib_file), settings=WINDOWS,
                      sensitivity="none", progress=False, plot=False, **CALIB)
    vq = cands[1]
    fmt = get_format(vq.scheme.format)
    assert fmt.name == "quantkit-vq"
    for r in m["linears"].values():
        out_f, in_f = r["shape"]
        assert r["bits"][1] == fmt.stored_bits(vq.scheme, in_f, out_f)
        assert 0 < r["error"][1] < 1
    recipe = yaml.safe_load(res[0].recipe.read_text())
    quantizers = {s["quantizer"]["name"] for s in recipe["schemes"]}
    assert quantizers == {"vq", "uniform"}  # a real mix at 2.9 bits
    q = pipeline.quantize(str(tiny_llama), str(res[0].recipe), tmp_path / "q", calib=str(calib_file),
                          progress=False, **CALIB)
    assert q.report["quantized_bits"] == res[0].bits


def test_allocation_check_gives_the_solvers_prediction_and_the_measured_increase(measured, quantized, tmp_path,
                                                                                   capsys):
    """benchmarks/allocation_check.py (issue 18, item 2) finds each linear's candidate in a quantized folder: its
    prediction for the allocated folder is the solver's, and the measured column is nll − nll_fp."""
    from benchmarks import allocation_check

    out, m, res = measured

    def eval_file(name, nll):
        p = tmp_path / name
        p.write_text(json.dumps({"perplexity": {"wikitext2": {"nll": nll, "ppl": math.exp(nll), "windows": 2,
                                                                "protocol": "first 2 windows"}}}))
        return p

    fp, q = eval_file("fp.json", 3.0), eval_file("q.json", 3.25)
    assert allocation_check.main([str(out / "measurement.json"), str(fp), f"{quantized.out}={q}"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")][0].split("|")
    assert float(row[2]) == pytest.approx(quantized.report["bits_per_weight"], abs=1e-4)
    assert float(row[4]) == pytest.approx(0.25, abs=1e-4)
    assert float(row[5]) == pytest.approx(res[0].predicted, abs=1e-4)
    # The recipe alone (its folder gone) gives the same row: bits counted from the measurement.
    assert allocation_check.main([str(out / "measurement.json"), str(fp), f"{res[0].recipe}={q}"]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")][0].split("|")
    assert again == row
    # Three configurations (both budgets' recipes and a uniform preset): Pearson's r over the table's columns.
    runs = [f"{a.recipe}={eval_file(f'{a.budget}.json', 3.0 + 0.1 * i + a.predicted)}" for i, a in enumerate(res)]
    runs.append(f"rtn-w2g64={eval_file('rtn.json', 4.5)}")
    assert allocation_check.main([str(out / "measurement.json"), str(fp), *runs]) == 0
    printed = capsys.readouterr().out
    table = [line.split("|") for line in printed.splitlines() if line.startswith("| `")]
    assert len(table) == 3
    r = statistics.correlation([float(t[4]) for t in table], [float(t[5]) for t in table])
    assert f"over 3 configurations: {r:.3f}" in printed
    # One recipe name twice (two measurements' recipes of one budget): each row names its results file.
    assert allocation_check.main([str(out / "measurement.json"), str(fp), f"{res[0].recipe}={q}",
                                  f"{res[0].recipe}={eval_file('q-v2.json', 3.5)}"]) == 0
    cells = sorted(line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()
                   if line.startswith("| `"))
    name = yaml.safe_load(res[0].recipe.read_text())["name"]
    assert cells == [f"`{name}` (q)", f"`{name}` (q-v2)"]


def test_a_version_2_measurement_is_not_solved_with_one_coefficient_for_every_family(measured):
    """Version 2 kept one KL coefficient per linear; solving from it would price every family by one probe."""
    _, m, _ = measured
    old = {**m, "linears": {n: {k: v for k, v in r.items() if k != "probes"} | {"coeff": 1.0}
                            for n, r in m["linears"].items()}}
    with pytest.raises(QuantkitError, match="version 2.*--reuse-errors"):
        items(old)
    assert len(items(old, sensitivity="lwq")) == len(m["linears"])


@pytest.mark.parametrize("reuse, what", [("missing.json", "cannot read it"), ("c.yaml", "not a quantkit measurement")])
def test_reuse_errors_from_a_bad_file_is_one_line(tiny_llama, calib_file, tmp_path, capsys, reuse, what):
    cands = tmp_path / "c.yaml"
    cands.write_text(yaml.safe_dump(CANDIDATES))
    rc, err = _cli(capsys, "allocate", "--model", str(tiny_llama), "--candidates", str(cands), "--budget", "3",
                   "--out", str(tmp_path / "o"), "--calib", str(calib_file), "--nsamples", "6", "--seqlen", "48",
                   "--reuse-errors", str(tmp_path / reuse))
    assert rc == 2 and err.count("\n") == 0 and what in err and f"--reuse-errors {tmp_path / reuse}" in err
    assert not (tmp_path / "o").exists()
