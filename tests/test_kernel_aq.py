"""The Triton lookup-table kernels on the additive-codebook format ``quantkit-aq`` (M tables summed per vector)
against the format's own PyTorch reference (``AQFormat.linear``: dequantize, then matmul).

Same setup as tests/test_kernel_codebook.py (its ``tc`` fixture and helpers): under ``TRITON_INTERPRET=1`` on CPU
tensors, compiled with ``TRITON_INTERPRET=0`` on a GPU. Codebook shapes: the preset's (hadamard-gptq-aq2: 2 tables
of 256 entries over 8 dims), 3 tables with a straddling width (5 bits, dim 3 padded to 4 lanes), and one table
(which must agree with ``quantkit-vq``). Small shapes and few combinations: the interpreter is slow.
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import test_kernel_codebook as vq_tests
import torch
from test_kernel_codebook import DEVICE, INTERPRET, TOL, _OpLog, activations, finish_layer, rel_error
from torch._subclasses.fake_tensor import FakeTensorMode

from quantkit.config import LayerScheme
from quantkit.formats import get_format
from quantkit.formats.packing import pack_bits, unpack_bits
from quantkit.kernels import dispatch
from quantkit.kernels.ops import codebook_matmul_triton

tc = vq_tests.tc  # the kernel module fixture (interpreter or CUDA, as the run asks)

# (tables, dim, bits): the preset's, then three tables of a width that straddles words with a padded dim.
SHAPES = [(2, 8, 8), (3, 3, 5)]
IN = {8: 136, 3: 66}  # 17 and 22 vectors a row: partial last tiles


def _scheme(tables: int, dim: int, bits: int, act_order: bool) -> LayerScheme:
    return LayerScheme.from_dict({"method": {"name": "gptq", "act_order": act_order, "attention_weighted": False},
                                  "quantizer": {"name": "aq", "codebooks": tables, "dim": dim, "entries": 2**bits}})


def make_layer(N, K, tables, dim, bits, *, act_order, bias=False, dtype=torch.float32, seed=0, codes=None):
    """Random packed tensors of a [N, K] ``quantkit-aq`` layer (as ``AQFormat.pack`` stores them) and its bias:
    distinct Gaussian tables, per-row scales, so a wrong index, table or row cannot agree by chance."""
    g = torch.Generator().manual_seed(seed)
    if codes is None:
        codes = torch.randint(0, 2**bits, (tables, N, K // dim), generator=g)
    tensors = {
        "codes": torch.stack([pack_bits(c, bits) for c in codes]),
        "codebooks": torch.randn(tables, 2**bits, dim, generator=g).half(),
        "scales": (0.02 + 0.05 * torch.rand(N, 1, generator=g)).half(),
    }
    return finish_layer(tensors, N, K, g, act_order=act_order, bias=bias, dtype=dtype)


def reference(x, tensors, bias, dim, bits):
    scheme = _scheme(tensors["codes"].shape[0], dim, bits, "perm" in tensors)
    return get_format("quantkit-aq").linear(x, tensors, scheme, bias)


def kernel(tc, x, tensors, bias, dim, bits, **kw):
    return tc.triton_codebook_matmul(x, tensors["codes"], tensors["codebooks"], tensors["scales"],
                                     tensors.get("perm"), bias, dim=dim, bits=bits, **kw)


def assert_matches_reference(tc, x, tensors, bias, dim, bits, **kw):
    err = rel_error(kernel(tc, x, tensors, bias, dim, bits, **kw), reference(x, tensors, bias, dim, bits))
    assert err < TOL[x.dtype], f"relative error {err:.2e} (M={x.numel() // x.shape[-1]}, {kw})"


@pytest.mark.parametrize("act_order, bias", [(False, False), (True, True)], ids=["plain", "perm-bias"])
@pytest.mark.parametrize("tables, dim, bits", SHAPES, ids=[f"m{t}-d{d}-b{b}" for t, d, b in SHAPES])
def test_matches_reference(tc, tables, dim, bits, act_order, bias):
    # N = 40: a partial 32-row block. M = 1, 3, 8 take the GEMV (split-K under the interpreter's config), M = 9 the
    # dequantize kernel, then the GEMM.
    K = IN[dim]
    tensors, b = make_layer(40, K, tables, dim, bits, act_order=act_order, bias=bias, seed=tables * 100 + bits)
    for M in (1, 3, 8, 9):
        assert_matches_reference(tc, activations(M, K, seed=M), tensors, b, dim, bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_activation_dtypes(tc, dtype):
    tensors, b = make_layer(24, 136, 2, 8, 8, act_order=True, bias=True, dtype=dtype, seed=3)
    for M in (1, 9):  # GEMV (no split-K in bf16), dequantize-then-GEMM
        assert_matches_reference(tc, activations(M, 136, dtype=dtype, seed=M), tensors, b, 8, 8)


@pytest.mark.parametrize(
    "tables, dim, bits, config",
    [
        (2, 8, 8, {"BLOCK_N": 16, "BLOCK_V": 8, "SPLIT_K": 1}),  # 4 codes a word, 8 a tile: words fanned out
        (3, 2, 2, {"BLOCK_N": 16, "BLOCK_V": 8, "SPLIT_K": 3}),  # 16 codes a word, 8 a tile: per-code decode
    ],
    ids=["m2-words", "m3-b2-per-code-split3"],
)
def test_tilings(tc, tables, dim, bits, config):
    K = 20 * dim
    tensors, b = make_layer(24, K, tables, dim, bits, act_order=True, bias=True, seed=bits)
    assert_matches_reference(tc, activations(2, K), tensors, b, dim, bits, config=config)


def test_one_table_is_the_vector_codebook(tc):
    """With one table the aq tensors are the vq tensors with a leading axis: both layouts give the vq reference."""
    tensors, b = make_layer(40, 96, 1, 4, 8, act_order=True, bias=True)
    vq = {"codes": tensors["codes"][0], "codebook": tensors["codebooks"][0], "scales": tensors["scales"],
          "perm": tensors["perm"]}
    vq_scheme = LayerScheme.from_dict({"method": {"name": "gptq", "act_order": True, "attention_weighted": False},
                                       "quantizer": {"name": "vq", "dim": 4, "entries": 256}})
    x = activations(3, 96)
    ref = reference(x, tensors, b, 4, 8)
    assert torch.equal(ref, get_format("quantkit-vq").linear(x, vq, vq_scheme, b))
    assert rel_error(kernel(tc, x, tensors, b, 4, 8), ref) < TOL[x.dtype]
    assert torch.equal(kernel(tc, x, tensors, b, 4, 8),
                       tc.triton_codebook_matmul(x, vq["codes"], vq["codebook"], vq["scales"], vq["perm"], b,
                                                 dim=4, bits=8))


def test_dispatch_entry_rotates_first(tc):
    """``triton-codebook-aq``'s entry with the preset's input rotation (hadamard-gptq-aq2 stores ``W Rᵀ``): ``R x``
    first, then the kernel; equal to rotating on CPU and the format's reference, with 3-D activations."""
    from quantkit.kernels import ops
    from quantkit.nn import QuantizedLinear
    from quantkit.rotations import HadamardRotation, random_signs

    K = 128
    tensors, b = make_layer(40, K, 2, 8, 8, act_order=True, bias=True, seed=5)
    module = QuantizedLinear.from_packed({k: v.cpu() for k, v in tensors.items()}, _scheme(2, 8, 8, True), K, 40,
                                         b.cpu()).to(DEVICE)
    rot = HadamardRotation(random_signs(K, 0, "aq-entry").to(DEVICE))
    for M in (1, 9):
        x = activations(1, M, K, seed=M)
        ref = reference(rot.apply(x.cpu()).to(DEVICE), tensors, b, 8, 8)
        assert rel_error(ops._aq_linear(x, module, bias=b, rotation=rot), ref) < TOL[x.dtype]


def test_dequantize_equals_the_formats(tc):
    # Bit for bit: the tables' codewords summed in fp32 in table order, times the scale, rounded once.
    for tables, dim, bits in SHAPES:
        K = IN[dim]
        tensors, _ = make_layer(24, K, tables, dim, bits, act_order=True, seed=bits)
        W_ref = get_format("quantkit-aq").dequantize(tensors, _scheme(tables, dim, bits, True), K)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            W = tc.triton_codebook_dequantize(tensors["codes"], tensors["codebooks"], tensors["scales"],
                                              tensors["perm"], in_features=K, dim=dim, bits=bits, dtype=dtype)
            if INTERPRET and dtype == torch.bfloat16:
                # Triton 3.6's interpreter truncates fp32 to bf16 (compiled: round to nearest): one bf16 step apart.
                assert torch.allclose(W.float(), W_ref.to(dtype).float(), rtol=2**-7, atol=0)
            else:
                assert torch.equal(W, W_ref.to(dtype))


def test_checks(tc):
    tensors, b = make_layer(8, 24, 2, 4, 8, act_order=False, bias=True)
    with pytest.raises(ValueError, match="codebook"):  # a table missing
        kernel(tc, activations(1, 24), {**tensors, "codebooks": tensors["codebooks"][:1]}, b, 4, 8)
    with pytest.raises(ValueError, match="codebook"):  # stacked codes, one unstacked table
        kernel(tc, activations(1, 24), {**tensors, "codebooks": tensors["codebooks"][0]}, b, 4, 8)
    with pytest.raises(ValueError, match="codes"):
        kernel(tc, activations(1, 24), {**tensors, "codes": tensors["codes"][:0]}, b, 4, 8)


# --- the tests can fail: a wrong code index in one table is caught -------------------------------------------------

def test_a_wrong_code_index_in_one_table_fails_the_comparison(tc, monkeypatch):
    """The comparison is a real check with several tables: the kernel given table 1's codes shifted to the next
    entry (table 0 right), or table 1 with two rows swapped, fails the tolerance the right inputs pass, on the GEMV
    and the dequantize path; so does the kernel with its decode patched to read the next entry."""
    tables, dim, bits = 2, 8, 8
    K, N = IN[dim], 32
    # Every entry of every table in use, so that swapping two rows changes some output.
    codes = torch.arange(tables * N * (K // dim)).remainder(2**bits).view(tables, N, K // dim)
    codes = codes[:, :, torch.randperm(K // dim, generator=torch.Generator().manual_seed(0))]
    tensors, b = make_layer(N, K, tables, dim, bits, act_order=True, bias=True, seed=7, codes=codes)
    shifted = codes.clone()
    shifted[1] = (shifted[1] + 1) % 2**bits
    wrong_codes = {**tensors, "codes": torch.stack([pack_bits(c, bits) for c in shifted]).to(DEVICE)}
    swapped = tensors["codebooks"].clone()
    swapped[1, [0, 1]] = swapped[1, [1, 0]]
    wrong_rows = {**tensors, "codebooks": swapped}
    assert torch.equal(unpack_bits(wrong_codes["codes"][0].cpu(), bits, K // dim), codes[0])  # table 0 untouched
    for M in (1, 9):
        x = activations(M, K, seed=M)
        ref = reference(x, tensors, b, dim, bits)
        assert rel_error(kernel(tc, x, tensors, b, dim, bits), ref) < TOL[x.dtype]
        for wrong in (wrong_codes, wrong_rows):
            err = rel_error(kernel(tc, x, wrong, b, dim, bits), ref)
            assert err > 10 * TOL[x.dtype], f"M={M}: a wrong entry of table 1 went unnoticed ({err:.2e})"
    if not INTERPRET:
        return  # patching a helper of a compiled kernel needs the interpreter (compiled kernels are cached)
    with monkeypatch.context() as m:
        m.setattr(vq_tests, "_RIGHT_DECODE", tc._decode_codes)
        m.setattr(tc, "_decode_codes", vq_tests._decode_next_entry)
        m.setattr(tc, "_gemv_codes", vq_tests._gemv_codes_next_entry)
        for M in (1, 9):
            x = activations(M, K, seed=M)
            err = rel_error(kernel(tc, x, tensors, b, dim, bits), reference(x, tensors, b, dim, bits))
            assert err > 10 * TOL[x.dtype], f"M={M}: an off-by-one codebook index went unnoticed ({err:.2e})"


# --- the op, the fake implementation, the backward and the dispatch ------------------------------------------------

def test_custom_op_opcheck(tc):
    """Schema, fake implementation and AOT dispatch agree with the real kernel for stacked tables."""
    tensors, b = make_layer(24, 48, 2, 8, 8, act_order=True, bias=True)
    args = (activations(2, 48), tensors["codes"], tensors["codebooks"], tensors["scales"], tensors["perm"], b)
    torch.library.opcheck(codebook_matmul_triton, args, {"dim": 8, "bits": 8})


def test_backward_matches_the_reference(tc):
    tensors, b = make_layer(24, 48, 2, 8, 8, act_order=True, bias=True)
    x = activations(2, 48).requires_grad_()
    bias = b.clone().requires_grad_()
    codebook_matmul_triton(x, tensors["codes"], tensors["codebooks"], tensors["scales"], tensors["perm"], bias,
                           dim=8, bits=8).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = b.clone().requires_grad_()
    reference(x_ref, tensors, bias_ref, 8, 8).square().sum().backward()
    assert rel_error(x.grad, x_ref.grad) < 1e-4 and rel_error(bias.grad, bias_ref.grad) < 1e-4


def test_fake_impl_shapes_only():
    tensors, _ = make_layer(40, 96, 3, 8, 8, act_order=True)
    meta = {k: v.to("meta") for k, v in tensors.items()}
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v.cpu()) for k, v in tensors.items()}
        out = torch.ops.quantkit.codebook_matmul(torch.empty(2, 5, 96, dtype=torch.float16), fake["codes"],
                                                 fake["codebooks"], fake["scales"], fake["perm"], None, dim=8, bits=8)
        assert out.shape == (2, 5, 40) and out.dtype == torch.float16
    out = torch.ops.quantkit.codebook_matmul(torch.empty(3, 96, device="meta"), meta["codes"], meta["codebooks"],
                                             meta["scales"], meta["perm"], None, dim=8, bits=8)
    assert out.shape == (3, 40) and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="one table per"):
        torch.ops.quantkit.codebook_matmul(torch.empty(3, 96, device="meta"), meta["codes"], meta["codebooks"][:2],
                                           meta["scales"], meta["perm"], None, dim=8, bits=8)


@pytest.mark.parametrize("tables", [1, 2, 3])
def test_dispatch_routes_cuda_to_the_kernel(tables):
    """For CUDA activations the dispatch picks ``triton-codebook-aq`` with any number of tables, and torch sees one
    quantkit op, no dequantized weight; a dim the kernels do not take (16) stays on the reference. (Fake CUDA
    tensors, so this runs without a GPU.)"""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'quantkit[triton]')")
    from quantkit.nn import QuantizedLinear

    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, 96, dtype=torch.float16, device="cuda")
        layer = QuantizedLinear(96, 40, _scheme(tables, 8, 8, True), device="cuda", dtype=torch.float16)
        assert dispatch.select(x, layer).name == "triton-codebook-aq"
        with _OpLog() as log:
            out = layer(x)
        wide = QuantizedLinear(96, 40, _scheme(tables, 16, 8, True), device="cuda", dtype=torch.float16)
        assert dispatch.select(x, wide) is None
    assert [op for op in log.ops if op.namespace != "prim"] == [torch.ops.quantkit.codebook_matmul.default]
    assert out.shape == (3, 40) and out.dtype == torch.float16 and out.device.type == "cuda"


def test_cpu_tensors_never_take_the_triton_kernel(monkeypatch):
    if importlib.util.find_spec("triton") is not None:

        def fail(*args, **kwargs):
            raise AssertionError("the Triton kernel ran on CPU tensors")

        monkeypatch.setattr(sys.modules["quantkit.kernels.ops"], "codebook_matmul_triton", fail)
    from quantkit.nn import QuantizedLinear

    tensors, b = make_layer(40, 96, 2, 8, 8, act_order=True, bias=True)
    module = QuantizedLinear.from_packed({k: v.cpu() for k, v in tensors.items()}, _scheme(2, 8, 8, True), 96, 40,
                                         b.cpu())
    x = torch.randn(3, 96)
    assert dispatch.select(x, module).name == "cpu-codebook"  # the reference, decoded once
    assert torch.equal(module(x), reference(x, {k: v.cpu() for k, v in tensors.items()}, b.cpu(), 8, 8))
    monkeypatch.setenv("QUANTKIT_CPU_KERNELS", "0")
    assert dispatch.select(x, module) is None
    assert torch.equal(module(x), reference(x, {k: v.cpu() for k, v in tensors.items()}, b.cpu(), 8, 8))
