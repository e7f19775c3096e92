"""The pipeline on tiny random models: format round trip, bits per weight, resume, determinism, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faultkit import killed_after_layer
from safetensors import safe_open

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.checkpoint import GUARD_SHAPE, guard_key
from quantkit.cli import main as cli
from quantkit.nn import QuantizedLinear

CAL = dict(nsamples=6, seqlen=64)


def _quantize(folder, out, calib_file, recipe="gptq-w4g128", **kw):
    return pipeline.quantize(str(folder), recipe, out, calib=str(calib_file), progress=False, **{**CAL, **kw})


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def test_bits_per_weight_matches_stored_tensors(tiny_model_factory, calib_file, tmp_path):
    out = tmp_path / "q"
    rep = _quantize(tiny_model_factory("llama"), out, calib_file, recipe="gptq-w3g128").report
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "quantkit" and cfg["version"] == 3
    assert {m["format"]["name"] for m in cfg["modules"].values()} == {"quantkit-uniform"}
    modules = cfg["modules"]
    bits = weights = 0
    with safe_open(out / "model.safetensors", "pt") as f:
        for key in f.keys():
            module = key.rsplit(".", 1)[0]
            if key == guard_key(modules):  # 4 bytes that make transformers without quantkit refuse the folder
                assert f.get_tensor(key).shape == GUARD_SHAPE
                continue
            if module in modules:
                t = f.get_tensor(key)
                bits += t.numel() * t.element_size() * 8
                assert not key.endswith(".weight"), "a quantized layer kept a dense weight"
    for s in rep["layers"].values():
        weights += s["shape"][0] * s["shape"][1]
    assert rep["bits_per_weight"] == pytest.approx(bits / weights, rel=1e-12)
    # 3 bits + fp16 scale and zero per group of 128 (96 columns: one group; 160: two groups) + int16 perm
    assert 3.0 < rep["bits_per_weight"] < 4.0
    assert rep["size_on_disk_bytes"] > 0 and rep["peak_rss_bytes"] > 0 and rep["seconds"] > 0
    assert all(s["output_error"] >= 0 for s in rep["layers"].values())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_logits_in_memory_equal_reloaded_and_resaved(arch, tiny_model_factory, calib_file, tmp_path,
                                                     assert_round_trip):
    folder = tiny_model_factory(arch)
    res = _quantize(folder, tmp_path / "q", calib_file, keep_model=True)
    loaded = assert_round_trip(res.model, tmp_path / "q")
    names = set(json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["modules"])
    swapped = {n for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert swapped == names and len(names) == 7 * 3
    assert not any(isinstance(m, torch.nn.Linear) for n, m in loaded.named_modules() if ".layers." in n)
    # No quantized layer materializes a dense weight: its parameters are its packed tensors (frozen) and the bias.
    for n, p in loaded.named_parameters():
        module, _, leaf = n.rpartition(".")
        if module in names:
            assert leaf in {*loaded.get_submodule(module).tensors, "bias"}
            assert leaf == "bias" or not p.requires_grad
    if arch == "qwen2":  # q/k/v carry a bias; it must survive
        assert loaded.model.layers[0].self_attn.q_proj.bias is not None


def test_resume_after_interrupt_is_byte_identical(tiny_model_factory, calib_file, tmp_path):
    folder = tiny_model_factory("llama")
    _quantize(folder, tmp_path / "full", calib_file)

    out = tmp_path / "resumed"
    with killed_after_layer(1), pytest.raises(KeyboardInterrupt):  # as if killed after the second layer was written
        _quantize(folder, out, calib_file)
    assert not out.exists()
    partial = out.with_name(out.name + ".quantkit-partial")
    assert json.loads((partial / "state.json").read_text())["next_layer"] == 2
    rep = _quantize(folder, out, calib_file).report
    assert rep["resumed_at_layer"] == 2
    assert not partial.exists()
    assert _bytes(out) == _bytes(tmp_path / "full")


def test_same_seed_is_deterministic_and_seed_matters(tiny_model_factory, calib_file, tmp_path):
    folder = tiny_model_factory("llama")
    _quantize(folder, tmp_path / "a", calib_file, seed=3)
    _quantize(folder, tmp_path / "b", calib_file, seed=3)
    _quantize(folder, tmp_path / "c", calib_file, seed=4)
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert _bytes(tmp_path / "a") != _bytes(tmp_path / "c")


def test_rerun_of_finished_output_is_a_no_op(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    first = pipeline.quantize(str(folder), "rtn-w4g128", tmp_path / "q", progress=False)
    assert not first.skipped and first.report["calibration"] is None
    assert pipeline.quantize(str(folder), "rtn-w4g128", tmp_path / "q", progress=False).skipped


def _cli(args, capsys):
    code = cli(args)
    return code, capsys.readouterr().err


def test_errors_are_one_clear_line_and_leave_nothing(tiny_model_factory, calib_file, tmp_path, capsys):
    from transformers import DistilBertConfig, DistilBertModel

    folder = tiny_model_factory("llama")
    out = tmp_path / "out"
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n')
    bert = tmp_path / "bert"
    encoder = DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37, vocab_size=100))
    encoder.save_pretrained(bert)
    bad_field = tmp_path / "bad.yaml"
    bad_field.write_text("schemes:\n  - method: gptq\n    bits: 4\n    group: 128\n")
    bad_bits = tmp_path / "bits.yaml"
    bad_bits.write_text("schemes:\n  - method: rtn\n    bits: 6\n")
    cases = [
        (["--model", str(tmp_path / "nope"), "--recipe", "rtn-w4g128"], "model path does not exist"),
        (["--model", str(bert), "--recipe", "rtn-w4g128"], "not a causal language model"),
        (["--model", str(folder), "--recipe", str(bad_field)], "unknown field 'group'"),
        (["--model", str(folder), "--recipe", str(bad_bits)], "unsupported bit width"),
        (["--model", str(folder), "--recipe", "gptq-w4g128", "--calib", str(empty), "--seqlen", "64"],
         "calibration file has no text"),
        (["--model", str(folder), "--recipe", "gptq-w4g128", "--calib", str(tmp_path / "x.txt"),
          "--seqlen", "64"],
         "calibration file not found"),
    ]
    capsys.readouterr()
    for args, msg in cases:
        code, err = _cli(["quantize", *args, "--out", str(out)], capsys)
        assert code == 2, args
        assert msg in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.glob("out.*")), args


def test_existing_output_of_another_model_needs_overwrite(tiny_model_factory, tmp_path, capsys):
    folder = tiny_model_factory("llama")
    out = tmp_path / "out"
    assert _cli(["quantize", "--model", str(folder), "--recipe", "rtn-w4g128", "--out", str(out)], capsys)[0] == 0
    before = _bytes(out)
    code, err = _cli(["quantize", "--model", str(folder), "--recipe", "rtn-w3g128", "--out", str(out)], capsys)
    assert code == 2 and "already holds a different result" in err and "--overwrite" in err
    assert _bytes(out) == before  # nothing lost
    code, _ = _cli(["quantize", "--model", str(folder), "--recipe", "rtn-w3g128", "--out", str(out),
                    "--overwrite"], capsys)
    assert code == 0 and _bytes(out) != before
    assert json.loads((out / "quantkit_report.json").read_text())["recipe"]["name"] == "rtn-w3g128"


def test_cli_entry_point_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "recipes"], capture_output=True, text=True)
    assert r.returncode == 0 and "gptq-w4g128" in r.stdout


def test_atomic_writes_keep_the_old_file_and_leave_no_temporary(tmp_path, monkeypatch):
    """atomic_write_text and atomic_save_file write beside their path and rename: a failure mid-write (disk full)
    leaves the previous file byte for byte and nothing else in the folder."""
    import safetensors.torch

    from quantkit import checkpoint

    state, weights = tmp_path / "state.json", tmp_path / "layer.safetensors"
    checkpoint.atomic_write_text(state, '{"next_layer": 3}')
    checkpoint.atomic_save_file({"w": torch.arange(4.0)}, weights)
    before = state.read_bytes(), weights.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_save_file({"w": torch.zeros(4)}, weights)
    def torn_write(self, text):
        self.write_bytes(text[:1].encode())
        raise OSError("No space left on device")

    monkeypatch.setattr(Path, "write_text", torn_write)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_write_text(state, '{"next_layer": 4}')
    assert (state.read_bytes(), weights.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.safetensors", "state.json"]
    assert safetensors.torch.load_file(weights)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_resumed_run_keeps_the_finished_layers_in_the_returned_model(tiny_model_factory, calib_file, tmp_path):
    """With ``keep_model``, layers finished before an interruption are rebuilt from the saved progress: the returned
    model computes what an uninterrupted run's does."""
    folder = tiny_model_factory("llama")
    full = _quantize(folder, tmp_path / "full", calib_file, keep_model=True).model
    with killed_after_layer(1), pytest.raises(KeyboardInterrupt):
        _quantize(folder, tmp_path / "resumed", calib_file, keep_model=True)
    res = _quantize(folder, tmp_path / "resumed", calib_file, keep_model=True)
    assert res.report["resumed_at_layer"] == 2
    assert isinstance(res.model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    x = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(res.model(x).logits, full(x).logits)
