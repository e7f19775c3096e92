"""The end-to-end decode benchmark's model and loop, run on CPU with a tiny config (speed is measured on GPU only)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import decode_bench
from benchmarks.kernel_bench import BenchScheme
from quantkit.nn import QuantizedLinear


@pytest.mark.parametrize("fmt", ["w4g128", "w3g128", "w2g64", "w4g32-sym-act"])
def test_packed_model_computes_its_dequantized_weights(fmt):
    """Every decoder linear becomes a QuantizedLinear of the asked format, and the packed model's logits equal those
    of a dense model holding the dequantized weights: the benchmark times a model that really runs that format."""
    fmt = BenchScheme.parse(fmt)
    model = decode_bench.build_model("tiny", torch.device("cpu"), torch.float32)
    n_layers = model.config.num_hidden_layers
    assert decode_bench.pack_decoder_linears(model, fmt) == 7 * n_layers
    packed = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(packed) == 7 * n_layers
    assert not any(isinstance(m, nn.Linear) for name, m in model.named_modules() if ".layers." in f".{name}")
    assert all(m.scheme.quantizer.bits == fmt.bits and m.scheme.quantizer.group_size == fmt.group_size
               for m in packed)
    assert all(("zeros" not in m.tensors) == fmt.symmetric and ("perm" in m.tensors) == fmt.act_order for m in packed)

    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.inference_mode():
        got = model(input_ids=ids).logits
        for name, m in list(model.named_modules()):
            if isinstance(m, QuantizedLinear):
                dense = nn.Linear(m.in_features, m.out_features, bias=False)
                dense.weight.data = m.dequantize()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, dense)
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_repacking_replaces_the_previous_format():
    model = decode_bench.build_model("tiny", torch.device("cpu"), torch.float32)
    decode_bench.pack_decoder_linears(model, BenchScheme.parse("w4g128"))
    decode_bench.pack_decoder_linears(model, BenchScheme.parse("w2g64"))
    assert {(m.scheme.quantizer.bits, m.scheme.quantizer.group_size) for m in model.modules()
            if isinstance(m, QuantizedLinear)} == {
        (2, 64)
    }


def test_decode_loop_matches_generate():
    """The timed loop is greedy decoding with a static cache: its tokens equal transformers' generate()."""
    model = decode_bench.build_model("tiny", torch.device("cpu"), torch.float32, seed=3)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    steps = decode_bench.greedy_tokens(model, prompt, new_tokens=5)
    want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                          min_new_tokens=5)[:, prompt.shape[1]:]
    assert torch.equal(steps, want)


def test_main_prints_a_row_per_format_and_batch(capsys):
    assert decode_bench.main(["--config", "tiny", "--device", "cpu", "--formats", "fp16,w4g128", "--batches", "1,2",
                              "--prompt-len", "4", "--new-tokens", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1:4] for r in rows] == [
        [" dense float32 ", " 1 ", " eager "], [" dense float32 ", " 2 ", " eager "],
        [" w4g128 ", " 1 ", " eager "], [" w4g128 ", " 2 ", " eager "],
    ]
    assert all(float(r.split("|")[5]) > 0 for r in rows)  # tokens/s
    assert rows[2].rstrip(" |").endswith("cpu-dequant")  # fp32 on CPU: the exact fp32 path of kernels/cpu.py


def test_bad_arguments():
    with pytest.raises(SystemExit):
        decode_bench.parse_args(["--device", "cpu", "--mode", "graph"])
    with pytest.raises(SystemExit):
        decode_bench.parse_args(["--device", "cpu", "--formats", "w4g128,fp16"])
    with pytest.raises(SystemExit):
        decode_bench.parse_args(["--device", "cpu", "--formats", "w5g128"])


def test_kernel_for_needs_a_packed_layer():
    from quantkit.nn import kernel_for

    with pytest.raises(ValueError, match="no QuantizedLinear"):
        kernel_for(nn.Sequential(nn.Linear(4, 4)))
