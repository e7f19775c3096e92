"""The Triton fast Walsh–Hadamard transform against the PyTorch one (interpreter on CPU, see test_kernels.py),
and the cost of the online rotation reported by the CPU reference path."""

import importlib.util
import os

import pytest
import torch

from quantkit.rotations import HadamardRotation, fwht, random_signs

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(scope="module")
def kernel():
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'quantkit[triton]')")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA GPU")
    from quantkit.kernels.triton_hadamard import triton_fwht

    return triton_fwht


@pytest.mark.parametrize("n, rows", [(1, 3), (2, 5), (4, 300), (64, 7), (128, 1), (512, 9), (4096, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_fwht_matches_torch(kernel, n, rows, dtype):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE)
    out = kernel(x)
    ref = fwht(x.double())
    assert out.dtype == dtype and out.shape == x.shape
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < tol


def test_triton_fwht_keeps_leading_dims_and_rejects_other_lengths(kernel):
    x = torch.randn(2, 3, 16).to(DEVICE)
    assert torch.allclose(kernel(x), fwht(x), atol=1e-5)
    assert kernel(torch.empty(0, 8).to(DEVICE)).shape == (0, 8)
    with pytest.raises(ValueError, match="power-of-two"):
        kernel(torch.randn(2, 12).to(DEVICE))


@pytest.mark.skipif(INTERPRET, reason="the rotation routes through Triton only for CUDA tensors")
def test_rotation_on_cuda_uses_the_kernel_and_agrees_with_cpu():
    rot = HadamardRotation(random_signs(576, 0, "x"))
    x = torch.randn(4, 576)
    assert torch.allclose(rot.apply(x.cuda()).cpu(), rot.apply(x), atol=1e-5)


@pytest.mark.parametrize("n, block", [(64, 64), (4096, 4096), (11008, 256), (704, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_rotate_is_the_randomized_rotation(n, block, dtype):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'quantkit[triton]')")
    from quantkit.kernels.triton_hadamard import triton_rotate
    from quantkit.rotations import hadamard_layout

    assert hadamard_layout(n).block == block
    rot = HadamardRotation(random_signs(n, 0, "k"))
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(0)).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for fn, ref in ((lambda t: triton_rotate(t, rot.signs.to(DEVICE), block), rot.apply),
                    (lambda t: triton_rotate(t, rot.signs.to(DEVICE), block, transpose=True), rot.invert)):
        out = fn(x.to(DEVICE)).cpu()
        assert out.dtype == dtype
        assert (out.float() - ref(x.float())).abs().max().item() < tol
