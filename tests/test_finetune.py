"""quantkit finetune (issue 17): KL to the teacher decreases, only the trainable tensors change, the output reloads
to the tuned logits, a killed run resumes to the same bytes, the differentiable dequantization's gradients, and
clear errors. Tiny models only."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from quantkit import pipeline
from quantkit.config import Recipe
from quantkit.errors import QuantkitError
from quantkit.finetune import finetune, kl_loss
from quantkit.formats import get_format
from quantkit.nn.linear import QuantizedLinear
from quantkit.verify import verify

_VQ = {"targets": ["re:.*"], "method": "gptq", "act_order": True, "grid": "vq", "dim": 4, "entries": 16,
       "rotation": "hadamard"}
_UNIFORM = {"targets": ["re:.*"], "method": "rtn", "bits": 2, "group_size": 32}


@pytest.fixture(scope="module")
def quantized(tiny_model_factory, calib_file, tmp_path_factory):
    """``make(kind) -> folder``: the tiny Llama quantized with vq (hadamard, act-order) or 2-bit uniform."""
    made = {}

    def make(kind: str):
        if kind not in made:
            scheme = {"vq": _VQ, "uniform": _UNIFORM}[kind]
            out = tmp_path_factory.mktemp(f"q-{kind}") / "q"
            pipeline.quantize(str(tiny_model_factory("llama")), Recipe.from_dict({"name": kind,
                                                                                  "schemes": [scheme]}),
                              out, calib=str(calib_file), nsamples=4, seqlen=64, progress=False)
            made[kind] = out
        return made[kind]

    return make


def _run(q, out, calib_file, **kw):
    kw = {"steps": 12, "lr": 3e-3, "nsamples": 4, "seqlen": 32, "checkpoint_every": 4, "progress": False, **kw}
    return finetune(q, out, calib=str(calib_file), **kw)


class Killed(Exception):
    pass


def _kill_at(n):
    """An ``on_step`` that stops the run (as a kill would) after step ``n``."""
    def kill(step, loss):
        if step == n:
            raise Killed
    return kill


@pytest.mark.parametrize("kind", ["vq", "uniform"])
def test_kl_decreases_and_only_trainable_tensors_change(kind, quantized, calib_file, tmp_path, assert_round_trip):
    q = quantized(kind)
    r = _run(q, tmp_path / "ft", calib_file, steps=24)
    f = r.report["finetune"]
    assert f["loss_last_mean"] < 0.8 * f["loss_first_mean"], f["losses"]
    before = load_file(q / "model.safetensors")
    after = load_file(tmp_path / "ft" / "model.safetensors")
    assert set(before) == set(after)
    trainable = {"vq": ("codebook", "scales"), "uniform": ("scales",)}[kind]
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    allowed = {k for k in before if k.rsplit(".", 1)[-1] in trainable or k.endswith("norm.weight")}
    assert changed <= allowed and changed, sorted(changed - allowed)
    assert any(k.endswith("norm.weight") for k in changed) and any(k.endswith(".scales") for k in changed)
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape
    assert r.report["bits_per_weight"] == json.loads((q / "quantkit_report.json").read_text())["bits_per_weight"]
    verify(tmp_path / "ft")  # config, every tensor's shape and dtype, checksums
    # quantkit eval and report name the row as tuned: same recipe and bits, other values
    from quantkit.eval.model_info import describe_model
    from quantkit.loading import resolve_model

    assert describe_model(resolve_model(str(tmp_path / "ft")), r.model).method.endswith(" + finetune 24 steps")
    assert " + finetune" not in describe_model(resolve_model(str(q)), r.model).method
    # save → reload gives the tuned model's logits
    assert_round_trip(r.model, tmp_path / "ft")


def test_resume_after_a_kill_is_byte_identical(quantized, calib_file, tmp_path):
    q = quantized("vq")
    _run(q, tmp_path / "whole", calib_file, steps=10)

    with pytest.raises(Killed):
        _run(q, tmp_path / "cut", calib_file, steps=10, on_step=_kill_at(6))  # after the step-4 checkpoint
    assert not (tmp_path / "cut").exists()
    assert json.loads((tmp_path / "cut.quantkit-partial" / "state.json").read_text())["step"] == 4
    r = _run(q, tmp_path / "cut", calib_file, steps=10)
    assert r.report["finetune"]["resumed_at_step"] == 4
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == (tmp_path / "cut" /
                                                                        "model.safetensors").read_bytes()
    whole = json.loads((tmp_path / "whole" / "quantkit_report.json").read_text())["finetune"]["losses"]
    assert r.report["finetune"]["losses"] == whole
    assert not (tmp_path / "cut.quantkit-partial").exists()
    # the same command again: the output already holds this result
    assert _run(q, tmp_path / "cut", calib_file, steps=10).skipped


def test_a_run_stopped_at_a_checkpoint_is_published_with_fewer_steps(quantized, calib_file, tmp_path):
    """--steps is not in the state's fingerprint: a 10-step run killed after its step-8 checkpoint, rerun with
    --steps 8, ends with the bytes of an uninterrupted 8-step run; a state past --steps is not used."""
    q = quantized("vq")
    _run(q, tmp_path / "eight", calib_file, steps=8)

    with pytest.raises(Killed):
        _run(q, tmp_path / "cut", calib_file, steps=10, on_step=_kill_at(8))
    r = _run(q, tmp_path / "cut", calib_file, steps=8)
    assert r.report["finetune"]["resumed_at_step"] == 8 and r.report["finetune"]["settings"]["steps"] == 8
    assert (tmp_path / "eight" / "model.safetensors").read_bytes() == (tmp_path / "cut" /
                                                                        "model.safetensors").read_bytes()
    with pytest.raises(Killed):
        _run(q, tmp_path / "past", calib_file, steps=10, on_step=_kill_at(8))
    r = _run(q, tmp_path / "past", calib_file, steps=4)
    assert r.report["finetune"]["resumed_at_step"] == 0 and len(r.report["finetune"]["losses"]) == 4


def test_teacher_cache_changes_time_not_result(quantized, calib_file, tmp_path, monkeypatch):
    """Kept teacher logits (the default at this size) and logits recomputed every step give the same bytes."""
    import quantkit.finetune as ft

    q = quantized("vq")
    kept = _run(q, tmp_path / "kept", calib_file, steps=10)  # 4 windows, 10 steps: every window is seen again
    assert kept.report["finetune"]["teacher_logits_cached"]
    monkeypatch.setattr(ft, "TEACHER_CACHE_BYTES", 0)
    fresh = _run(q, tmp_path / "fresh", calib_file, steps=10)
    assert not fresh.report["finetune"]["teacher_logits_cached"]
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == (tmp_path / "fresh" /
                                                                       "model.safetensors").read_bytes()
    assert kept.report["finetune"]["losses"] == fresh.report["finetune"]["losses"]


@pytest.mark.parametrize("kind", ["quantkit-vq", "quantkit-aq", "quantkit-uniform"])
def test_dequantize_gradient_matches_finite_differences(kind):
    """d/dθ of <G, W(θ)> for each trainable tensor θ, against central differences in float64."""
    from quantkit.config import LayerScheme

    torch.manual_seed(0)
    spec = {"quantkit-vq": {"method": "gptq", "grid": "vq", "dim": 4, "entries": 8, "act_order": True},
            "quantkit-aq": {"method": "gptq", "grid": "aq", "dim": 4, "entries": 8, "codebooks": 2,
                            "act_order": True},
            "quantkit-uniform": {"method": "rtn", "bits": 3, "group_size": 16, "symmetric": False}}[kind]
    scheme = LayerScheme.from_dict(spec)
    fmt = get_format(scheme.format)
    assert fmt.name == kind
    out_f, in_f = 6, 32
    tensors = {}
    for name, (shape, dtype) in fmt.tensor_specs(scheme, in_f, out_f).items():
        if name == "perm":
            tensors[name] = torch.randperm(in_f).to(dtype)
        elif dtype.is_floating_point:
            tensors[name] = (torch.rand(shape) + 0.5).to(dtype) if name != "zeros" else torch.full(shape, 3.0)
        else:
            tensors[name] = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int64).to(dtype)
    G = torch.randn(out_f, in_f, dtype=torch.float64)
    for name in fmt.trainable(scheme):
        theta = tensors[name].double().requires_grad_(True)
        f = (fmt.dequantize({**tensors, name: theta}, scheme, in_f).double() * G).sum()
        (grad,) = torch.autograd.grad(f, theta)
        fd = torch.zeros_like(theta)
        for i in range(theta.numel()):
            e = torch.zeros(theta.numel(), dtype=torch.float64)
            e[i] = 0.25  # W is linear in each trainable tensor: a wide step, against fp32 rounding
            e = e.view_as(theta)
            hi = (fmt.dequantize({**tensors, name: theta.detach() + e}, scheme, in_f).double() * G).sum()
            lo = (fmt.dequantize({**tensors, name: theta.detach() - e}, scheme, in_f).double() * G).sum()
            fd.view(-1)[i] = (hi - lo) / 0.5
        assert torch.allclose(grad, fd, rtol=1e-4, atol=1e-4), name
        assert grad.abs().sum() > 0


def test_tuning_forward_equals_the_stored_forward(quantized):
    """Before any step, the differentiable forward (rotations included) gives the dispatch's output."""
    from quantkit.loading import load_model

    model, _ = load_model(quantized("vq"), dtype=torch.float32)
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantizedLinear)
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        ref = layer(x)
    params = layer.start_tuning()
    assert set(params) == {"codebook", "scales"}
    y = layer(x)
    assert torch.allclose(y, ref, atol=1e-5)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    layer.stop_tuning()
    with torch.no_grad():
        assert torch.equal(layer(x), ref)


def test_kl_loss_against_a_direct_sum():
    t, s = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    p, q = t.softmax(-1), s.softmax(-1)
    assert torch.allclose(kl_loss(t, s), (p * (p.log() - q.log())).sum(-1).mean(), atol=1e-6)
    assert kl_loss(t, t).abs() < 1e-6


def test_errors_are_one_line_and_leave_nothing(quantized, tiny_model_factory, calib_file, tmp_path):
    from faultkit import expect_clean, run_cli

    q = quantized("uniform")
    cases = [
        (["--model", q, "--steps", "0"], "--steps must be > 0"),
        (["--model", tiny_model_factory("llama")], "quantization_config.quant_method"),
        (["--model", tmp_path / "nowhere"], "not a folder"),
        (["--model", q, "--teacher", tiny_model_factory("qwen2")], "--teacher"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"o{i}"
        o = run_cli("finetune", *args, "--out", out, "--calib", calib_file, "--nsamples", "2", "--seqlen", "16")
        expect_clean(o, needle)
        assert not out.exists() and not list(tmp_path.glob(f"o{i}.*"))


def test_the_fingerprint_covers_settings_and_input(quantized, calib_file, tmp_path):
    """Other settings never resume another run's state nor replace its output without --overwrite; other input
    content (same path) is another run too."""
    import shutil

    q = tmp_path / "q"
    shutil.copytree(quantized("uniform"), q)

    with pytest.raises(Killed):
        _run(q, tmp_path / "ft", calib_file, steps=4, checkpoint_every=2, on_step=_kill_at(2))
    r = _run(q, tmp_path / "ft", calib_file, steps=4, checkpoint_every=2, lr=1e-3)  # another lr: starts over
    assert r.report["finetune"]["resumed_at_step"] == 0
    with pytest.raises(QuantkitError, match="already holds a different result"):
        _run(q, tmp_path / "ft", calib_file, steps=4, checkpoint_every=2)
    assert _run(q, tmp_path / "ft", calib_file, steps=4, checkpoint_every=2, lr=1e-3).skipped
    # the same path, other content: another run
    from quantkit.checkpoint import write_shards

    t = {k: v.clone() for k, v in load_file(q / "model.safetensors").items()}
    (q / "model.safetensors").unlink()  # a new file, not the mapped one rewritten

    k = next(k for k in t if k.endswith("norm.weight"))
    t[k] = t[k] * 2
    write_shards(t, q)
    with pytest.raises(QuantkitError, match="already holds a different result"):
        _run(q, tmp_path / "ft", calib_file, steps=4, checkpoint_every=2, lr=1e-3)
