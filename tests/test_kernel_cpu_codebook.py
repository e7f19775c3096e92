"""``cpu-codebook`` (quantkit.kernels.cpu_codebook): the codebook formats on CPU with the decoded weight kept.
It must be the formats' reference (``Format.linear``) bit for bit, decode once, and decode again when a stored
tensor changes."""

from __future__ import annotations

import pytest
import test_kernel_aq as aq_tests
import test_kernel_codebook as vq_tests
import torch

from quantkit import pipeline
from quantkit.formats.packing import pack_bits, unpack_bits
from quantkit.kernels import cpu_codebook, dispatch
from quantkit.nn import QuantizedLinear

N, K = 40, 96


def _vq(act_order=True, bias=True):
    tensors, b = vq_tests.make_layer(N, K, 4, 8, act_order=act_order, bias=bias)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    b = b.cpu() if b is not None else None
    module = QuantizedLinear.from_packed(tensors, vq_tests._scheme(4, 8, act_order), K, N, b)
    return module, tensors, b, lambda x: vq_tests.reference(x, tensors, b, 4, 8)


def _aq(act_order=True, bias=True):
    tensors, b = aq_tests.make_layer(N, K, 2, 8, 8, act_order=act_order, bias=bias)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    b = b.cpu() if b is not None else None
    module = QuantizedLinear.from_packed(tensors, aq_tests._scheme(2, 8, 8, act_order), K, N, b)
    return module, tensors, b, lambda x: aq_tests.reference(x, tensors, b, 8, 8)


@pytest.mark.parametrize("make", [_vq, _aq], ids=["vq", "aq"])
@pytest.mark.parametrize("act_order", [False, True], ids=["stored-order", "act-order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_equals_the_reference_bit_for_bit(make, act_order, dtype):
    module, _, b, reference = make(act_order=act_order)
    if b is not None:
        module.bias = torch.nn.Parameter(b.to(dtype), requires_grad=False)
    for shape in [(1, K), (3, 7, K), (64, K)]:
        x = torch.randn(*shape).to(dtype)
        assert dispatch.select(x, module).name == "cpu-codebook"
        expected = module.format.linear(x, module.tensors, module.scheme, module.bias)
        got = module(x)
        assert got.dtype == dtype and torch.equal(got, expected)
    x = torch.randn(5, K)  # and the reference built from the raw tensors, not the module's
    module.bias = torch.nn.Parameter(b, requires_grad=False)
    assert torch.equal(module(x), reference(x))


def test_decodes_once_and_again_when_a_stored_tensor_changes(monkeypatch):
    module, tensors, b, _ = _vq(bias=False)
    calls = []
    dequantize = type(module.format).dequantize

    def counting(self, *args, **kwargs):
        calls.append(1)
        return dequantize(self, *args, **kwargs)

    monkeypatch.setattr(type(module.format), "dequantize", counting)
    x = torch.randn(4, K)
    first = module(x)
    for _ in range(3):
        assert torch.equal(module(x), first)
    assert len(calls) == 1
    module(x.bfloat16())  # another activation dtype: decoded for it
    assert len(calls) == 2
    with torch.no_grad():
        module.codebook[3] *= -2  # edited in place: the kept weight is stale, so it is decoded again
    changed = module(x)
    assert len(calls) == 3
    assert not torch.equal(changed, first)
    edited = {**tensors, "codebook": module.codebook.detach()}
    assert torch.equal(changed, vq_tests.reference(x, edited, b, 4, 8))


def test_a_wrong_codebook_index_is_caught():
    """The comparison can fail: the layer's codes shifted by one entry give another output."""
    module, tensors, b, _ = _vq(act_order=False)
    x = torch.randn(4, K)
    codes = unpack_bits(tensors["codes"], 8, K // 4)
    shifted = {**tensors, "codes": pack_bits((codes + 1) % 256, 8)}
    assert not torch.allclose(module(x), vq_tests.reference(x, shifted, b, 4, 8), atol=1e-3)


def test_the_input_gradient_flows_and_the_switch_turns_it_off(monkeypatch):
    module, _, _, reference = _vq()
    x = torch.randn(3, K, requires_grad=True)
    module(x).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    reference(xr).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    monkeypatch.setenv("QUANTKIT_CPU_KERNELS", "0")
    assert dispatch.select(x, module) is None
    assert cpu_codebook.FORMATS == ("quantkit-vq", "quantkit-aq")


def test_a_rotated_codebook_model_gives_the_reference_logits(tiny_model_factory, calib_file, tmp_path, monkeypatch):
    """The preset as shipped (Hadamard rotation, act-order, 6-bit codes across words): the same logits with the
    kernel and with the reference."""
    from transformers import AutoModelForCausalLM

    pipeline.quantize(str(tiny_model_factory("llama")), "hadamard-gptq-vq3", tmp_path / "q", calib=str(calib_file),
                      nsamples=4, seqlen=64, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    x = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(x).logits
        layer = model.model.layers[0].self_attn.q_proj
        assert dispatch.select(torch.randn(1, layer.in_features), layer).name == "cpu-codebook"
        assert "cpu-codebook" in layer.kernel_cache
        monkeypatch.setenv("QUANTKIT_CPU_KERNELS", "0")
        assert torch.equal(model(x).logits, got)
