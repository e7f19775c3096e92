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
}
DENSE = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
# The linears each decoder layer must end up with as QuantizedLinear, by local name.
EXPECTED = {arch: set(DENSE) for arch in CONFIGS}
EXPECTED["phi3"] = {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"}
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
    assert not _layer_linears(loaded, nn.Linear) - _layer_linears(loaded, QuantizedLinear)
    assert type(loaded.lm_head) is nn.Linear and type(loaded.get_input_embeddings()) is not QuantizedLinear

    # The quantized model stays close to the float one (4-bit on random weights: cosine 0.92 to 0.99 here, the
    # Gemmas lowest, their scaled tied embeddings amplifying the error); a wrongly wired layer would not.
    float_model = AutoModelForCausalLM.from_pretrained(folder)
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
