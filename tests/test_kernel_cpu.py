"""The CPU kernels (quantkit.kernels.cpu: PyTorch's weight-only int4/int8 matmuls) against the PyTorch reference.

Tolerance. The kernels compute with bf16 operands and fp32 accumulation; the bf16 reference rounds the dense weight
and the output to bf16, so both carry about one bf16 rounding (unit roundoff 2**-8) per operand and the difference
between them is a few 2**-9 in norm (measured: at most 5e-3 relative, fp32 inputs rounded to bf16 included). The
forward tests allow ``TOL = 2**-7`` relative (Frobenius); an off-by-one zero moves the output by 2-20 % (the test
weights are drawn like a real layer's, around the zero), so a wrong kernel cannot pass. The layout tests are
sharper: probing with one-hot rows reads the kernel's effective weight, which must equal the reference's within
bf16's rounding of the tinygemm scale and offset (4 bits: ``2**-8 * (8 s + |s (8 - z)|)`` per weight, s/16 at
most, while a wrong zero is off by s) and exactly for 8 bits (scale applied in fp32). Long inputs
(``M >= LARGE_M``, by bits) run the reference's own bf16 GEMM where the CPU has native bf16 and must equal it bit
for bit; elsewhere an fp32 GEMM, within one bf16 rounding of the fp32 reference. fp32 activations in the default
mode take the reference's own fp32 arithmetic at every size and must equal it bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from quantkit.config import LayerScheme
from quantkit.formats.packing import pack_codes
from quantkit.kernels import cpu, dispatch
from quantkit.nn import QuantizedLinear, kernel_for
from quantkit.quantizers.groups import expand_groups, num_groups
from quantkit.rotations import random_signs

TOL = 2**-7


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, "1")
    torch.manual_seed(0)  # the inputs


def make_linear(N, K, bits, group_size, *, symmetric=False, act_order=False, bias=False, rotation="none",
                rotate_output=False, seed=0) -> QuantizedLinear:
    """A packed layer whose codes spread around each group's zero as a real layer's do (so a zero off by one is a
    bias of the whole output, not noise); scales and zeros differ from group to group."""
    g = torch.Generator().manual_seed(seed)
    G = num_groups(group_size, K)
    top = 2**bits - 1
    zeros = torch.randint(top // 4, 3 * top // 4 + 1, (N, G), generator=g) if not symmetric else None
    centre = expand_groups(zeros if zeros is not None else torch.full((N, G), 2 ** (bits - 1)), group_size, K)
    codes = (centre + torch.randn(N, K, generator=g) * 2 ** bits / 8).round().clamp(0, top).long()
    t = {"qweight": pack_codes(codes, bits), "scales": (0.005 + 0.02 * torch.rand(N, G, generator=g)).half()}
    if zeros is not None:
        t["zeros"] = zeros.half()
    if act_order:
        t["perm"] = torch.randperm(K, generator=g).to(torch.int16)
    spec = dict(method="gptq", bits=bits, group_size=group_size, symmetric=symmetric, act_order=act_order,
                rotation=rotation)
    if rotate_output:
        spec["rotate_output"] = True
    if rotation != "none":
        t["rot_in_signs"] = random_signs(K, 1, "in")
        if rotate_output:
            t["rot_out_signs"] = random_signs(N, 1, "out")
    b = 0.1 * torch.randn(N, generator=g) if bias else None
    return QuantizedLinear.from_packed(t, LayerScheme.from_dict(spec), K, N, b)


def reference(module: QuantizedLinear, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv(cpu.ENV_VAR, "0")
        assert dispatch.select(x, module) is None
        return module(x)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def assert_close_to_reference(module, x, monkeypatch, kernel):
    assert dispatch.select(x, module).name == kernel
    y, ref = module(x), reference(module, x, monkeypatch)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = rel_err(y, ref)
    assert err < TOL, f"relative error {err:.2e} against the reference"
    return err


LAYOUTS = [  # (bits, group_size, K): K = 576 is SmolLM2's width, 4 * 128 + 64 and 2 * 256 + 64
    (4, 32, 576), (4, 64, 576), (4, 128, 576), (4, 256, 576), (4, -1, 576), (4, 128, 200), (4, -1, 200),
    (8, -1, 576), (8, -1, 200),
]


@pytest.mark.parametrize("act_order", [False, True], ids=["stored", "act-order"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits, group_size, K", LAYOUTS)
def test_forward_matches_reference(bits, group_size, K, symmetric, act_order, monkeypatch):
    module = make_linear(48, K, bits, group_size, symmetric=symmetric, act_order=act_order, bias=True).bfloat16()
    kernel = f"cpu-int{bits}pack"
    large = cpu.LARGE_M[bits]
    for shape in ((1, K), (3, 7, K), (large - 1, K), (large + 5, K)):
        assert_close_to_reference(module, torch.randn(*shape).bfloat16(), monkeypatch, kernel)
    x = torch.randn(large, K).bfloat16()  # dequantize-then-GEMM
    monkeypatch.setattr(cpu, "NATIVE_BF16", True)  # the reference's bf16 GEMM itself
    assert torch.equal(module(x), reference(module, x, monkeypatch))
    monkeypatch.setattr(cpu, "NATIVE_BF16", False)  # an fp32 GEMM: one bf16 rounding off the fp32 reference
    assert rel_err(module(x), reference(copy.deepcopy(module).float(), x.float(), monkeypatch)) < 2**-8


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, -1)])
def test_fp32_activations_exact_by_default(bits, group_size, monkeypatch):
    module = make_linear(32, 576, bits, group_size, act_order=True, bias=True)
    for x in (torch.randn(1, 576), torch.randn(3, 7, 576), torch.randn(cpu.LARGE_M[bits] + 1, 576)):
        assert dispatch.select(x, module).name == "cpu-dequant"  # default: the reference's fp32 arithmetic
        assert torch.equal(module(x), reference(module, x, monkeypatch))
    assert "cpu" not in module.kernel_cache or module.kernel_cache["cpu"].weight is None  # nothing repacked
    monkeypatch.setenv(cpu.ENV_VAR, "bf16")
    for x in (torch.randn(1, 576), torch.randn(3, 7, 576), torch.randn(cpu.LARGE_M[bits] + 1, 576)):
        assert_close_to_reference(module, x, monkeypatch, f"cpu-int{bits}pack")


@pytest.mark.parametrize("rotate_output", [False, True], ids=["input", "input+output"])
def test_rotation(rotate_output, monkeypatch):
    module = make_linear(64, 256, 4, 64, act_order=True, bias=True, rotation="hadamard",
                         rotate_output=rotate_output).bfloat16()
    for shape in ((1, 256), (2, 5, 256), (cpu.LARGE_M[4], 256)):
        assert_close_to_reference(module, torch.randn(*shape).bfloat16(), monkeypatch, "cpu-int4pack")


def probe_weight(module: QuantizedLinear, rows: int) -> torch.Tensor:
    """The weight [N, K] in the original basis as the kernel applies it: one-hot inputs, ``rows`` at a time."""
    eye = torch.eye(module.in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        return torch.cat([module(eye[i:i + rows]) for i in range(0, module.in_features, rows)]).float().T


def check_effective_weight(module: QuantizedLinear) -> None:
    t, bits = module.tensors, module.scheme.quantizer.bits
    W = module.dequantize()  # fp32, exact
    s = expand_groups(t["scales"].float(), module.scheme.quantizer.group_size, module.in_features)
    z = expand_groups(t["zeros"].float(), module.scheme.quantizer.group_size, module.in_features) \
        if "zeros" in t else torch.full_like(s, 2 ** (bits - 1))
    if "perm" in t:  # scales and zeros go with stored columns
        inv = torch.empty_like(t["perm"].long()).index_copy_(0, t["perm"].long(), torch.arange(module.in_features))
        s, z = s[:, inv], z[:, inv]
    small = probe_weight(module, 16)  # the weight-only kernels
    if bits == 4:
        bound = 2**-8 * (8 * s + (s * (8 - z)).abs() + W.abs())
        assert ((small - W).abs() <= bound).all(), f"max error {(small - W).abs().max():.2e}"
    else:
        assert torch.allclose(small, W, rtol=2**-8, atol=0)  # output rounded to bf16 once, scale exact
    assert module.in_features >= cpu.LARGE_M[bits]  # one call: dequantize-then-GEMM
    assert torch.equal(probe_weight(module, module.in_features), W.bfloat16().float())


@pytest.mark.parametrize("bits, group_size, K", [(4, 128, 576), (4, 32, 200), (4, -1, 200), (8, -1, 576)])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_effective_weight_is_the_reference_weight(bits, group_size, K, symmetric):
    check_effective_weight(make_linear(32, K, bits, group_size, symmetric=symmetric, act_order=True))


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, -1)])
def test_a_wrong_kernel_fails_these_checks(bits, group_size, monkeypatch):
    """The checks above fail for a kernel whose zeros are off by one, and for one that skips the act-order gather."""
    real_zeros, real_repack = cpu._zeros, cpu.repack
    x = torch.randn(16, 576).bfloat16()  # 16 rows: the shift s * sum(x) averages to 1/32 of the output (8 bits)
    with monkeypatch.context() as m:
        m.setattr(cpu, "_zeros", lambda *a: real_zeros(*a) + 1)
        module = make_linear(32, 576, bits, group_size, act_order=True).bfloat16()
        err = rel_err(module(x), reference(module, x, m))
        assert err > 2 * TOL, f"an off-by-one zero moved the output by only {err:.2e}"
        with pytest.raises(AssertionError):
            check_effective_weight(module)

    def no_gather(*args):
        pack = real_repack(*args)
        pack.perm = None
        return pack

    with monkeypatch.context() as m:
        m.setattr(cpu, "repack", no_gather)
        module = make_linear(32, 576, bits, group_size, act_order=True).bfloat16()
        assert rel_err(module(x), reference(module, x, m)) > 10 * TOL


def _nf4_linear(N, K) -> QuantizedLinear:
    t = {"qweight": pack_codes(torch.randint(0, 16, (N, K)), 4), "scales": torch.rand(N, 1).half(),
         "levels": torch.linspace(-1, 1, 16).half()}
    return QuantizedLinear.from_packed(t, LayerScheme.from_dict(dict(method="rtn", bits=4, group_size=-1,
                                                                     grid="nf4")), K, N)


@pytest.mark.parametrize("case", ["2-bit", "3-bit", "nf4", "8-bit-grouped", "group-48", "N=40", "fp16", "grad",
                                  "disabled"])
def test_layouts_the_kernels_cannot_take_keep_the_reference(case, monkeypatch):
    module = {"2-bit": lambda: make_linear(32, 128, 2, 64), "3-bit": lambda: make_linear(32, 128, 3, 64),
              "nf4": lambda: _nf4_linear(32, 128), "8-bit-grouped": lambda: make_linear(32, 128, 8, 64),
              "group-48": lambda: make_linear(32, 144, 4, 48), "N=40": lambda: make_linear(40, 128, 4, 64),
              }.get(case, lambda: make_linear(32, 128, 4, 64))()
    x = torch.randn(2, module.in_features, dtype=torch.float16 if case == "fp16" else torch.bfloat16,
                    requires_grad=case == "grad")
    if case == "disabled":
        monkeypatch.setenv(cpu.ENV_VAR, "0")
    assert dispatch.select(x, module) is None
    if case != "grad":  # kernel_for asks for an input without gradient
        assert kernel_for(module, x.dtype) == "pytorch-reference"
    y = module(x)
    if case == "grad":  # the reference is differentiable; the aten kernels are not
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape


def count_repacks(monkeypatch) -> list[int]:
    calls = []
    real = cpu._convert_int4
    monkeypatch.setattr(cpu, "_convert_int4", lambda *a: calls.append(1) or real(*a))
    return calls


def test_repacked_once_and_again_only_when_the_tensors_change(monkeypatch):
    calls = count_repacks(monkeypatch)
    module = make_linear(32, 576, 4, 128, act_order=True, bias=True).bfloat16()
    for shape in ((1, 576), (1, 576), (4, 576), (2, 3, 576), (cpu.LARGE_M[4], 576), (1, 576)):
        module(torch.randn(*shape).bfloat16())
    assert len(calls) == 1
    module.to(torch.float32).to(torch.bfloat16)  # the bias converts; the packed tensors and the cache stay
    assert module.scales.dtype == torch.float16 and module.bias.dtype == torch.bfloat16
    module(torch.randn(1, 576).bfloat16())
    assert len(calls) == 1
    x = torch.randn(2, 576).bfloat16()
    with torch.no_grad():
        module.scales.mul_(2)  # edited in place: the kernel must see it
    assert_close_to_reference(module, x, monkeypatch, "cpu-int4pack")
    assert len(calls) == 2
    module.scales = module.scales.detach() / 2  # replaced
    assert_close_to_reference(module, x, monkeypatch, "cpu-int4pack")
    assert len(calls) == 3


def test_the_cache_is_not_state(monkeypatch):
    module = make_linear(32, 576, 4, 128, act_order=True, bias=True).bfloat16()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module(torch.randn(1, 576).bfloat16())
    assert module.kernel_cache
    after = module.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_tiny_model_close_to_reference_saves_the_same_tensors(tiny_llama, calib_file, tmp_path, monkeypatch):
    """gptq w4 g32 asymmetric with act-order on the tiny Llama, in bf16: logits close to the reference's, the same
    greedy tokens, and save_pretrained after kernel forwards writes exactly the tensors it wrote before."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from quantkit import pipeline
    from quantkit.config import Recipe

    recipe = Recipe.from_dict({"name": "w4g32", "schemes": [{"targets": ["re:.*"], "method": "gptq", "bits": 4,
                                                             "group_size": 32, "act_order": True}]})
    pipeline.quantize(str(tiny_llama), recipe, tmp_path / "q", calib=str(calib_file), nsamples=4, seqlen=64,
                      progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16).eval()
    assert kernel_for(model) == "cpu-int4pack"
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :8]
    calls = count_repacks(monkeypatch)
    with torch.no_grad():
        logits = model(ids).logits
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
        assert len(calls) == 7 * 3  # each linear once, through prefill and decode
        monkeypatch.setenv(cpu.ENV_VAR, "0")
        assert kernel_for(model) == "pytorch-reference"
        ref_logits = model(ids).logits
        ref_tokens = model.generate(prompt, max_new_tokens=8, do_sample=False)
    # bf16 through 3 layers: both paths round at every op; the kernels' extra rounding stays at that level
    assert rel_err(logits, ref_logits) < 4 * TOL
    assert torch.equal(tokens, ref_tokens)
    model.save_pretrained(tmp_path / "resaved")

    def tensors(folder):
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    saved, resaved = tensors(tmp_path / "q"), tensors(tmp_path / "resaved")
    assert set(resaved) == set(saved)  # no kernel cache among them
    quantized = {k for k in saved if k.endswith((".qweight", ".scales", ".zeros", ".perm"))}
    assert len(quantized) == 4 * 7 * 3
    assert all(resaved[k].dtype == saved[k].dtype and torch.equal(resaved[k], saved[k]) for k in quantized)

    # fp32: the reference's arithmetic by default; with QUANTKIT_CPU_KERNELS=bf16 the kernels, within bf16's rounding
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    monkeypatch.setenv(cpu.ENV_VAR, "1")
    assert kernel_for(model) == "cpu-dequant"
    with torch.no_grad():
        ref_logits = model(ids).logits
        monkeypatch.setenv(cpu.ENV_VAR, "0")
        assert torch.equal(model(ids).logits, ref_logits)
        monkeypatch.setenv(cpu.ENV_VAR, "bf16")
        assert kernel_for(model) == "cpu-int4pack"
        assert rel_err(model(ids).logits, ref_logits) < TOL


def test_native_bf16_probe_agrees_with_the_cpu_flags():
    """Long inputs GEMM in bf16 only where the CPU multiplies bf16 in hardware; the probe must see it where the
    kernel (Linux) lists the feature (torch 2.13 moved the probes: the old lookup said False on AVX512-BF16)."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to compare with (not Linux x86)")
    assert cpu._native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
