"""``torch.ops.quantkit.uniform_matmul``: the fused Triton dequant-matmul as a PyTorch custom op.

Being an op with a fake (meta) implementation is what lets ``torch.compile`` trace through ``QuantizedLinear`` and
lets models be built on the meta device. Defining the op needs neither a GPU nor Triton; running it imports
:mod:`quantkit.kernels.triton_uniform`, which needs Triton. :mod:`quantkit.kernels.dispatch` routes CUDA calls here
only when Triton is installed.
"""

from __future__ import annotations

import torch

from quantkit.formats.packing import SUPPORTED_BITS, packed_words

__all__ = ["triton_supports", "uniform_matmul_triton"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op("quantkit::uniform_matmul", mutates_args=())
def uniform_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    levels: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the scalar-grid format through the fused Triton kernels; ``[..., out]``, ``x.dtype``."""
    try:
        from quantkit.kernels.triton_uniform import triton_uniform_matmul
    except ImportError as e:
        raise ImportError(
            "quantkit's fused kernels need Triton: pip install 'quantkit[triton]' (or use the PyTorch reference, "
            "quantkit.kernels.uniform_matmul_ref)"
        ) from e
    return triton_uniform_matmul(x, qweight, scales, zeros, perm, bias, bits=bits, group_size=group_size,
                                 levels=levels)


@uniform_matmul_triton.register_fake
def _(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    levels: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    torch._check(qweight.dim() == 2 and qweight.shape[1] == packed_words(x.shape[-1], bits),
                 lambda: f"qweight {tuple(qweight.shape)} does not hold {x.shape[-1]} {bits}-bit codes per row")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def triton_supports(x: torch.Tensor, qweight: torch.Tensor, *, bits: int, group_size: int) -> bool:
    """The dispatch predicate: CUDA tensors of a dtype and bit width the kernels handle, and a non-empty batch."""
    return (
        x.is_cuda
        and qweight.is_cuda
        and x.dtype in _DTYPES
        and qweight.dtype == torch.int32
        and bits in SUPPORTED_BITS
        and (group_size == -1 or group_size > 0)
        and x.numel() > 0
    )
