"""Fault and bad-input suite, the inputs themselves (issue 20): non-finite and overflowing weights, calibration
activations that overflow, perplexities that are not finite, settings out of range, and results or calibration
files that are not what they claim. Each case checks the exit status, the one-line message naming the tensor or
file, that nothing is left behind, and that the source model (and any earlier output) is byte-identical."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from faultkit import Guard, expect_clean, run_cli
from safetensors.torch import load_file, save_file

CAL = ["--nsamples", "4", "--seqlen", "32"]
EVAL = ["--ppl", "wikitext2", "--ppl-windows", "2", "--seqlen", "64", "--device", "cpu"]


@pytest.fixture
def model(tiny_llama_copy) -> Path:
    return tiny_llama_copy


def set_values(model: Path, key: str, value: float, *, whole: bool = False) -> None:
    """Write ``value`` into three entries of tensor ``key`` (or all of it) of the model's safetensors file."""
    st = model / "model.safetensors"
    w = load_file(st)
    t = w[key]
    if whole:
        t.fill_(value)
    else:
        flat = t.view(-1)
        for i in (0, 5, flat.numel() - 1):
            flat[i] = value
    save_file(w, st, metadata={"format": "pt"})


def quantize(model: Path, out: Path, calib: Path, *extra: str, recipe: str = "gptq-w4g128"):
    return run_cli("quantize", "--model", model, "--recipe", recipe, "--out", out, "--calib", calib, *CAL, *extra)


def strict_json(path: Path):
    """``path`` parsed as strict JSON: a bare NaN or Infinity fails the test."""
    def refuse(name: str):
        raise AssertionError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


# -- non-finite and overflowing weights ----------------------------------------------------------------------------

# value -> (tensor it goes into, phrases of the error). Non-finite values are refused as the checkpoint is read;
# finite ones the fp16 scales cannot hold are refused when the linear is rounded.
WEIGHTS = {
    "nan": ("model.layers.0.mlp.down_proj.weight", ["model.layers.0.mlp.down_proj.weight", "non-finite", "nan"]),
    "inf": ("model.layers.1.self_attn.q_proj.weight", ["model.layers.1.self_attn.q_proj.weight", "non-finite",
                                                       "inf"]),
    "-inf": ("model.layers.2.mlp.gate_proj.weight", ["model.layers.2.mlp.gate_proj.weight", "-inf"]),
    "1e6": ("model.layers.1.self_attn.o_proj.weight", ["model.layers.1.self_attn.o_proj", "1e+06", "float16"]),
    "-1e30": ("model.layers.2.self_attn.v_proj.weight", ["model.layers.2.self_attn.v_proj", "1e+30", "float16"]),
}


@pytest.mark.parametrize("recipe", ["rtn-w4g128", "gptq-w4g128"])
@pytest.mark.parametrize("value", list(WEIGHTS))
def test_a_weight_that_is_not_finite_or_overflows_fp16_is_refused(value, recipe, model, tmp_path, calib_file):
    key, phrases = WEIGHTS[value]
    set_values(model, key, float(value))
    guard = Guard([model], tmp_path)
    expect_clean(quantize(model, tmp_path / "q", calib_file, recipe=recipe), *phrases, guard=guard)
    assert not (tmp_path / "q").exists()


def test_a_weight_that_overflows_a_vector_codebook_is_refused(model, tmp_path, calib_file):
    set_values(model, "model.layers.0.mlp.down_proj.weight", 1e6)
    guard = Guard([model], tmp_path)
    o = quantize(model, tmp_path / "q", calib_file, recipe="hadamard-gptq-vq2")
    expect_clean(o, "model.layers.0.mlp.down_proj.", "float16", guard=guard)


def test_the_largest_weights_fp16_scales_hold_still_quantize(model, tmp_path, calib_file):
    """Not a fault: weights of ±4.5e5 fit (a 4-bit group's range over its 15 steps stays under fp16's 65504), and
    every stored tensor is finite."""
    set_values(model, "model.layers.0.mlp.down_proj.weight", 4.5e5)
    set_values(model, "model.layers.0.mlp.up_proj.weight", -4.5e5)
    o = quantize(model, tmp_path / "q", calib_file, recipe="rtn-w4g128")
    assert o.code == 0, str(o)
    for name, t in load_file(tmp_path / "q" / "model.safetensors").items():
        assert not t.is_floating_point() or torch.isfinite(t).all(), name


OTHER_TENSORS = [  # (a tensor outside the quantized linears, value, recipe)
    ("model.embed_tokens.weight", "nan", "rtn-w4g128"), ("model.embed_tokens.weight", "inf", "gptq-w4g128"),
    ("model.norm.weight", "nan", "rtn-w4g128"), ("model.layers.0.input_layernorm.weight", "inf", "rtn-w4g128"),
    ("model.layers.2.post_attention_layernorm.weight", "-inf", "gptq-w4g128"),
]


@pytest.mark.parametrize("key,value,recipe", OTHER_TENSORS)
def test_a_non_finite_embedding_or_norm_is_refused(key, value, recipe, model, tmp_path, calib_file):
    set_values(model, key, float(value))
    guard = Guard([model], tmp_path)
    expect_clean(quantize(model, tmp_path / "q", calib_file, recipe=recipe), key, "non-finite", guard=guard)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("key,linear", [
    ("model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj"),
    ("model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.q_proj"),
])
def test_calibration_activations_that_overflow_are_refused_naming_the_layer(key, linear, model, tmp_path,
                                                                            calib_file):
    """A finite norm weight of 1e30 makes the calibration forward overflow inside that layer: GPTQ would round with
    a Hessian of inf and NaN. The first linear that sees the overflowed activations is named."""
    set_values(model, key, 1e30, whole=True)
    guard = Guard([model], tmp_path)
    expect_clean(quantize(model, tmp_path / "q", calib_file), linear, "calibration inputs are not finite",
                 guard=guard)
    assert not (tmp_path / "q").exists()


# -- quantize: calibration files and settings ------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["binary", "jsonl-not-objects", "jsonl-no-text", "txt-not-utf8", "directory"])
def test_a_calibration_file_that_is_not_text_is_one_line(how, model, tmp_path):
    calib = tmp_path / ("calib.txt" if how == "txt-not-utf8" else "calib.jsonl")
    if how == "binary":
        calib.write_bytes(bytes(range(256)) * 16)
    elif how == "jsonl-not-objects":
        calib.write_text('{"text": "fine"}\n42\n"a string"\n')
    elif how == "jsonl-no-text":
        calib.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    elif how == "txt-not-utf8":
        calib.write_bytes(b"plain start " * 100 + b"\xff\xfe\xc3(" + b" more" * 100)
    else:
        calib.mkdir()
    guard = Guard([model], tmp_path)
    expect_clean(quantize(model, tmp_path / "q", calib), str(calib), guard=guard)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args,phrase", [(["--nsamples", "0"], "--nsamples"), (["--seqlen", "1"], "--seqlen"),
                                         (["--seqlen", "513"], "max_position_embeddings = 512")])
def test_quantize_settings_out_of_range_are_one_line(args, phrase, tiny_llama, tmp_path, calib_file):
    guard = Guard([tiny_llama], tmp_path)
    expect_clean(quantize(tiny_llama, tmp_path / "q", calib_file, *args), phrase, guard=guard)
    assert not (tmp_path / "q").exists()


# -- eval: results that are not finite -------------------------------------------------------------------------------

def test_eval_of_a_model_with_nan_weights_writes_null_and_exits_2(model, tmp_path):
    set_values(model, "model.norm.weight", math.nan, whole=True)  # every logit NaN
    out = tmp_path / "r.json"
    guard = Guard([model], tmp_path)
    line = expect_clean(run_cli("eval", model, *EVAL, "--out", out), str(model), "not finite", str(out),
                        guard=guard)
    assert "nan" in line
    r = strict_json(out)
    p = r["perplexity"]["wikitext2"]
    assert p["ppl"] is None and p["nll"] is None and "not finite" in p["error"] and "not finite" in r["error"]
    assert p["windows"] == 1  # stopped at the first window: the rest cannot make the mean finite


def test_eval_of_a_model_whose_perplexity_overflows_exits_2(model, tmp_path):
    """Finite logits of order 1e4: the mean NLL is finite but exp of it is not (math.exp raised OverflowError)."""
    set_values(model, "model.norm.weight", 1e6, whole=True)
    out = tmp_path / "r.json"
    guard = Guard([model], tmp_path)
    expect_clean(run_cli("eval", model, *EVAL, "--out", out), "overflows exp", str(out), guard=guard)
    r = strict_json(out)
    p = r["perplexity"]["wikitext2"]
    assert p["ppl"] is None and p["nll"] > 709


def test_eval_zero_shot_of_a_nan_model_is_refused_not_scored(model, tmp_path, data_dir):
    """lm-eval picks the first choice when every log-likelihood is NaN and reports an accuracy; quantkit stops."""
    set_values(model, "model.norm.weight", math.nan, whole=True)
    out = tmp_path / "r.json"
    guard = Guard([model], tmp_path)
    o = run_cli("eval", model, "--ppl", "none", "--tasks", "arc_easy", "--limit", "2", "--device", "cpu",
                "--data-dir", data_dir, "--out", out)
    expect_clean(o, "zero-shot", "not finite", str(out), guard=guard)
    r = strict_json(out)
    assert r["tasks"] == {} and "arc_easy" in r["error"]


def test_eval_after_a_nan_perplexity_skips_zero_shot_and_keeps_no_earlier_figures(model, tmp_path, data_dir):
    set_values(model, "model.norm.weight", math.nan, whole=True)
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"quantkit_eval": 1, "perplexity": {"wikitext2": {"ppl": 12.0}}}))
    o = run_cli("eval", model, *EVAL, "--tasks", "arc_easy", "--limit", "2", "--data-dir", data_dir, "--out", out)
    expect_clean(o, "skipped", str(out))
    r = strict_json(out)
    assert r["tasks"] == {} and r["perplexity"]["wikitext2"]["ppl"] is None


def test_write_results_never_writes_bare_nan(tmp_path):
    from quantkit.errors import QuantkitError
    from quantkit.eval.runner import write_results

    out = tmp_path / "r.json"
    r = {"quantkit_eval": 1, "perplexity": {"c4": {"ppl": math.inf}}, "tasks": {"piqa": {"acc": math.nan}},
         "_model": object()}
    with pytest.raises(QuantkitError, match=r"perplexity\.c4\.ppl, tasks\.piqa\.acc"):
        write_results(r, out)
    data = strict_json(out)
    assert data["perplexity"]["c4"]["ppl"] is None and data["tasks"]["piqa"]["acc"] is None
    assert "not finite" in data["error"]


# -- eval: settings and inputs ---------------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the case if eval gets as far as loading the model: every check here must come first."""
    import quantkit.eval.runner as runner

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(runner, "load_model", refuse)


EVAL_SETTINGS = {
    "seqlen-past-positions": (["--seqlen", "513"], ["--seqlen 513", "max_position_embeddings = 512"]),
    "seqlen-far-past-positions": (["--seqlen", "100000"], ["max_position_embeddings = 512"]),
    "seqlen-zero": (["--seqlen", "0"], ["--seqlen", "at least 2"]),
    "seqlen-negative": (["--seqlen", "-64"], ["--seqlen", "at least 2"]),
    "seqlen-one": (["--seqlen", "1"], ["--seqlen", "at least 2"]),
    "ppl-windows-zero": (["--ppl-windows", "0"], ["--ppl-windows"]),
    "limit-zero": (["--tasks", "arc_easy", "--limit", "0"], ["--limit"]),
    "unknown-task": (["--tasks", "arc_easy,no_such_task"], ["no_such_task"]),
    "unknown-ppl": (["--ppl", "wikitext2,penn"], ["penn"]),
    "nothing-to-do": (["--ppl", "none"], ["nothing to evaluate"]),
}


@pytest.mark.parametrize("case", list(EVAL_SETTINGS))
def test_eval_settings_out_of_range_are_one_line_before_loading(case, tiny_llama, tmp_path, data_dir, no_model_load):
    args, phrases = EVAL_SETTINGS[case]
    out = tmp_path / "r.json"
    guard = Guard([tiny_llama], tmp_path)
    o = run_cli("eval", tiny_llama, "--ppl", "wikitext2", "--data-dir", data_dir, "--device", "cpu", *args,
                "--out", out)
    expect_clean(o, *phrases, guard=guard)
    assert not out.exists()


def test_eval_batch_size_junk_is_one_line(tiny_llama, tmp_path):
    expect_clean(run_cli("eval", tiny_llama, "--batch-size", "junk", "--out", tmp_path / "r.json"), "--batch-size")


def test_eval_of_a_missing_model_path_is_one_line(tmp_path, no_model_load):
    missing = tmp_path / "no-such-model"
    expect_clean(run_cli("eval", missing, *EVAL, "--out", tmp_path / "r.json"), str(missing),
                 guard=Guard([], tmp_path))


def test_eval_out_under_a_file_is_one_line(tiny_llama, tmp_path, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    guard = Guard([tiny_llama, blocker], tmp_path)
    expect_clean(run_cli("eval", tiny_llama, *EVAL, "--out", blocker / "r.json"), "--out", str(blocker), guard=guard)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_eval_out_in_a_read_only_folder_is_one_line(tiny_llama, tmp_path, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        expect_clean(run_cli("eval", tiny_llama, *EVAL, "--out", ro / "r.json"), "--out", str(ro),
                     guard=Guard([tiny_llama, ro], tmp_path))
    finally:
        ro.chmod(0o755)


# -- report: results files that are not results ---------------------------------------------------------------------

GOOD = {
    "quantkit_eval": 1, "model": "/models/q", "model_folder": "/models/q", "method": "rtn-w4g128", "quantized": True,
    "bits_per_weight": 4.35, "size_on_disk_bytes": 23_000_000, "stored_dtype": None,
    "perplexity": {"wikitext2": {"ppl": 31.5, "nll": 3.45, "windows": 2, "seqlen": 64, "tokens": 300_000,
                                 "protocol": "first 2 of 4765 windows"}},
    "tasks": {},
}


def _without(*path: str) -> dict:
    r = json.loads(json.dumps(GOOD))
    d = r
    for k in path[:-1]:
        d = d[k]
    del d[path[-1]]
    return r


def _with(value, *path: str) -> dict:
    r = json.loads(json.dumps(GOOD))
    d = r
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value
    return r


BAD_RESULTS = {
    "binary": (lambda p: p.write_bytes(bytes(range(256)) * 4), "binary"),
    "not-json": (lambda p: p.write_text("perplexity: 12.3\n"), "not valid JSON"),
    "truncated": (lambda p: p.write_text(json.dumps(GOOD)[:50]), "not valid JSON"),
    "list": (lambda p: p.write_text(json.dumps([GOOD])), "not a results file"),
    "empty": (lambda p: p.write_text(""), "empty"),
    "nan": (lambda p: p.write_text(json.dumps(_with(math.nan, "perplexity", "wikitext2", "ppl"))), "NaN"),
    "infinity": (lambda p: p.write_text(json.dumps(_with(math.inf, "bits_per_weight"))), "Infinity"),
    "no-version": (lambda p: p.write_text(json.dumps(_without("quantkit_eval"))), "not a results file"),
    "no-method": (lambda p: p.write_text(json.dumps(_without("method"))), "method is missing"),
    "no-size": (lambda p: p.write_text(json.dumps(_without("size_on_disk_bytes"))), "size_on_disk_bytes"),
    "no-seqlen": (lambda p: p.write_text(json.dumps(_without("perplexity", "wikitext2", "seqlen"))),
                  "perplexity.wikitext2.seqlen"),
    "ppl-a-string": (lambda p: p.write_text(json.dumps(_with("31.5", "perplexity", "wikitext2", "ppl"))),
                     "perplexity.wikitext2.ppl"),
    "tasks-a-list": (lambda p: p.write_text(json.dumps(_with(["piqa"], "tasks"))), "tasks"),
    "missing": (lambda p: None, "not found"),
    "directory": (lambda p: p.mkdir(), "folder"),
}


@pytest.mark.parametrize("how", list(BAD_RESULTS))
def test_report_on_a_bad_results_file_is_one_line_naming_it(how, tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({**GOOD, "model": "/models/other", "model_folder": "/models/other"}))
    bad = tmp_path / "bad.json"
    make, phrase = BAD_RESULTS[how]
    make(bad)
    md = tmp_path / "report.md"
    guard = Guard([good, bad], tmp_path)
    expect_clean(run_cli("report", good, bad, "--out", md), str(bad), phrase, guard=guard)
    assert not md.exists()


def test_report_shows_a_run_whose_perplexity_was_not_finite(tmp_path):
    """What eval writes for a NaN model (null and an error) is a valid results file: the report says so."""
    failed = _with(None, "perplexity", "wikitext2", "ppl")
    failed["error"] = "wikitext2 perplexity of /models/q: not finite"
    path = tmp_path / "failed.json"
    path.write_text(json.dumps(failed))
    o = run_cli("report", path)
    assert o.code == 0, str(o)
    assert "not finite" in o.out and "Failed: rtn-w4g128: wikitext2 perplexity" in o.out
