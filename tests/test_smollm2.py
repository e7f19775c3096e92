"""End to end on the real (bundled) SmolLM2-135M: quantize, reload in a fresh process, generate, and check that
GPTQ beats round-to-nearest on perplexity. Quick calibration here: 16 x 512 C4 tokens; perplexity on the first 4
WikiText-2 windows (the quick protocol's 16 are BENCHMARKS.md's: this test only orders two recipes, in CI time)."""

import json
import subprocess
import sys
import textwrap

import pytest

from quantkit import pipeline
from quantkit.eval.perplexity import wikitext2_perplexity

pytestmark = pytest.mark.slow
CAL = dict(calib="c4", nsamples=16, seqlen=512, seed=0, progress=False)
WINDOWS = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    return {r: pipeline.quantize("smollm2-135m", r, root / r, keep_model=r == "gptq-w4g128", **CAL)
            for r in ("gptq-w4g128", "rtn-w3g128", "gptq-w3g128")}


@pytest.fixture(scope="module")
def quantized(results):
    return {r: res.out for r, res in results.items()}


def test_in_memory_logits_equal_reloaded(results):
    import torch
    from transformers import AutoModelForCausalLM

    res = results["gptq-w4g128"]
    loaded = AutoModelForCausalLM.from_pretrained(res.out)
    x = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (res.model(x).logits - loaded(x).logits).abs().max().item() <= 1e-5


def test_reload_in_new_process_answers_paris(quantized):
    code = textwrap.dedent(f"""
        import quantkit, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        folder = {str(quantized["gptq-w4g128"])!r}
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert type(model.model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
        tok = AutoTokenizer.from_pretrained(folder)
        msgs = [{{"role": "user", "content": "What is the capital of France?"}}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
        print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout, r.stdout


def test_report_and_last_group_of_576(quantized):
    rep = json.loads((quantized["gptq-w4g128"] / "quantkit_report.json").read_text())
    cfg = json.loads((quantized["gptq-w4g128"] / "config.json").read_text())["quantization_config"]
    assert len(cfg["modules"]) == 30 * 7
    # hidden 576 = 4 * 128 + 64: five groups per row for layers reading the hidden state
    from safetensors import safe_open

    with safe_open(quantized["gptq-w4g128"] / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.self_attn.q_proj.scales").get_shape() == [576, 5]
        assert f.get_slice("model.layers.0.mlp.down_proj.scales").get_shape() == [576, 12]
    assert 4.25 < rep["bits_per_weight"] < 4.35


def test_gptq_beats_rtn_on_perplexity(quantized):
    from quantkit.loading import load_model

    ppl = {}
    for r in ("rtn-w3g128", "gptq-w3g128"):
        model, tok = load_model(str(quantized[r]))
        ppl[r] = wikitext2_perplexity(model, tok, windows=WINDOWS, progress=False).ppl
    assert ppl["gptq-w3g128"] < ppl["rtn-w3g128"], ppl
