"""The Triton lookup-table kernels of the vector-codebook format (quantkit.kernels.triton_codebook) against its
PyTorch reference (``VQFormat.linear``: dequantize, then matmul).

Without a GPU the kernels run under the Triton interpreter on CPU tensors (tests/conftest.py sets
``TRITON_INTERPRET=1`` before anything imports Triton); on a GPU, ``TRITON_INTERPRET=0 pytest
tests/test_kernel_codebook.py`` runs the same checks compiled. Codebook shapes: the presets' (hadamard-gptq-vq2: 4
dims, 256 entries; hadamard-gptq-vq3: 2 dims, 64 entries) and 2/3/6/8 dims at 4 to 16 bits, among them widths
that straddle words (5, 6, 10, 12).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest
import torch
from kernelkit import DEVICE, INTERPRET, kernel_module
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from quantkit.config import LayerScheme
from quantkit.formats import get_format
from quantkit.formats.packing import pack_bits
from quantkit.kernels import dispatch
from quantkit.kernels.ops import codebook_matmul_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the dispatch and fake-implementation tests still run
    triton = tl = None

# Max error relative to the output's largest magnitude (as tests/test_kernels.py): the GEMV keeps the codeword and
# the scale in fp32 where the reference rounds their product to the activation dtype; accumulation order and, with
# split-K, fp16 partial sums differ. A wrong codebook index gives errors of order 1.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# (dim, bits): the presets' codebooks first (vq2: 4 x 2^8; vq3: 2 x 2^6, a straddling width), then straddling widths
# (5, 10, 12) and the largest tables.
SHAPES = [(4, 8), (2, 6), (2, 4), (3, 5), (6, 10), (8, 12), (8, 16), (2, 16)]
IN = {2: 100, 3: 66, 4: 160, 6: 132, 8: 136}  # K / dim vectors: 50, 22, 40, 22, 17 (none a multiple of 16)


@pytest.fixture(scope="module")
def tc():
    """The kernel module, compiled the way this run asks (interpreter or CUDA)."""
    mod = kernel_module("triton_codebook")
    if not INTERPRET:  # a few tilings (one split-K) instead of timing the full list per shape
        saved = mod._gemv_configs
        mod._gemv_configs = lambda allow_split_k: [mod._gemv_config(32, 32, 1),
                                                   mod._gemv_config(64, 16, 4 if allow_split_k else 1)]
        mod._tuned_gemv.cache_clear()
        yield mod
        mod._gemv_configs = saved
        mod._tuned_gemv.cache_clear()
        return
    yield mod


def _scheme(dim: int, bits: int, act_order: bool) -> LayerScheme:
    return LayerScheme.from_dict({"method": {"name": "gptq", "act_order": act_order, "attention_weighted": False},
                                  "quantizer": {"name": "vq", "dim": dim, "entries": 2**bits}})


def make_layer(N, K, dim, bits, *, act_order, bias=False, dtype=torch.float32, seed=0):
    """Random packed tensors of a [N, K] ``quantkit-vq`` layer (as ``VQFormat.pack`` stores them) and its bias.
    Codewords are distinct Gaussians and scales differ per row, so a wrong index or row cannot agree by chance."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "codes": pack_bits(torch.randint(0, 2**bits, (N, K // dim), generator=g), bits),
        "codebook": torch.randn(2**bits, dim, generator=g).half(),
        "scales": (0.02 + 0.05 * torch.rand(N, 1, generator=g)).half(),
    }
    return finish_layer(tensors, N, K, g, act_order=act_order, bias=bias, dtype=dtype)


def finish_layer(tensors, N, K, g, *, act_order, bias, dtype):
    """A random layer's act-order permutation and bias (drawn from ``g``, after its codes and tables), all on DEVICE."""
    if act_order:
        tensors["perm"] = torch.randperm(K, generator=g).to(torch.int16)
    b = (0.1 * torch.randn(N, generator=g)).to(dtype) if bias else None
    tensors = {k: v.to(DEVICE) for k, v in tensors.items()}
    return tensors, (b.to(DEVICE) if b is not None else None)


def activations(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def reference(x, tensors, bias, dim, bits):
    return get_format("quantkit-vq").linear(x, tensors, _scheme(dim, bits, "perm" in tensors), bias)


def kernel(tc, x, tensors, bias, dim, bits, **kw):
    return tc.triton_codebook_matmul(x, tensors["codes"], tensors["codebook"], tensors["scales"],
                                     tensors.get("perm"), bias, dim=dim, bits=bits, **kw)


def rel_error(out, ref) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def assert_matches_reference(tc, x, tensors, bias, dim, bits, **kw):
    err = rel_error(kernel(tc, x, tensors, bias, dim, bits, **kw), reference(x, tensors, bias, dim, bits))
    assert err < TOL[x.dtype], f"relative error {err:.2e} (M={x.numel() // x.shape[-1]}, {kw})"


@pytest.mark.parametrize("act_order, bias", [(False, False), (True, True), (True, False)],
                         ids=["plain", "perm-bias", "perm"])
@pytest.mark.parametrize("dim, bits", SHAPES, ids=[f"d{d}-b{b}" for d, b in SHAPES])
def test_matches_reference(tc, dim, bits, act_order, bias):
    # N = 72: a partial 32-row block. M = 1, 3, 8 take the GEMV (split-K under the interpreter's config, a partial
    # last vector tile); M = 33 dequantizes, then runs the GEMM.
    K = IN[dim]
    tensors, b = make_layer(72, K, dim, bits, act_order=act_order, bias=bias, seed=dim * 100 + bits)
    for M in (1, 3, 8, 33):
        assert_matches_reference(tc, activations(M, K, seed=M), tensors, b, dim, bits)


@pytest.mark.parametrize("M", [1, 8, 33], ids=["gemv1", "gemv8", "gemm33"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim, bits", [(4, 8), (8, 16), (3, 5)], ids=["d4-b8", "d8-b16", "d3-b5"])
def test_activation_dtypes(tc, dim, bits, dtype, M):
    K = IN[dim]
    tensors, b = make_layer(56, K, dim, bits, act_order=True, bias=True, dtype=dtype, seed=bits)
    assert_matches_reference(tc, activations(2, (M + 1) // 2, K, dtype=dtype), tensors, b, dim, bits)


@pytest.mark.parametrize(
    "dim, bits, config",
    [
        (2, 2, {"BLOCK_N": 16, "BLOCK_V": 8, "SPLIT_K": 1}),  # 16 codes a word, 8 a tile: per-code decode
        (2, 2, {"BLOCK_N": 16, "BLOCK_V": 32, "SPLIT_K": 3}),  # whole words fanned out; more splits than tiles
        (4, 8, {"BLOCK_N": 64, "BLOCK_V": 64, "SPLIT_K": 1}),  # one tile wider than the row
        (8, 12, {"BLOCK_N": 32, "BLOCK_V": 4, "SPLIT_K": 4}),
        (5, 7, {"BLOCK_N": 16, "BLOCK_V": 16, "SPLIT_K": 2}),  # dim 5 padded to 8 lanes, 7-bit codes
    ],
    ids=["b2-per-code", "b2-words-split3", "wide-tile", "b12-split4", "d5-b7"],
)
def test_tilings(tc, dim, bits, config):
    K = 40 * dim
    tensors, b = make_layer(40, K, dim, bits, act_order=True, bias=True, seed=bits)
    for M in (1, 5):
        assert_matches_reference(tc, activations(M, K, seed=M), tensors, b, dim, bits, config=config)


def test_odd_shapes_and_checks(tc):
    tensors, b = make_layer(7, 24, 4, 8, act_order=False, bias=True)  # N below every block, one 6-vector row
    assert_matches_reference(tc, activations(2, 3, 24), tensors, b, 4, 8)  # 3-D activations
    assert kernel(tc, activations(0, 24), tensors, b, 4, 8).shape == (0, 7)
    with pytest.raises(ValueError, match="codebook"):
        kernel(tc, activations(1, 24), {**tensors, "codebook": tensors["codebook"][:128]}, b, 4, 8)
    with pytest.raises(ValueError, match="codes"):
        kernel(tc, activations(1, 24), {**tensors, "codes": tensors["codes"][:, :1]}, b, 4, 8)
    with pytest.raises(ValueError, match="do not tile"):
        kernel(tc, activations(1, 24), tensors, b, 5, 8)
    with pytest.raises(ValueError, match="gemv_max_m"):
        kernel(tc, activations(1, 24), tensors, b, 4, 8, gemv_max_m=9)


def test_decode_batches_on_the_dequantize_path(tc):
    tensors, b = make_layer(48, 160, 4, 8, act_order=True, bias=True, dtype=torch.float16)
    for M in (1, 5):
        assert_matches_reference(tc, activations(M, 160, dtype=torch.float16), tensors, b, 4, 8, gemv_max_m=0)


def test_dequantize_equals_the_formats(tc):
    # Bit for bit: the fp32 product scale · codeword rounded once to the target dtype, in original column order.
    for dim, bits in ((4, 8), (6, 10), (8, 16)):
        tensors, _ = make_layer(40, IN[dim], dim, bits, act_order=True, seed=bits)
        W_ref = get_format("quantkit-vq").dequantize(tensors, _scheme(dim, bits, True), IN[dim])
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            W = tc.triton_codebook_dequantize(tensors["codes"], tensors["codebook"], tensors["scales"],
                                              tensors["perm"], in_features=IN[dim], dim=dim, bits=bits, dtype=dtype)
            if INTERPRET and dtype == torch.bfloat16:
                # Triton 3.6's interpreter truncates fp32 to bf16 (compiled: round to nearest): one bf16 step apart.
                assert torch.allclose(W.float(), W_ref.to(dtype).float(), rtol=2**-7, atol=0)
            else:
                assert torch.equal(W, W_ref.to(dtype))


# --- the tests can fail: a wrong codebook index is caught ---------------------------------------------------------

_RIGHT_DECODE = None  # the kernel module's _decode_codes while the test below patches it

if triton is not None:
    # Module-level jit functions: the interpreter re-executes a jit function's source in its module's globals, so
    # these resolve _RIGHT_DECODE and each other at call time (closures would not survive the rewrite).

    @triton.jit
    def _decode_next_entry(codes_ptr, offs_v, offs_n, N, stride_cn, V: tl.constexpr, BITS: tl.constexpr):
        """The right bits, then the next codebook entry (code + 1, wrapping): what an indexing slip reads."""
        codes = _RIGHT_DECODE(codes_ptr, offs_v, offs_n, N, stride_cn, V, BITS)
        return (codes + 1) & ((1 << BITS) - 1)

    @triton.jit
    def _gemv_codes_next_entry(codes_ptr, v0, offs_n, N, stride_cn, V: tl.constexpr, BITS: tl.constexpr,
                               BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        return _decode_next_entry(codes_ptr, offs_v[:, None], offs_n[None, :], N, stride_cn, V, BITS)


@pytest.mark.parametrize("dim, bits, config", [(4, 8, None), (8, 12, None), (2, 2, {"BLOCK_N": 16, "BLOCK_V": 8,
                                                                                    "SPLIT_K": 1})],
                         ids=["d4-b8", "d8-b12-straddling", "d2-b2"])
def test_a_wrong_codebook_index_fails_the_comparison(tc, dim, bits, config, monkeypatch):
    """The comparison is a real check: with the kernel's decode made to index the next codebook entry (patched in
    the module the kernels resolve their helpers from; the interpreter looks them up at each call), the GEMV and
    the dequantize path both fail the tolerance the correct kernel passes; so does a codebook whose first two rows
    are swapped in the kernel's input only."""
    if not INTERPRET:
        pytest.skip("patching a helper of a compiled kernel needs the interpreter (compiled kernels are cached)")
    K = IN[dim]
    tensors, b = make_layer(64, K, dim, bits, act_order=True, bias=True, seed=7)
    # Every entry in use, so that swapping two rows changes some output.
    n_codes = 64 * (K // dim)
    codes = torch.arange(n_codes).remainder(2**bits).view(64, K // dim)
    tensors["codes"] = pack_bits(codes[:, torch.randperm(K // dim, generator=torch.Generator().manual_seed(0))],
                                 bits).to(DEVICE)
    wrong_rows = {**tensors, "codebook": tensors["codebook"][torch.tensor([1, 0, *range(2, 2**bits)])]}
    for M in (1, 3, 33):
        x = activations(M, K, seed=M)
        ref = reference(x, tensors, b, dim, bits)
        assert rel_error(kernel(tc, x, tensors, b, dim, bits, config=config), ref) < TOL[x.dtype]
        assert rel_error(kernel(tc, x, wrong_rows, b, dim, bits, config=config), ref) > 10 * TOL[x.dtype]
    with monkeypatch.context() as m:
        m.setattr(sys.modules[__name__], "_RIGHT_DECODE", tc._decode_codes)
        m.setattr(tc, "_decode_codes", _decode_next_entry)  # the dequantize kernel's and the GEMV's per-code decode
        m.setattr(tc, "_gemv_codes", _gemv_codes_next_entry)  # the GEMV's whole-word fan-out (widths dividing 32)
        for M in (1, 3, 33):
            x = activations(M, K, seed=M)
            err = rel_error(kernel(tc, x, tensors, b, dim, bits, config=config), reference(x, tensors, b, dim, bits))
            assert err > 10 * TOL[x.dtype], f"M={M}: an off-by-one codebook index went unnoticed ({err:.2e})"
    x = activations(1, K)  # unpatched again: right
    assert rel_error(kernel(tc, x, tensors, b, dim, bits), reference(x, tensors, b, dim, bits)) < TOL[x.dtype]


# --- the op, the fake implementation and the dispatch -------------------------------------------------------------

def test_custom_op_opcheck(tc):
    """Schema, fake implementation and AOT dispatch agree with the real kernel (torch.compile's needs)."""
    tensors, b = make_layer(40, 96, 4, 8, act_order=True, bias=True)
    args = (activations(2, 96), tensors["codes"], tensors["codebook"], tensors["scales"], tensors["perm"], b)
    torch.library.opcheck(codebook_matmul_triton, args, {"dim": 4, "bits": 8})


def test_fake_impl_shapes_only():
    tensors, b = make_layer(40, 96, 4, 8, act_order=True, bias=True)
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v.cpu()) for k, v in tensors.items()}
        for dtype in (torch.float16, torch.bfloat16):
            out = torch.ops.quantkit.codebook_matmul(torch.empty(2, 5, 96, dtype=dtype), **fake, bias=None,
                                                     dim=4, bits=8)
            assert out.shape == (2, 5, 40) and out.dtype == dtype
    meta = {k: v.to("meta") for k, v in tensors.items()}
    out = torch.ops.quantkit.codebook_matmul(torch.empty(3, 96, device="meta"), **meta, bias=None, dim=4, bits=8)
    assert out.shape == (3, 40) and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="do not hold"):
        torch.ops.quantkit.codebook_matmul(torch.empty(2, 64, device="meta"), **meta, bias=None, dim=4, bits=8)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _linear(K, N, dim, bits, *, act_order, device="cpu", packed=None, bias=None):
    from quantkit.nn import QuantizedLinear

    scheme = _scheme(dim, bits, act_order)
    if packed is None:
        return QuantizedLinear(K, N, scheme, device=device, dtype=torch.float16)
    return QuantizedLinear.from_packed(packed, scheme, K, N, bias)


@pytest.mark.parametrize("act_order", [False, True], ids=["stored-order", "act-order"])
def test_dispatch_routes_cuda_to_the_custom_op(act_order):
    """For CUDA activations the dispatch picks ``triton-codebook`` and torch sees one quantkit op, no dequantized
    weight. (Fake CUDA tensors, so this runs without a GPU.)"""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'quantkit[triton]')")
    N, K = 40, 96
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, K, dtype=torch.float16, device="cuda")
        layer = _linear(K, N, 4, 8, act_order=act_order, device="cuda")
        assert dispatch.select(x, layer).name == "triton-codebook"
        with _OpLog() as log:
            out = layer(x)
    assert [op for op in log.ops if op.namespace != "prim"] == [torch.ops.quantkit.codebook_matmul.default]
    assert out.shape == (3, N) and out.dtype == torch.float16 and out.device.type == "cuda"


def test_cpu_tensors_never_take_the_triton_kernel(monkeypatch):
    """CPU tensors take ``cpu-codebook`` (the reference with the decoded weight kept; tests/test_kernel_cpu_codebook.py)
    even with TRITON_INTERPRET=1 set, and the reference itself with the CPU kernels off."""
    if importlib.util.find_spec("triton") is not None:

        def fail(*args, **kwargs):
            raise AssertionError("the Triton kernel ran on CPU tensors")

        triton_codebook = importlib.import_module("quantkit.kernels.triton_codebook")
        monkeypatch.setattr(triton_codebook, "triton_codebook_matmul", fail)
    tensors, b = make_layer(40, 96, 4, 8, act_order=True, bias=True)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    b = b.cpu()
    module = _linear(96, 40, 4, 8, act_order=True, packed=tensors, bias=b)
    x = torch.randn(3, 96)
    assert dispatch.select(x, module).name == "cpu-codebook"
    assert torch.equal(module(x), reference(x, tensors, b, 4, 8))
    monkeypatch.setenv("QUANTKIT_CPU_KERNELS", "0")
    assert dispatch.select(x, module) is None
    assert torch.equal(module(x), reference(x, tensors, b, 4, 8))
    names = [k.name for k in dispatch.KERNELS]
    assert ("triton-codebook" in names) == (importlib.util.find_spec("triton") is not None)
