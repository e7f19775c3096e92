"""Fault suite, the files ``quantkit eval`` and ``quantkit report`` write (issue 20): neither ever overwrites a file
that is not its own (a model's weights, its own inputs), and both refuse before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from faultkit import Guard, expect_clean, run_cli


@pytest.fixture
def model(tmp_path) -> Path:
    """A folder standing in for a model: eval refuses before it would load anything."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights that must survive")
    return folder


@pytest.mark.parametrize("target", ["model.safetensors", "config.json", "folder", "under-a-file"])
def test_eval_out_never_replaces_a_file_that_is_not_results(target, model, tmp_path):
    out = {"model.safetensors": model / "model.safetensors", "config.json": model / "config.json",
           "folder": model, "under-a-file": model / "config.json" / "r.json"}[target]
    guard = Guard([model], tmp_path)
    o = run_cli("eval", model, "--ppl", "wikitext2", "--ppl-windows", "1", "--out", out)
    expect_clean(o, "--out", guard=guard)


def test_eval_out_may_replace_an_earlier_results_file(model, tmp_path):
    """An earlier results file is replaceable: the run gets past the --out check (and fails later, on the fake
    model, with a clean error that leaves the earlier results as they were)."""
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"quantkit_eval": 1, "perplexity": {}}))
    guard = Guard([out], tmp_path)
    o = run_cli("eval", model, "--ppl", "wikitext2", "--ppl-windows", "1", "--out", out)
    line = expect_clean(o, guard=guard)
    assert "--out" not in line


@pytest.mark.parametrize("flag,name", [("--out", "r.json"), ("--plot", "r.json"), ("--out", "model.safetensors"),
                                       ("--plot", "model.safetensors"), ("--out", "plot.png"),
                                       ("--plot", "report.md")])
def test_report_never_writes_over_its_inputs_or_foreign_files(flag, name, model, tmp_path):
    results = tmp_path / "r.json"
    results.write_text(json.dumps({"quantkit_eval": 1}))
    target = model / name if name == "model.safetensors" else tmp_path / name
    guard = Guard([results, model], tmp_path)
    expect_clean(run_cli("report", results, flag, target), flag, guard=guard)
