"""``quantkit eval``: quick runs on tiny models, the packed path for quantized folders, bad input, and the
full-protocol perplexity against a direct computation on the real SmolLM2 (slow)."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantkit.checkpoint import REPORT_NAME, folder_size
from quantkit.cli import main
from quantkit.eval.zeroshot import LOCAL_TASKS_DIR, TASKS

QUICK = ["--ppl", "wikitext2", "--ppl-windows", "2", "--seqlen", "64", "--limit", "3", "--device", "cpu"]


def _eval(args: list[str], out: Path) -> dict:
    assert main(["eval", *args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_results(tiny_model_factory, tmp_path_factory, data_dir):
    """An unquantized tiny model through `quantkit eval` on the five tasks, quick settings."""
    folder = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("eval") / "fp32.json"
    return folder, _eval(["--model", str(folder), *QUICK, "--tasks", "all", "--data-dir", str(data_dir)], out), out


def test_eval_quick_run_writes_everything(tiny_results, data_dir):
    folder, r, _ = tiny_results
    p = r["perplexity"]["wikitext2"]
    assert (p["windows"], p["seqlen"]) == (2, 64)
    assert p["protocol"] == f"first 2 of {p['tokens'] // 64} windows"
    assert math.isclose(p["ppl"], math.exp(p["nll"]), rel_tol=1e-12) and p["ppl"] > 1
    assert list(r["tasks"]) == list(TASKS)
    for name, t in r["tasks"].items():
        assert t["samples"] == 3 and t["source"] == "local" and t["lm_eval_task"] == name + "_local"
        assert 0 <= t["acc"] <= 1 and t["acc_stderr"] is not None
        has_norm = name in ("arc_easy", "arc_challenge", "piqa")
        assert ("acc_norm" in t) == has_norm and ("acc_norm_stderr" in t) == has_norm
    assert r["tasks"]["lambada_openai"]["perplexity"] > 1
    assert (r["method"], r["quantized"], r["bits_per_weight"], r["stored_dtype"]) == ("unquantized", False, 32.0, "F32")
    assert r["size_on_disk_bytes"] == folder_size(folder)
    assert r["zeroshot_settings"]["limit"] == 3 and r["zeroshot_settings"]["num_fewshot"] == 0
    assert {"torch", "transformers", "lm_eval", "quantkit", "python"} <= set(r["versions"])
    assert all(r["versions"][k] for k in ("torch", "transformers", "lm_eval"))
    assert r["command"].startswith("quantkit eval --model ") and "--limit 3" in r["command"]


def test_eval_perplexity_is_the_library_function(tiny_results, data_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.eval import wikitext2_perplexity

    folder, r, _ = tiny_results
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = wikitext2_perplexity(model, AutoTokenizer.from_pretrained(folder), seqlen=64, windows=2, data=data_dir,
                               progress=False)
    assert r["perplexity"]["wikitext2"]["ppl"] == pytest.approx(ref.ppl, rel=1e-6)


def test_zeroshot_equals_lm_eval_cli(tiny_results, data_dir, tmp_path):
    """The same figures as `lm_eval --model hf --model_args pretrained=FOLDER` with our local task configs."""
    folder, r, _ = tiny_results
    names = [n + "_local" for n in TASKS]
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={folder}",
           "--include_path", str(LOCAL_TASKS_DIR), "--tasks", ",".join(names), "--device", "cpu",
           "--batch_size", "1", "--limit", "3", "--metadata", json.dumps({"data_dir": str(data_dir)}),
           "--output_path", str(tmp_path / "lm_eval")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = glob.glob(str(tmp_path / "lm_eval" / "**" / "results_*.json"), recursive=True)
    theirs = json.loads(Path(results_file).read_text())["results"]
    compared = 0
    for name, ours in r["tasks"].items():
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr"):
            if metric in ours:
                assert ours[metric] == theirs[name + "_local"][f"{metric},none"], (name, metric)
                compared += 1
    assert compared == 18


@pytest.fixture(scope="module")
def tiny_quantized(tiny_model_factory, tmp_path_factory):
    from quantkit.pipeline import quantize

    out = tmp_path_factory.mktemp("quant") / "tiny-rtn-w4g128"
    quantize(str(tiny_model_factory("llama")), "rtn-w4g128", out, progress=False)
    return out


@pytest.fixture(scope="module")
def quantized_results(tiny_quantized, tmp_path_factory, data_dir):
    """Evaluate the quantized folder, counting calls of the packed matmul and keeping the model to inspect."""
    from quantkit.eval.runner import evaluate, write_results
    from quantkit.kernels import dispatch

    calls = []
    real = dispatch.linear

    def counting(x, module, **kwargs):
        calls.append(module.tensors["qweight"].dtype)
        return real(x, module, **kwargs)

    dispatch.linear = counting
    try:
        r = evaluate(tiny_quantized, ppl="wikitext2", ppl_windows=1, seqlen=64, tasks="piqa,winogrande", limit=2,
                     data_dir=data_dir, device="cpu", keep_model=True, command="test")
    finally:
        dispatch.linear = real
    out = write_results(r, tmp_path_factory.mktemp("eval-q") / "rtn.json")
    return r, calls, out


def test_quantized_folder_runs_through_packed_linears(quantized_results, tiny_quantized):
    from quantkit.nn import QuantizedLinear

    r, calls, _ = quantized_results
    model = r.pop("_model")
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(qlinears) == 3 * 7  # every linear of the 3 decoder layers
    params = dict(model.named_parameters())
    for name, m in qlinears.items():
        assert f"{name}.weight" not in params and not hasattr(m, "weight")
        # The only parameters are the format's packed tensors (frozen) and the bias.
        packed = {n: p for n, p in m.named_parameters() if n != "bias"}
        assert sorted(packed) == sorted(m.tensors) and not any(p.requires_grad for p in packed.values())
        assert m.qweight.dtype == torch.int32
    # No parameter anywhere has a quantized layer's dense shape: nothing was dequantized into a weight.
    dense_shapes = {(m.out_features, m.in_features) for m in qlinears.values()}
    assert not [n for n, p in params.items() if tuple(p.shape) in dense_shapes and "layers" in n]
    assert calls and set(calls) == {torch.int32}  # the forward went through the packed kernel dispatch
    report = json.loads((tiny_quantized / REPORT_NAME).read_text())
    assert (r["method"], r["quantized"]) == ("rtn-w4g128", True)
    assert r["bits_per_weight"] == report["bits_per_weight"] < 5
    assert r["size_on_disk_bytes"] == report["size_on_disk_bytes"]
    assert set(r["tasks"]) == {"piqa", "winogrande"} and r["perplexity"]["wikitext2"]["windows"] == 1


def test_bits_per_weight_without_report_counts_packed_tensors(tiny_quantized):
    """A quantized folder without quantkit_report.json is measured from its loaded QuantizedLinear modules."""
    from quantkit.eval.model_info import quantized_bits
    from quantkit.loading import load_model

    model, _ = load_model(tiny_quantized)
    bits, weights = quantized_bits(model)
    report = json.loads((tiny_quantized / REPORT_NAME).read_text())
    assert (bits, weights) == (report["quantized_bits"], report["quantized_weights"])


def _error(args: list[str], capsys) -> str:
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("quantkit: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_task_is_one_error(tiny_model_factory, tmp_path, data_dir, capsys):
    err = _error(["--model", str(tiny_model_factory()), "--tasks", "arc_easy,hellaswag_x", "--data-dir",
                  str(data_dir), "--out", str(tmp_path / "r.json")], capsys)
    assert "unknown task(s): hellaswag_x" in err
    assert not (tmp_path / "r.json").exists()


def test_missing_data_file_offline_is_one_error(tiny_model_factory, tmp_path, data_dir, capsys):
    partial = tmp_path / "data"
    (partial / "zeroshot" / "piqa").mkdir(parents=True)
    (partial / "zeroshot" / "piqa" / "valid.jsonl").symlink_to(data_dir / "zeroshot" / "piqa" / "valid.jsonl")
    err = _error(["--model", str(tiny_model_factory()), "--ppl", "none", "--tasks", "piqa", "--data-dir",
                  str(partial), "--out", str(tmp_path / "r.json")], capsys)
    assert "piqa: data file not found" in err and "valid-labels.lst" in err
    err = _error(["--model", str(tiny_model_factory()), "--ppl", "wikitext2", "--data-dir", str(partial),
                  "--out", str(tmp_path / "r.json")], capsys)
    assert "WikiText-2 test file not found" in err


def test_folder_that_is_not_a_model_is_one_error(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    err = _error(["--model", str(tmp_path / "notes"), "--out", str(tmp_path / "r.json")], capsys)
    assert "not a model folder" in err


def test_c4_offline_and_unknown_perplexity_dataset_are_errors(tiny_model_factory, tmp_path, data_dir, capsys):
    err = _error(["--model", str(tiny_model_factory()), "--ppl", "wikitext2,c4", "--data-dir", str(data_dir),
                  "--out", str(tmp_path / "r.json")], capsys)
    assert "no C4 validation data offline" in err
    err = _error(["--model", str(tiny_model_factory()), "--ppl", "ptb", "--out", str(tmp_path / "r.json")], capsys)
    assert "unknown perplexity dataset(s): ptb" in err


def _direct_wikitext2_ppl(folder: Path, data_dir: Path, windows: int | None) -> tuple[float, int]:
    """DESIGN.md's protocol step by step with plain transformers code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lines = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = ["" if line == " \n" else line for line in lines]  # a lone-space line is an empty row
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("\n\n".join(rows), return_tensors="pt").input_ids[0]
    total = ids.numel() // 2048  # non-overlapping windows, remainder dropped
    n = total if windows is None else windows
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        nlls = [model(w[None], labels=w[None]).loss.item() for w in ids[: n * 2048].view(n, 2048)]
    return math.exp(sum(nlls) / n), total


@pytest.mark.slow
def test_smollm2_wikitext2_matches_direct_computation(smollm2_folder, data_dir, tmp_path):
    """Acceptance 1, on the first 4 windows by default (CI time; the windows are computed alike, so 4 check what
    16 do); QUANTKIT_PPL_WINDOWS=16 runs the quick protocol, QUANTKIT_PPL_WINDOWS=full all 148 windows."""
    setting = os.environ.get("QUANTKIT_PPL_WINDOWS", "4")
    windows = None if setting == "full" else int(setting)
    args = ["--model", "smollm2-135m", "--ppl", "wikitext2", "--device", "cpu", "--data-dir", str(data_dir)]
    r = _eval(args + ([] if windows is None else ["--ppl-windows", str(windows)]), tmp_path / "r.json")
    ours = r["perplexity"]["wikitext2"]
    direct, total = _direct_wikitext2_ppl(smollm2_folder, data_dir, windows)
    print(f"WikiText-2, {ours['windows']} x 2048: quantkit eval {ours['ppl']:.6f}, direct {direct:.6f}")
    assert total == 148 and ours["tokens"] == 304_986
    assert ours["windows"] == (total if windows is None else windows) and ours["seqlen"] == 2048
    assert f"{ours['ppl']:.4g}" == f"{direct:.4g}"
    assert ours["ppl"] == pytest.approx(direct, rel=1e-5)


def test_online_task_names_are_lm_eval_tasks():
    from quantkit.errors import QuantkitError
    from quantkit.eval.zeroshot import resolve_tasks

    resolved = resolve_tasks("arc_easy,lambada_openai", None)
    assert [(t.name, t.lm_eval_name, t.source) for t in resolved] == [
        ("arc_easy", "arc_easy", "lm-eval"), ("lambada_openai", "lambada_openai", "lm-eval")]
    with pytest.raises(QuantkitError, match="unknown lm-eval task"):
        resolve_tasks("arc_easy,not_a_task", None)


def test_c4_windows_follow_gptq_convention(monkeypatch, smollm2_folder, data_dir):
    """The sampling (the Hub shard replaced by local C4 text): seeded, whole windows from long-enough documents."""
    from transformers import AutoTokenizer

    import quantkit.eval.c4 as c4

    texts = [json.loads(line)["text"] for line in
             (data_dir / "c4" / "c4-train.00000-of-01024.first1000.jsonl").read_text().splitlines()[:200]]
    monkeypatch.setattr(c4, "_validation_texts", lambda: texts)
    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    ids = c4.c4_validation_ids(tok, seqlen=256, nsamples=6)
    assert ids.shape == (6 * 256,) and torch.equal(ids, c4.c4_validation_ids(tok, seqlen=256, nsamples=6))
    assert torch.equal(ids[: 3 * 256], c4.c4_validation_ids(tok, seqlen=256, nsamples=3))  # a prefix of the 256
    docs = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    for w in ids.view(6, 256):  # every window is a contiguous slice of one document longer than seqlen
        assert any(d.numel() > 256 and any(torch.equal(d[s:s + 256], w) for s in range(d.numel() - 256))
                   for d in docs)
