"""LoRA (PEFT) on quantized models and transformers' Trainer (quantkit.hf.peft): a plain ``LoraConfig`` wraps the
packed layers, only adapters train, the packed tensors never change, the adapter saves and reloads with PEFT's own
API to the same logits, merging is refused. Also the backward of the fused ops (quantkit.kernels.ops) under the
Triton interpreter."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import quantkit
from quantkit import pipeline
from quantkit.config import LayerScheme
from quantkit.errors import QuantkitError
from quantkit.nn import QuantizedLinear

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from quantkit.hf.peft import QuantkitLoraLinear, register  # noqa: E402

QV = ["q_proj", "v_proj"]
TOKENS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def _quantize(folder, out, calib_file, **scheme):
    recipe = quantkit.Recipe.from_dict({"name": "t", "ignore": scheme.pop("ignore", []),
                                        "schemes": [{"targets": ["re:.*"], "bits": 4, "group_size": 32, **scheme}]})
    pipeline.quantize(str(folder), recipe, out, calib=str(calib_file), nsamples=4, seqlen=64, progress=False)
    return out


@pytest.fixture(scope="module")
def gptq_dir(tiny_llama, calib_file, tmp_path_factory):
    """The tiny Llama, GPTQ W4 g32 with act-order (a permutation in every layer)."""
    return _quantize(tiny_llama, tmp_path_factory.mktemp("peft") / "gptq", calib_file, method="gptq", act_order=True)


@pytest.fixture(scope="module")
def rtn_dense_v_dir(tiny_llama, calib_file, tmp_path_factory):
    """RTN W4 g32 with every ``v_proj`` left dense (an ``nn.Linear``)."""
    return _quantize(tiny_llama, tmp_path_factory.mktemp("peft") / "rtn", calib_file, method="rtn",
                     ignore=["re:.*v_proj"])


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder)


def _randomize_adapters(model, seed=0):
    """LoRA starts with B = 0 (a no-op); give every adapter weight random values so it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _packed(model) -> dict[str, torch.Tensor]:
    """Copies of every stored tensor of every ``QuantizedLinear`` (codes, scales, zeros, permutations, signs)."""
    return {f"{n}.{k}": t.detach().clone() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)
            for k, t in m.tensors.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantkitLoraLinear)}


@pytest.mark.parametrize("targets", [QV, "all-linear"], ids=["q,v", "all-linear"])
def test_plain_lora_config_trains_adapters_only(gptq_dir, targets):
    model = get_peft_model(_load(gptq_dir), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    layers = _lora_layers(model)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    expected = 3 * (2 if targets == QV else 7)
    wrapped = {n.removesuffix(".base_layer") for n in quantized if n.endswith(".base_layer")}
    assert wrapped == layers.keys() and len(quantized) == 21  # every packed layer targeted is wrapped, nothing else
    assert len(layers) == expected and not isinstance(model.base_model.model.lm_head, QuantkitLoraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * expected

    _randomize_adapters(model)
    packed = _packed(model)
    before = model(input_ids=TOKENS).logits.detach()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        for n, p in model.named_parameters():
            assert (p.grad is not None) == (n in trainable), n
            if p.grad is not None:
                assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
        opt.step()
    assert len(packed) == 21 * 4 and _same(_packed(model), packed)  # qweight, scales, zeros, perm
    assert not torch.equal(model(input_ids=TOKENS).logits, before)


def test_lora_layer_is_base_plus_delta(gptq_dir):
    model = get_peft_model(_load(gptq_dir), LoraConfig(r=4, lora_alpha=8, target_modules=QV))
    _randomize_adapters(model)
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    base = layer.get_base_layer()
    x = torch.randn(3, 5, base.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = base(x) + x @ layer.get_delta_weight("default").T
        assert (layer(x) - expected).abs().max().item() < 1e-5
        with model.disable_adapter():
            assert torch.equal(layer(x), base(x))


def test_trainer_loss_decreases_and_base_stays_packed(gptq_dir, tmp_path):
    from datasets import Dataset

    torch.manual_seed(0)
    model = get_peft_model(_load(gptq_dir), LoraConfig(r=8, lora_alpha=16, target_modules=QV))
    packed = _packed(model)
    # A short repeated phrase. The frozen tied head of this random model caps how far the loss can fall (its
    # logits are small), so the check is a steady fall (about 0.4 nats over the 8 steps), not a fit.
    ids = torch.arange(100, 116).repeat(8, 2)  # 8 rows of 32 tokens
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=2e-2,
                             logging_steps=1, report_to=[], save_strategy="no", seed=0, use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.3, losses
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.6, losses
    assert _same(_packed(model), packed)


def test_adapter_saves_and_reloads_to_identical_logits(gptq_dir, tmp_path):
    model = get_peft_model(_load(gptq_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    _randomize_adapters(model)
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # the adapter only, no packed tensors
    reloaded = PeftModel.from_pretrained(_load(gptq_dir), tmp_path / "adapter")
    assert len(_lora_layers(reloaded)) == len(_lora_layers(model))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits)


def test_merge_is_refused_and_unload_keeps_the_packed_base(gptq_dir):
    with torch.no_grad():
        base_logits = _load(gptq_dir)(input_ids=TOKENS).logits
    model = get_peft_model(_load(gptq_dir), LoraConfig(r=4, target_modules=QV))
    _randomize_adapters(model)
    with pytest.raises(QuantkitError, match=r"cannot merge the LoRA adapter into model\.layers\.0\.self_attn\.q_proj"
                                            r": its weight is packed \(quantkit-uniform, 4-bit\)"):
        model.merge_and_unload()
    with pytest.raises(QuantkitError, match="not on the quantization grid"):
        model.merge_adapter()
    unloaded = model.unload()
    assert isinstance(unloaded.model.layers[0].self_attn.q_proj, QuantizedLinear)
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=TOKENS).logits, base_logits)


def test_dense_linear_targets_still_work(rtn_dense_v_dir):
    for targets in (QV, "all-linear"):
        model = get_peft_model(_load(rtn_dense_v_dir), LoraConfig(r=4, target_modules=targets))
        attn = model.base_model.model.model.layers[0].self_attn
        assert isinstance(attn.q_proj, QuantkitLoraLinear)
        assert type(attn.v_proj) is PeftLoraLinear and type(attn.v_proj.base_layer) is nn.Linear
        _randomize_adapters(model)
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        assert attn.v_proj.lora_A["default"].weight.grad is not None
        assert attn.q_proj.lora_A["default"].weight.grad is not None
        assert attn.v_proj.base_layer.weight.grad is None


def test_prepare_model_for_kbit_training_keeps_the_packed_tensors(gptq_dir, tmp_path):
    """PEFT's QLoRA preparation freezes everything and upcasts fp16/bf16 parameters to fp32 (those of quantization
    methods it knows excepted), the fp16 scales and zeros included: their values must stay the stored ones, the
    logits unchanged, and a base saved afterwards must hold the format's dtypes (the strict loader checks them)."""
    model = _load(gptq_dir)
    with torch.no_grad():
        packed, logits = _packed(model), model(input_ids=TOKENS).logits
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        after = _packed(model)
        assert after.keys() == packed.keys() and all(torch.equal(after[k].to(v.dtype), v) for k, v in packed.items())
        assert torch.equal(model(input_ids=TOKENS).logits, logits)
        model.save_pretrained(tmp_path / "base")
        assert _same(_packed(_load(tmp_path / "base")), packed)


def test_gradient_checkpointing_gives_the_same_gradients(gptq_dir, monkeypatch):
    # Reentrant checkpointing makes the first layer's input require grad, which sends it to the reference instead
    # of a CPU kernel (quantkit.kernels.cpu): keep both runs on the reference so the gradients compare exactly.
    monkeypatch.setenv("QUANTKIT_CPU_KERNELS", "0")

    def grads(checkpointing: bool):
        model = _load(gptq_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        model = get_peft_model(model, LoraConfig(r=4, target_modules=QV))
        _randomize_adapters(model)
        model.train()
        model(input_ids=TOKENS, labels=TOKENS).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 12
    for n, g in plain.items():
        assert checkpointed[n] is not None and torch.allclose(g, checkpointed[n], atol=1e-6), n


def test_variants_that_need_a_dense_weight_are_refused(gptq_dir):
    with pytest.raises(NotImplementedError, match="only plain LoRA"):
        get_peft_model(_load(gptq_dir), LoraConfig(r=4, target_modules=QV, use_dora=True))
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa' reads the dense weight of"):
        get_peft_model(_load(gptq_dir), LoraConfig(r=4, target_modules=QV, init_lora_weights="pissa"))


def test_a_users_custom_module_mapping_wins(gptq_dir):
    class Mine(QuantkitLoraLinear):
        pass

    register()  # idempotent: a second registration does not stack wrappers
    config = LoraConfig(r=4, target_modules=QV)
    config._register_custom_module({QuantizedLinear: Mine})
    model = get_peft_model(_load(gptq_dir), config)
    assert {type(m) for m in _lora_layers(model).values()} == {Mine}


def _packed_linear(K, N, seed=0, **scheme) -> QuantizedLinear:
    """A ``QuantizedLinear`` with random stored tensors of ``scheme`` (any bit pattern is a valid code)."""
    s = LayerScheme.from_dict(scheme)
    layer = QuantizedLinear(K, N, s, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for name, t in layer.tensors.items():
        if name == "perm":
            t.copy_(torch.randperm(K, generator=g))
        elif name.startswith("rot_"):
            t.copy_(torch.randint(0, 2, t.shape, generator=g) * 2 - 1)
        elif name == "zeros":
            t.copy_(torch.randint(0, 16, t.shape, generator=g))
        elif t.is_floating_point():
            t.copy_(0.01 + 0.02 * torch.rand(t.shape, generator=g) if name == "scales" else torch.randn(t.shape))
        else:
            t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=g, dtype=torch.int64))
    return layer


@pytest.mark.parametrize("scheme", [
    dict(method="rtn", bits=4, group_size=32, rotation="hadamard", rotate_output=True),
    {"method": {"name": "gptq", "act_order": True}, "quantizer": {"name": "vq", "dim": 4, "entries": 256}},
], ids=["hadamard-in-out", "vq"])
def test_custom_model_with_rotated_and_codebook_layers(scheme, monkeypatch):
    """PEFT on a plain module holding packed layers: rotations fused into the stored weight stay inside the base
    layer (the delta is in the basis of ``dequantize()``), and a codebook layer (no ``qweight``) is placed
    correctly."""
    monkeypatch.setenv("QUANTKIT_CPU_KERNELS", "0")  # the reference, to compare with the dense weight
    model = nn.Sequential()
    model.add_module("norm", nn.LayerNorm(64))  # PEFT reads the model's device from its first parameter
    model.add_module("up", _packed_linear(64, 96, **scheme))
    model.add_module("down", _packed_linear(96, 64, seed=1, **scheme))
    register()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["up", "down"]))
    _randomize_adapters(peft_model)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    up = peft_model.base_model.model.up
    with torch.no_grad():
        W = up.get_base_layer().dequantize() + up.get_delta_weight("default")
        assert (up(x) - x @ W.T).abs().max().item() < 1e-5
    peft_model(x).square().mean().backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


# --- gradients through the fused ops (Triton interpreter on CPU; compiled on CUDA with TRITON_INTERPRET=0) --------

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


def _grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g)


@needs_triton
@pytest.mark.parametrize("act_order", [False, True], ids=["stored-order", "act-order"])
def test_uniform_op_backward_matches_the_reference(act_order):
    from test_kernels import DEVICE, activations, make_layer

    from quantkit.formats.uniform import uniform_matmul_ref
    from quantkit.kernels.ops import uniform_matmul_triton

    layer = make_layer(40, 96, 3, 32, symmetric=False, act_order=act_order, bias=True)
    layer["bias"].requires_grad_(True)
    x = activations(2, 5, 96).requires_grad_(True)
    y = uniform_matmul_triton(x, layer["qweight"], layer["scales"], layer["zeros"], layer["perm"], layer["bias"],
                              bits=3, group_size=32)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = _grads(y, (x, layer["bias"]), g)
    ref = _grads(uniform_matmul_ref(x, **layer, bits=3, group_size=32), (x, layer["bias"]), g)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    torch.library.opcheck(uniform_matmul_triton, (x, *(layer[k] for k in ("qweight", "scales", "zeros", "perm",
                                                                          "bias"))), {"bits": 3, "group_size": 32})


@needs_triton
def test_uniform_op_backward_with_the_rotation_inside():
    from test_kernels import DEVICE, activations, make_layer

    from quantkit.formats.uniform import uniform_matmul_ref
    from quantkit.kernels.ops import uniform_matmul_triton
    from quantkit.rotations import HadamardRotation, hadamard_layout, random_signs

    layer = make_layer(40, 128, 4, 32, symmetric=True, act_order=False)
    rot = HadamardRotation(random_signs(128, 0, "k").to(DEVICE))
    x = activations(3, 128).requires_grad_(True)
    y = uniform_matmul_triton(x, layer["qweight"], layer["scales"], None, None, None, None, rot.signs, bits=4,
                              group_size=32, rot_block=hadamard_layout(128).block)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (got,) = _grads(y, (x,), g)
    (ref,) = _grads(uniform_matmul_ref(rot.apply(x), layer["qweight"], layer["scales"], None, None, None, bits=4,
                                       group_size=32), (x,), g)
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@needs_triton
def test_codebook_op_backward_matches_the_reference():
    from test_kernel_codebook import DEVICE, activations, make_layer, reference

    from quantkit.kernels.ops import codebook_matmul_triton

    tensors, bias = make_layer(40, 96, 4, 8, act_order=True, bias=True)
    bias.requires_grad_(True)
    x = activations(2, 96).requires_grad_(True)
    y = codebook_matmul_triton(x, tensors["codes"], tensors["codebook"], tensors["scales"], tensors["perm"], bias,
                               dim=4, bits=8)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = _grads(y, (x, bias), g)
    ref = _grads(reference(x, tensors, bias, 4, 8), (x, bias), g)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@needs_triton
def test_hadamard_kernels_leave_gradients_to_pytorch():
    """The Triton transforms have no backward: a CUDA input that needs a gradient takes the PyTorch transform.
    (Fake CUDA tensors: no GPU needed.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from quantkit.kernels import dispatch
    from quantkit.rotations import hadamard_layout

    layout = hadamard_layout(128)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 128, device="cuda")
        for fused in (True, False):
            assert dispatch.hadamard_kernel(x, layout, fused=fused) is not None
            assert dispatch.hadamard_kernel(x.requires_grad_(True), layout, fused=fused) is None
            with torch.no_grad():
                assert dispatch.hadamard_kernel(x, layout, fused=fused) is not None
            x = x.detach()


def test_the_fine_tuning_example_runs(gptq_dir, capsys):
    """examples/finetune_lora.py end to end on the tiny model (README, "Fine-tuning with LoRA")."""
    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_lora.py"
    spec = importlib.util.spec_from_file_location("finetune_lora", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main([str(gptq_dir), "--tokens", "128", "--seqlen", "32", "--steps", "3", "--batch", "2"])
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("step")] == ["1", "2", "3"]
    assert "4 blocks of 32 tokens" in out and "max |logit difference| 0\n" in out
