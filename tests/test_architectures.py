"""Architectures (issue 21): tiny random models of each supported family quantize with GPTQ, reload to the
in-memory model's logits, save again to the same logits, and generate the same tokens from memory and from
disk; every decoder-layer linear is quantized (MoE: every expert's own, the router left alone); the walk feeds
each layer what the model itself feeds it; a model the walk cannot follow is one clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import quantkit  # noqa: F401  (registers the quantizer with transformers)
from quantkit import pipeline
from quantkit.calibration.capture import capture_inputs, run_layer
from quantkit.errors import QuantkitError
from quantkit.model import decoder_layers
from quantkit.nn import QuantizedLinear

COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# A sliding window shorter than the calibration sequences (64), so that a layer fed another layer's mask is wrong.
CONFIGS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", dict(sliding_window=32)),
    "qwen2": ("qwen2", dict(use_sliding_window=True, sliding_window=32, max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=16, use_sliding_window=True, sliding_window=32, max_window_layers=1)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=32, query_pre_attn_scalar=16, layer_types=SLIDING)),
    "phi3": ("phi3", {}),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96,
                                    shared_expert_intermediate_size=160)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
}
MOE = ["qwen2_moe", "qwen3_moe", "mixtral"]
DENSE = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
# The linears each decoder layer must end up with as QuantizedLinear, by local name.
EXPECTED = {arch: set(DENSE) for arch in CONFIGS}
EXPECTED["phi3"] = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
# MoE: every expert's own projections, named as the checkpoint names them (Mixtral's w1 = gate, w3 = up, w2 = down)
EXPERTS = {f"mlp.experts.{e}.{p}_proj" for e in range(4) for p in ("gate", "up", "down")}
EXPECTED["qwen2_moe"] = set(DENSE[:4]) | EXPERTS | {f"mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")}
EXPECTED["qwen3_moe"] = set(DENSE[:4]) | EXPERTS
EXPECTED["mixtral"] = set(DENSE[:4]) | {f"mlp.experts.{e}.w{i}" for e in range(4) for i in (1, 2, 3)}
# Linears left in full precision: routers (the top-k routers are not Linear modules at all)
ROUTERS = {"qwen2_moe": {"mlp.shared_expert_gate"}}
CAL = dict(nsamples=4, seqlen=64)


@pytest.fixture(scope="module")
def make_model(tmp_path_factory, smollm2_folder):
    """``make(arch) -> folder``: a tiny random model of ``arch`` (CONFIGS) with SmolLM2's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            model_type, extra = CONFIGS[arch]
            folder = tmp_path_factory.mktemp(f"arch-{arch}")
            torch.manual_seed(1)
            config = AutoConfig.for_model(model_type, **{**COMMON, **extra})
            AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
            AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(folder)
            made[arch] = folder
        return made[arch]

    return make


def _quantized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def _layer_linears(model: nn.Module, kind: type) -> set[str]:
    """Local names (``self_attn.q_proj``) of the ``kind`` modules inside the decoder layers, over all layers."""
    return {n.split(".", 3)[3] for n, m in model.named_modules() if isinstance(m, kind) and ".layers." in n}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_quantize_reload_resave_generate(arch, make_model, calib_file, tmp_path, assert_round_trip):
    from transformers import AutoModelForCausalLM

    folder, out = make_model(arch), tmp_path / "q"
    res = pipeline.quantize(str(folder), "gptq-w4g128", out, calib=str(calib_file), progress=False,
                            keep_model=True, **CAL)
    loaded = assert_round_trip(res.model, out)
    names = set(json.loads((out / "config.json").read_text())["quantization_config"]["modules"])
    assert _quantized_names(loaded) == _quantized_names(res.model) == names
    assert _layer_linears(loaded, QuantizedLinear) == EXPECTED[arch]
    assert len(names) == len(EXPECTED[arch]) * COMMON["num_hidden_layers"]
    assert _layer_linears(loaded, nn.Linear) - _layer_linears(loaded, QuantizedLinear) == ROUTERS.get(arch, set())
    assert type(loaded.lm_head) is nn.Linear and type(loaded.get_input_embeddings()) is not QuantizedLinear
    float_model = AutoModelForCausalLM.from_pretrained(folder)
    if arch in MOE:  # the routers are the float model's, untouched
        for ours, theirs in zip(loaded.model.layers, float_model.model.layers, strict=True):
            assert torch.equal(ours.mlp.gate.weight, theirs.mlp.gate.weight)
            if arch in ROUTERS:
                assert torch.equal(ours.mlp.shared_expert_gate.weight, theirs.mlp.shared_expert_gate.weight)

    # The quantized model stays close to the float one (4-bit on random weights: cosine 0.92 to 0.99 here, the
    # Gemmas lowest, their scaled tied embeddings amplifying the error); a wrongly wired layer would not.
    x = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = float_model(x).logits, loaded(x).logits
    assert torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0) > 0.85

    prompt = torch.tensor([[1, 504, 3458, 314, 260, 1345]])
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        from_memory = res.model.generate(prompt, **kw)
        from_disk = loaded.generate(prompt, **kw)
    assert from_memory.shape == (1, prompt.shape[1] + 5)
    assert torch.equal(from_memory, from_disk)


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_each_layer_gets_what_the_model_feeds_it(arch, make_model):
    """The walk's inputs of layer i (captured once, then run layer by layer) are the model's own: the hidden
    states and, per layer, the mask and position embeddings of that layer's attention type."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(make_model(arch)).eval()
    ids = torch.randint(0, COMMON["vocab_size"], (3, 64), generator=torch.Generator().manual_seed(2))
    _, layers = decoder_layers(model)
    seen: list[torch.Tensor] = []
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kw: seen.append(kw.get("hidden_states", *args[:1])),
                                             with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    calib = capture_inputs(model, layers, ids, torch.device("cpu"))
    assert len(seen) == len(layers) and len(calib.hidden) == 1
    for i, layer in enumerate(layers):
        assert (calib.hidden[0] - seen[i]).abs().max().item() <= 1e-5, f"layer {i}"
        run_layer(layer, calib, keep_outputs=True, index=i)


def test_a_model_without_a_layer_list_names_what_was_looked_for(tmp_path, smollm2_folder, calib_file):
    """GPT-2 keeps its blocks in ``transformer.h``: no ``*layers`` ModuleList of ``num_hidden_layers`` entries."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=32, n_layer=2, n_head=2, n_positions=128)).save_pretrained(
        tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(QuantkitError, match=r"decoder layers of GPT2LMHeadModel.*ModuleList.*layers.*2 entries"):
        pipeline.quantize(str(tmp_path / "gpt2"), "gptq-w4g128", tmp_path / "q", calib=str(calib_file),
                          progress=False, **CAL)
    assert not (tmp_path / "q").exists()


def test_a_model_that_is_not_a_causal_lm_is_refused(tmp_path, smollm2_folder, calib_file):
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(vocab_size=49152, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                        num_heads=2)).save_pretrained(tmp_path / "t5")
    AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(tmp_path / "t5")
    with pytest.raises(QuantkitError, match="'t5' is not a causal language model"):
        pipeline.quantize(str(tmp_path / "t5"), "gptq-w4g128", tmp_path / "q", calib=str(calib_file),
                          progress=False, **CAL)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("arch", MOE)
def test_split_experts_compute_the_fused_experts_and_see_only_their_tokens(arch, make_model):
    """quantkit's per-expert module, built from transformers' fused one, gives the same block output; each
    expert's Hessian (the hessian collector on its linears) is ``2 XᵀX / n`` over exactly the tokens the router
    sends it, gate and up sharing theirs, down's over its own inputs."""
    from transformers import AutoModelForCausalLM

    from quantkit.calibration.collectors import HessianCollector
    from quantkit.nn.experts import SplitExperts, expert_layout

    model = AutoModelForCausalLM.from_pretrained(make_model(arch)).eval()
    mlp, layout = model.model.layers[1].mlp, expert_layout(model)
    x = torch.randn(2, 40, COMMON["hidden_size"], generator=torch.Generator().manual_seed(4))
    fused = mlp.experts
    with torch.no_grad():
        ref = mlp(x)
        _, _, top_k = mlp.gate(x.reshape(-1, x.shape[-1]))
    mlp.experts = SplitExperts.from_fused("mlp.experts", fused, layout)
    names = {f"experts.{e}.{p}": getattr(mlp.experts.expert(e), p) for e in range(4)
             for p in (layout.gate, layout.up, layout.down)}
    collector = HessianCollector(mlp, names, torch.device("cpu"))
    with torch.no_grad(), collector.collecting():
        got = mlp(x)
        collector.end_chunk()
    assert (got - ref).abs().max().item() <= 1e-5
    H = collector.results()
    flat = x.reshape(-1, x.shape[-1])
    for e in range(4):
        X = flat[(top_k == e).any(dim=-1)]
        assert 0 < len(X) < len(flat)
        W = fused.gate_up_proj[e].detach()
        inner = fused.act_fn(X @ W[: W.shape[0] // 2].T) * (X @ W[W.shape[0] // 2 :].T)
        for name, inputs in ((layout.gate, X), (layout.up, X), (layout.down, inner)):
            want = 2 * inputs.T @ inputs / len(inputs)
            assert torch.allclose(H[f"experts.{e}.{name}"], want, rtol=1e-4, atol=1e-6), (e, name)


def test_an_expert_no_token_reaches_is_rounded_to_nearest(make_model, calib_file, tmp_path, monkeypatch, caplog):
    """No statistics for an expert the router never picks (simulated: its observations dropped): it is rounded to
    nearest, as the RTN recipe rounds it, with a warning and a note in the report."""
    from quantkit.calibration.collectors import HessianCollector

    folder = make_model("qwen3_moe")
    rtn = pipeline.quantize(str(folder), "rtn-w4g128", tmp_path / "rtn", calib=str(calib_file), progress=False,
                            keep_model=True, **CAL).model
    observe = HessianCollector.observe
    monkeypatch.setattr(HessianCollector, "observe",
                        lambda self, name, x: None if name.startswith("mlp.experts.3.") else observe(self, name, x))
    res = pipeline.quantize(str(folder), "gptq-w4g128", tmp_path / "q", calib=str(calib_file), progress=False,
                            keep_model=True, **CAL)
    name = "model.layers.2.mlp.experts.3.down_proj"
    assert "identity" in res.report["layers"][name]["hessian"]
    assert "hessian" not in res.report["layers"]["model.layers.2.mlp.experts.2.down_proj"]
    assert "no calibration token reached it" in caplog.text
    eye = torch.eye(96)
    with torch.no_grad():
        ours, theirs = res.model.get_submodule(name)(eye), rtn.get_submodule(name)(eye)
        other = res.model.get_submodule(name.replace(".3.", ".2."))(eye)
    assert torch.equal(ours, theirs)
    assert not torch.equal(other, rtn.get_submodule(name.replace(".3.", ".2."))(eye))  # GPTQ where tokens came


def test_a_recipe_quantizing_part_of_a_blocks_experts_is_refused(make_model, calib_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('name: partial\nignore: ["re:.*experts\\\\.0\\\\.down_proj"]\n'
                      'schemes:\n  - targets: ["re:.*"]\n    method: rtn\n    bits: 4\n    group_size: 128\n')
    with pytest.raises(QuantkitError, match=r"some expert linears of model\.layers\.0\.mlp\.experts but not "
                                            r"model\.layers\.0\.mlp\.experts\.0\.down_proj"):
        pipeline.quantize(str(make_model("qwen3_moe")), recipe, tmp_path / "q", calib=str(calib_file),
                          progress=False, **CAL)
    assert not (tmp_path / "q").exists()


def test_fused_experts_in_another_layout_are_refused(tmp_path, smollm2_folder, calib_file):
    """GPT-OSS keeps its experts transposed, interleaved and with biases: one error naming the module, not a model
    quantized everywhere but its experts."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model("gpt_oss", **{**COMMON, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
                                  num_experts_per_tok=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "oss")
    AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(tmp_path / "oss")
    with pytest.raises(QuantkitError, match=r"model\.layers\.0\.mlp\.experts \(GptOssExperts\): fused experts in "
                                            r"another layout.*is_transposed=True.*not supported"):
        pipeline.quantize(str(tmp_path / "oss"), "gptq-w4g128", tmp_path / "q", calib=str(calib_file),
                          progress=False, **CAL)
    assert not (tmp_path / "q").exists()


def test_experts_a_recipe_leaves_alone_are_stored_as_the_model_holds_them(make_model, tmp_path, assert_round_trip):
    """A recipe may leave every expert in full precision: they are written fused (transformers' own parameters,
    which its loader expects for experts without quantized linears), the attention quantized."""
    from safetensors import safe_open

    recipe = tmp_path / "r.yaml"
    recipe.write_text('name: attention-only\nignore: ["re:.*experts.*"]\n'
                      'schemes:\n  - targets: ["re:.*"]\n    method: rtn\n    bits: 4\n    group_size: 128\n')
    res = pipeline.quantize(str(make_model("mixtral")), recipe, tmp_path / "q", progress=False, keep_model=True)
    loaded = assert_round_trip(res.model, tmp_path / "q")
    assert _layer_linears(loaded, QuantizedLinear) == set(DENSE[:4])
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        experts = {k.split(".", 3)[3] for k in f.keys() if ".experts." in k}
    assert experts == {"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}
