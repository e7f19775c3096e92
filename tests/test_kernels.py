"""Fused Triton dequant-matmul kernels against the PyTorch reference (dequantize, then matmul).

Without a GPU the kernels run under the Triton interpreter on CPU tensors. Triton decides between interpreter and
compiler when each ``@triton.jit`` runs, its own standard library's included, so ``TRITON_INTERPRET`` must be set
before Triton is first imported, by anything (transformers imports it too): tests/conftest.py sets it, defaulting
to 1. On a GPU machine, ``TRITON_INTERPRET=0 pytest tests/test_kernels.py`` runs the same checks compiled, on CUDA
tensors.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
from kernelkit import DEVICE, INTERPRET, kernel_module
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from quantkit.formats.packing import SUPPORTED_BITS, pack_codes
from quantkit.formats.uniform import uniform_matmul_ref
from quantkit.kernels import dispatch
from quantkit.kernels.ops import uniform_matmul_triton
from quantkit.quantizers.groups import num_groups

GROUP_SIZES = (32, 64, 128, -1)
# Max error relative to the output's largest magnitude. The kernels round the weight to the activation dtype as the
# reference does, so only accumulation order (and, with split-K, fp16 partial sums) differs. A wrong scale group
# gives errors of order 1.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def tu():
    """The kernel module, compiled the way this run asks (interpreter or CUDA)."""
    mod = kernel_module("triton_uniform")
    if INTERPRET:
        yield mod
        return
    # Compiled on a GPU, the autotuner would compile and time every config of the full lists for each of this
    # suite's few hundred shapes, which takes many minutes. Correctness needs a few tilings (a split-K one among
    # them); tests/test_kernel_aot.py compiles the full lists.
    saved = mod._gemv_configs, mod._gemm_configs
    mod._gemv_configs = lambda allow_split_k: [mod._gemv_config(32, 128, 1),
                                               mod._gemv_config(64, 64, 4 if allow_split_k else 1)]
    mod._gemm_configs = lambda: [mod._gemm_config(32, 64, 64, 4, 3)]
    mod._tuned_gemv.cache_clear()
    mod._tuned_gemm.cache_clear()
    yield mod
    mod._gemv_configs, mod._gemm_configs = saved
    mod._tuned_gemv.cache_clear()
    mod._tuned_gemm.cache_clear()


def make_layer(N, K, bits, group_size, *, symmetric, act_order, bias=False, dtype=torch.float32, seed=0):
    """Random packed tensors of a [N, K] layer; scales and zeros differ from group to group, so a kernel that
    reads the wrong group cannot agree with the reference by chance."""
    g = torch.Generator().manual_seed(seed)
    G = num_groups(group_size, K)
    layer = {
        "qweight": pack_codes(torch.randint(0, 2**bits, (N, K), generator=g), bits),
        "scales": (0.005 + 0.02 * torch.rand(N, G, generator=g)).half(),
        "zeros": None if symmetric else torch.randint(0, 2**bits, (N, G), generator=g).half(),
        "perm": torch.randperm(K, generator=g).to(torch.int16) if act_order else None,
        "bias": (0.1 * torch.randn(N, generator=g)).to(dtype) if bias else None,
    }
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in layer.items()}


def activations(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)


def assert_matches_reference(tu, x, layer, bits, group_size, config=None):
    out = tu.triton_uniform_matmul(x, **layer, bits=bits, group_size=group_size, config=config)
    ref = uniform_matmul_ref(x, **layer, bits=bits, group_size=group_size)
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < TOL[x.dtype], f"relative error {err:.2e} (M={x.numel() // x.shape[-1]}, config={config})"


@pytest.mark.parametrize("act_order", [False, True], ids=["stored-order", "act-order"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_matches_reference(tu, bits, group_size, symmetric, act_order):
    # K = 200 and 160 are multiples of none of the larger group sizes (last group shorter: 200 = 128 + 72,
    # 160 = 2 * 64 + 32) nor, for 200, of the block sizes; N = 72 leaves a partial column block. M = 1 takes the
    # GEMV path (split-K under the interpreter's config), M = 17 the GEMM path with a partial row block.
    K = 160 if act_order else 200
    layer = make_layer(72, K, bits, group_size, symmetric=symmetric, act_order=act_order)
    for M in (1, 17):
        assert_matches_reference(tu, activations(M, K), layer, bits, group_size)


@pytest.mark.parametrize("bits, group_size", [(3, 48), (4, 20), (4, 48), (2, 24), (8, 6)])
def test_groups_that_split_a_load_unit(tu, bits, group_size):
    # The kernels read scales once per load unit (a word; for 3 bits a run of 32 codes in three words) when the
    # group size is a multiple of the unit, and per code otherwise: 48 splits a 3-bit run, 20 a 4-bit word, 6 an
    # 8-bit word; 48 and 24 are multiples of a 4-bit and 2-bit word but smaller than a tile.
    layer = make_layer(40, 200, bits, group_size, symmetric=False, act_order=False, bias=True)
    for M, config in ((1, None), (3, {"BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1}), (17, None)):
        assert_matches_reference(tu, activations(M, 200), layer, bits, group_size, config=config)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize(
    "lead, N, K, group_size",
    [
        ((3,), 40, 96, 64),  # GEMV with masked rows; last group of 32
        ((2, 3), 16, 15, 64),  # K smaller than a group and a block; 3-D activations
        ((9,), 130, 64, 32),  # just past the GEMV threshold; N past a power of two
        ((2, 11), 7, 33, 32),  # N smaller than a block, last group of 1
    ],
)
def test_odd_shapes(tu, bits, lead, N, K, group_size):
    layer = make_layer(N, K, bits, group_size, symmetric=False, act_order=True, bias=True, seed=bits)
    assert_matches_reference(tu, activations(*lead, K), layer, bits, group_size)


@pytest.mark.parametrize("act_order", [False, True], ids=["stored-order", "act-order"])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("grid,bits", [("gaussian", 2), ("gaussian", 3), ("nf4", 4), ("fp4", 4), ("gaussian", 8)])
def test_level_grids_match_reference(tu, grid, bits, group_size, act_order):
    """Non-uniform grids decode through the level table: ``scale * levels[code]``, no zeros."""
    from quantkit.grids import make_grid

    layer = make_layer(72, 200, bits, group_size, symmetric=True, act_order=act_order, bias=True, seed=bits)
    layer["levels"] = make_grid(grid, bits).table.half().to(DEVICE)
    for M in (1, 17):
        assert_matches_reference(tu, activations(M, 200), layer, bits, group_size)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("M", [2, 24], ids=["gemv", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_activation_dtypes(tu, dtype, M, symmetric):
    # fp16 activations decode in fp16 (the kernels' own path, for both symmetries), the others in fp32.
    if INTERPRET and dtype == torch.bfloat16 and M > tu.GEMV_MAX_M:
        pytest.skip("Triton 3.6's interpreter multiplies bf16 tl.dot operands as their raw uint16 storage; "
                    "run with TRITON_INTERPRET=0 on a GPU to check bf16 GEMM")
    layer = make_layer(72, 200, 4, 32, symmetric=symmetric, act_order=True, bias=True, dtype=dtype)
    assert_matches_reference(tu, activations(M, 200, dtype=dtype), layer, 4, 32)


def test_decode_batches_on_the_gemm_path(tu):
    # gemv_max_m=0 sends decode-sized inputs to the tensor-core GEMM (benchmarks/kernel_bench.py times both paths).
    layer = make_layer(72, 200, 4, 32, symmetric=False, act_order=True, bias=True, dtype=torch.float16)
    for M in (1, 5):
        x = activations(M, 200, dtype=torch.float16)
        out = tu.triton_uniform_matmul(x, **layer, bits=4, group_size=32, gemv_max_m=0)
        ref = uniform_matmul_ref(x, **layer, bits=4, group_size=32)
        assert ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item() < TOL[torch.float16]
    with pytest.raises(ValueError, match="gemv_max_m"):
        tu.triton_uniform_matmul(x, **layer, bits=4, group_size=32, gemv_max_m=9)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize(
    "M, config",
    [
        (4, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1}),
        (4, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1}),  # tiles spanning four groups of 32
        (4, {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 4}),  # more splits than some of them have tiles
        (20, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}),
        (20, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}),
    ],
    ids=["gemv-small", "gemv-wide-k", "gemv-split4", "gemm-small", "gemm-wide-k"],
)
def test_tilings(tu, M, config, group_size):
    # 3 bits: codes straddle words, at every tiling.
    layer = make_layer(72, 200, 3, group_size, symmetric=False, act_order=False, bias=True, dtype=torch.float16)
    assert_matches_reference(tu, activations(M, 200, dtype=torch.float16), layer, 3, group_size, config=config)


def test_custom_op_opcheck(tu):
    """Schema, fake implementation and AOT dispatch agree with the real kernel (torch.compile's needs)."""
    layer = make_layer(40, 96, 4, 32, symmetric=False, act_order=True, bias=True)
    args = (activations(2, 96), layer["qweight"], layer["scales"], layer["zeros"], layer["perm"], layer["bias"])
    torch.library.opcheck(uniform_matmul_triton, args, {"bits": 4, "group_size": 32})


def test_fake_impl_on_meta():
    layer = make_layer(40, 96, 3, 64, symmetric=False, act_order=True, bias=True)
    meta = {k: v.to("meta") for k, v in layer.items()}
    for dtype in (torch.float16, torch.bfloat16):
        out = torch.ops.quantkit.uniform_matmul(
            torch.empty(2, 5, 96, dtype=dtype, device="meta"), **meta, bits=3, group_size=64
        )
        assert out.shape == (2, 5, 40) and out.dtype == dtype and out.device.type == "meta"
    with pytest.raises(RuntimeError, match="does not hold"):
        torch.ops.quantkit.uniform_matmul(torch.empty(2, 64, device="meta"), **meta, bits=3, group_size=64)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _linear(K, N, *, symmetric, act_order=False, rotation="none", device="cpu", packed=None):
    """A ``QuantizedLinear`` (W4 g32) with empty tensors on ``device``, or holding ``packed`` (make_layer's)."""
    from quantkit.config import LayerScheme
    from quantkit.nn import QuantizedLinear

    scheme = LayerScheme.from_dict(dict(method="gptq", bits=4, group_size=32, symmetric=symmetric,
                                        act_order=act_order, rotation=rotation))
    if packed is None:
        return QuantizedLinear(K, N, scheme, device=device, dtype=torch.float16)
    tensors = {k: v for k, v in packed.items() if v is not None and k != "bias"}
    return QuantizedLinear.from_packed(tensors, scheme, K, N, packed.get("bias"))


def test_dispatch_routes_cuda_to_the_custom_op():
    """What torch.compile sees for CUDA activations: one quantkit op, no dequantized weight. (Fake CUDA tensors,
    so this runs without a GPU.)"""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'quantkit[triton]')")
    N, K = 40, 96
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, K, dtype=torch.float16, device="cuda")
        layer = _linear(K, N, symmetric=True, device="cuda")
        with _OpLog() as log:
            out = layer(x)
    assert [op for op in log.ops if op.namespace != "prim"] == [torch.ops.quantkit.uniform_matmul.default]
    assert out.shape == (3, N) and out.dtype == torch.float16 and out.device.type == "cuda"


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    """CPU tensors take the reference even with TRITON_INTERPRET=1 set (as in this module): nothing changes for
    CPU users."""
    if importlib.util.find_spec("triton") is not None:

        def fail(*args, **kwargs):
            raise AssertionError("the Triton kernel ran on CPU tensors")

        triton_uniform = importlib.import_module("quantkit.kernels.triton_uniform")
        monkeypatch.setattr(triton_uniform, "triton_uniform_matmul", fail)
    layer = make_layer(40, 96, 4, 32, symmetric=False, act_order=True, bias=True)
    layer = {k: v.cpu() for k, v in layer.items()}
    module = _linear(96, 40, symmetric=False, act_order=True, packed=layer)
    x = torch.randn(3, 96)
    out = module(x)
    assert torch.equal(out, uniform_matmul_ref(x, **layer, bits=4, group_size=32))
    names = [k.name for k in dispatch.KERNELS]
    assert ("triton-uniform" in names) == (importlib.util.find_spec("triton") is not None)


# --- the input rotation computed inside the GEMV -----------------------------------------------------------------

@pytest.mark.parametrize(
    "K, block, config",
    [
        # Under the interpreter a 4096-wide block at the default 64-wide tile mixes 64 tiles per tile: minutes.
        (4096, 4096, {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2}),
        (11008, 256, None),
        (352, 32, None),
        (1024, 1024, None),
    ],
    ids=["llama-4096-full", "llama-11008-43x256", "block-below-tile", "full-1024"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_rotation_matches_rotate_then_matmul(tu, K, block, config, dtype):
    """``(W Rᵀ)(R x)`` with ``R x`` computed tile by tile inside the GEMV (blocks wider than the tile by mixing the
    block's other tiles, H = H_outer ⊗ H_tile) equals rotating first (HadamardRotation.apply, the CPU path) and
    then the reference matmul. M = 12 takes the GEMM path, which rotates in a separate launch first."""
    from quantkit.kernels.ops import uniform_matmul_cuda
    from quantkit.rotations import HadamardRotation, hadamard_layout, random_signs

    layout = hadamard_layout(K)
    assert (layout.block, layout.small) == (block, 1)
    rot = HadamardRotation(random_signs(K, 0, f"fused-{K}").to(DEVICE))
    layer = make_layer(40, K, 4, 128, symmetric=False, act_order=False, bias=True, dtype=dtype, seed=K)
    for M in (1, 5, 12):
        x = activations(M, K, dtype=dtype, seed=M)
        ref = uniform_matmul_ref(rot.apply(x.cpu()).to(DEVICE), **layer, bits=4, group_size=128)
        if config is not None and M <= tu.GEMV_MAX_M:
            out = tu.triton_uniform_matmul(x, **layer, bits=4, group_size=128, config=config, rot_signs=rot.signs,
                                           rot_block=block)
        else:  # the dispatch table's entry: the custom op, with the signs
            out = uniform_matmul_cuda(x, **layer, bits=4, group_size=128, rotation=rot)
        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        assert err < TOL[dtype], f"M={M}: relative error {err:.2e}"


@pytest.mark.parametrize(
    "block, config",
    [
        (256, {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 3}),  # 8 tiles per block; splits straddle blocks
        (256, {"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 1}),  # one tile per block
        (256, {"BLOCK_N": 64, "BLOCK_K": 512, "SPLIT_K": 1}),  # two blocks per tile (and a last tile half past K)
        (64, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2}),
    ],
    ids=["tile32-split3", "tile-equals-block", "tile-spans-blocks", "block64-tile128"],
)
@pytest.mark.parametrize("bits", [3, 4])
def test_fused_rotation_tilings(tu, block, config, bits):
    from quantkit.rotations.hadamard import hadamard_matrix

    K = 768  # 3 blocks of 256, 12 of 64; 1.5 tiles of 512
    g = torch.Generator().manual_seed(bits)
    signs = (torch.randint(0, 2, (K,), generator=g) * 2 - 1).to(torch.int8)
    layer = make_layer(72, K, bits, 64, symmetric=True, act_order=False, bias=False, seed=block)
    x = torch.randn(3, K, generator=g)
    # R x by the dense block-diagonal matrix, in float64: an independent reference for the in-kernel transform.
    rx = ((x.double() * signs.double()).view(3, K // block, block) @ hadamard_matrix(block).T / block**0.5).view(3, K)
    out = tu.triton_uniform_matmul(x.to(DEVICE), **layer, bits=bits, group_size=64, config=config,
                                   rot_signs=signs.to(DEVICE), rot_block=block)
    ref = uniform_matmul_ref(rx.float().to(DEVICE), **layer, bits=bits, group_size=64)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


def test_fused_rotation_rejects_what_it_cannot_do(tu):
    layer = make_layer(8, 96, 4, 32, symmetric=False, act_order=True)
    x, signs = activations(1, 96), torch.ones(96, dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match="act-order"):
        tu.triton_uniform_matmul(x, **layer, bits=4, group_size=32, rot_signs=signs, rot_block=32)
    layer["perm"] = None
    for block in (3, 64, 12):  # not a power of two, not dividing 96
        with pytest.raises(ValueError, match="rot_block"):
            tu.triton_uniform_matmul(x, **layer, bits=4, group_size=32, rot_signs=signs, rot_block=block)
    with pytest.raises(ValueError, match="rot_signs"):
        tu.triton_uniform_matmul(x, **layer, bits=4, group_size=32, rot_signs=signs[:64], rot_block=32)


def test_custom_op_opcheck_with_rotation(tu):
    layer = make_layer(40, 128, 4, 32, symmetric=False, act_order=False, bias=True)
    signs = (torch.randint(0, 2, (128,), generator=torch.Generator().manual_seed(0)) * 2 - 1).to(torch.int8)
    args = (activations(2, 128), layer["qweight"], layer["scales"], layer["zeros"], None, layer["bias"], None,
            signs.to(DEVICE))
    torch.library.opcheck(uniform_matmul_triton, args, {"bits": 4, "group_size": 32, "rot_block": 128})


@pytest.mark.parametrize("act_order", [False, True], ids=["stored-order", "act-order"])
def test_dispatch_fuses_a_power_of_two_rotation(act_order, monkeypatch):
    """For CUDA activations and a power-of-two rotation, the dispatch makes one call of the quantkit op with the
    signs (the rotation inside the kernel); with act-order it rotates first and calls the op without them."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'quantkit[triton]')")
    from quantkit.rotations import HadamardRotation

    calls = []
    rotated = []
    monkeypatch.setattr(HadamardRotation, "apply", lambda self, x: rotated.append(x.shape) or x)
    N, K = 40, 256
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(3, K, dtype=torch.float16, device="cuda")
        layer = _linear(K, N, symmetric=True, act_order=act_order, rotation="hadamard", device="cuda")
        with _OpLog() as log:
            layer(x)
        calls = [op for op in log.ops if op.namespace == "quantkit"]
    assert calls == [torch.ops.quantkit.uniform_matmul.default]
    assert rotated == ([(3, K)] if act_order else [])
