"""One count of bits per weight: ``quantkit quantize``'s report, ``quantkit eval`` (with the report, and measured
from the loaded modules without it) and ``quantkit report`` agree, and equal a recount of the safetensors file."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.checkpoint import REPORT_NAME, guard_key
from quantkit.cli import main
from quantkit.eval.model_info import describe_model
from quantkit.loading import load_model, resolve_model


@pytest.fixture(scope="module")
def rotated_level_grid(tiny_model_factory, tmp_path_factory):
    """Rotated Gaussian-grid q/k/o and unrotated NF4 elsewhere (level tables, rotation signs); act-order GPTQ
    stores a permutation too."""
    out = tmp_path_factory.mktemp("bits") / "q"
    recipe = quantkit.Recipe.from_dict({"name": "rotated-levels", "schemes": [
        {"targets": ["q_proj", "k_proj", "o_proj"], "method": "rtn", "bits": 4, "group_size": 32, "grid": "gaussian",
         "rotation": "hadamard", "rotate_output": True},
        {"targets": ["re:.*"], "method": "rtn", "bits": 4, "group_size": 64, "grid": "nf4"},
    ]})
    pipeline.quantize(str(tiny_model_factory("qwen2")), recipe, out, progress=False)  # qwen2: q/k/v have a bias
    return out


def _recount(folder) -> float:
    modules = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    bits = weights = 0
    with safe_open(folder / "model.safetensors", "pt") as f:
        for key in f.keys():
            module, field = key.rsplit(".", 1)
            if key == guard_key(modules):  # the checkpoint's guard, not a weight's bits (quantkit.checkpoint)
                continue
            if module in modules:
                t = f.get_tensor(key)
                bits += t.numel() * t.element_size() * 8
                if field in ("qweight",):
                    weights += t.shape[0] * (t.shape[1] * 32 // 4)  # 4-bit codes, in a multiple of 8 here
    fields = {k.rsplit(".", 1)[1] for k in safe_open(folder / "model.safetensors", "pt").keys()}
    assert {"levels", "rot_in_signs", "rot_out_signs", "bias"} <= fields  # everything the old count left out
    return bits / weights


def test_quantize_eval_and_report_give_one_bits_per_weight(rotated_level_grid, tmp_path, capsys):
    folder = rotated_level_grid
    report = json.loads((folder / REPORT_NAME).read_text())["bits_per_weight"]
    assert report == pytest.approx(_recount(folder), rel=1e-12)

    # quantkit eval on the folder (it reads the report) and on a copy without it (it counts the loaded modules).
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / REPORT_NAME).unlink()
    model, _ = load_model(bare)
    assert describe_model(resolve_model(str(bare)), model).bits_per_weight == pytest.approx(report, rel=1e-12)
    results = tmp_path / "eval.json"
    assert main(["eval", str(folder), "--ppl", "wikitext2", "--ppl-windows", "1", "--seqlen", "32",
                 "--device", "cpu", "--out", str(results)]) == 0
    assert json.loads(results.read_text())["bits_per_weight"] == report

    # quantkit report prints that figure.
    capsys.readouterr()
    assert main(["report", str(results)]) == 0
    assert f"| {report:.3f} |" in capsys.readouterr().out
