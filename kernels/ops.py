"""``torch.ops.quantkit.uniform_matmul`` and ``torch.ops.quantkit.codebook_matmul``: the fused Triton kernels of
the scalar-grid and the codebook formats (vector ``quantkit-vq``, additive ``quantkit-aq``) as PyTorch custom ops.

Being an op with a fake (meta) implementation is what lets ``torch.compile`` trace through ``QuantizedLinear`` and
lets models be built on the meta device. Defining the ops needs neither a GPU nor Triton; running one imports
:mod:`quantkit.kernels.triton_uniform` (or ``triton_codebook``), which needs Triton.
:mod:`quantkit.kernels.dispatch` routes CUDA calls here only when Triton is installed.

Each op has a backward for its activation (and bias), so adapters trained on a packed model (quantkit.hf.peft) get
their gradients through the fused forward: ``∂L/∂x = ∂L/∂y · W``, with ``W`` dequantized from the saved packed
tensors in the backward (the dense weight is not kept between the two passes, as in bitsandbytes' 4-bit matmul for
QLoRA). The packed tensors get no gradient. The Triton Hadamard transforms have no backward: their dispatch
predicates leave a call that needs a gradient to the PyTorch transform, which autograd differentiates.
"""

from __future__ import annotations

import torch

from quantkit.formats.codebook import AQFormat, VQFormat
from quantkit.formats.packing import SUPPORTED_BITS, packed_words, unpack_bits
from quantkit.formats.uniform import dequantize_uniform

__all__ = ["codebook_matmul_triton", "codebook_supports", "register_triton_kernels", "triton_supports",
           "uniform_matmul_cuda", "uniform_matmul_triton"]

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
    rot_signs: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    rot_block: int = 0,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the scalar-grid format through the fused Triton kernels; ``[..., out]``, ``x.dtype``.
    With ``rot_signs`` the weight is stored as ``W Rᵀ`` (``R = H D / √rot_block``, power-of-two Sylvester blocks)
    and the result is ``(R x) @ W.T``, the rotation computed inside the GEMV for decode-sized inputs."""
    try:
        from quantkit.kernels.triton_uniform import triton_uniform_matmul
    except ImportError as e:
        raise ImportError(
            "quantkit's fused kernels need Triton: pip install 'quantkit[triton]' (or use the PyTorch reference, "
            "quantkit.formats.uniform.uniform_matmul_ref)"
        ) from e
    return triton_uniform_matmul(x, qweight, scales, zeros, perm, bias, bits=bits, group_size=group_size,
                                 levels=levels, rot_signs=rot_signs, rot_block=rot_block)


@uniform_matmul_triton.register_fake
def _(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    levels: torch.Tensor | None = None,
    rot_signs: torch.Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    rot_block: int = 0,
) -> torch.Tensor:
    torch._check(qweight.dim() == 2 and qweight.shape[1] == packed_words(x.shape[-1], bits),
                 lambda: f"qweight {tuple(qweight.shape)} does not hold {x.shape[-1]} {bits}-bit codes per row")
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _uniform_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    x, qweight, scales, zeros, perm, bias, levels, rot_signs = inputs
    ctx.save_for_backward(qweight, scales, zeros, perm, levels, rot_signs)
    ctx.kw = keyword_only_inputs
    ctx.in_features = x.shape[-1]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _uniform_backward(ctx, grad: torch.Tensor):
    """``∂L/∂x = Rᵀ (∂L/∂y · W)`` (``R`` the input rotation when ``rot_signs`` is given) and ``∂L/∂bias``."""
    qweight, scales, zeros, perm, levels, rot_signs = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        W = dequantize_uniform(qweight, scales, zeros, perm, bits=ctx.kw["bits"], group_size=ctx.kw["group_size"],
                               in_features=ctx.in_features, dtype=grad.dtype, levels=levels)  # [out, in]
        grad_x = grad @ W
        if rot_signs is not None:
            from quantkit.kernels.triton_hadamard import triton_rotate

            grad_x = triton_rotate(grad_x, rot_signs, ctx.kw["rot_block"], transpose=True)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias, None, None


uniform_matmul_triton.register_autograd(_uniform_backward, setup_context=_uniform_setup_context)


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


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


def uniform_matmul_cuda(x, qweight, scales, zeros, perm, bias, *, bits: int, group_size: int,
                        levels: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    """The dispatch table's Triton entry: ``(R x) @ W.T`` for an input rotation ``R`` (a ``HadamardRotation``) or
    ``x @ W.T``. A rotation of power-of-two blocks on a weight without act-order runs inside the kernel; any other
    (a 12/20/28 factor, a permuted weight) is applied first, by ``rotation.apply``."""
    if rotation is not None and (rotation.layout.small != 1 or perm is not None):
        x, rotation = rotation.apply(x), None
    if rotation is None:
        return uniform_matmul_triton(x, qweight, scales, zeros, perm, bias, levels, bits=bits, group_size=group_size)
    return uniform_matmul_triton(x, qweight, scales, zeros, perm, bias, levels, rotation.signs, bits=bits,
                                 group_size=group_size, rot_block=rotation.layout.block)


def _uniform_supports(x: torch.Tensor, module) -> bool:
    t, q = module.tensors, module.scheme.quantizer
    return triton_supports(x, t["qweight"], bits=q.bits, group_size=q.group_size)


def _uniform_linear(x: torch.Tensor, module, *, bias: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    t, q = module.tensors, module.scheme.quantizer
    return uniform_matmul_cuda(x, t["qweight"], t["scales"], t.get("zeros"), t.get("perm"), bias, bits=q.bits,
                               group_size=q.group_size, levels=t.get("levels"), rotation=rotation)


@torch.library.custom_op("quantkit::codebook_matmul", mutates_args=())
def codebook_matmul_triton(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    dim: int,
    bits: int,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for the codebook formats through the Triton lookup-table kernels (GEMV for decode-sized
    inputs, dequantize-then-GEMM beyond); ``[..., out]``, ``x.dtype``. ``quantkit-vq``: ``codes`` [out, words],
    ``codebook`` [entries, dim]; ``quantkit-aq``: ``codes`` [tables, out, words] and ``codebook`` [tables, entries,
    dim], the codewords of the tables summed."""
    try:
        from quantkit.kernels.triton_codebook import triton_codebook_matmul
    except ImportError as e:
        raise ImportError(
            "quantkit's fused kernels need Triton: pip install 'quantkit[triton]' (or use the PyTorch reference, "
            "quantkit.formats.codebook.VQFormat.linear)"
        ) from e
    return triton_codebook_matmul(x, codes, codebook, scales, perm, bias, dim=dim, bits=bits)


@codebook_matmul_triton.register_fake
def _(
    x: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    scales: torch.Tensor,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    dim: int,
    bits: int,
) -> torch.Tensor:
    torch._check(x.shape[-1] % dim == 0, lambda: f"vectors of {dim} do not tile {x.shape[-1]} input columns")
    torch._check(codes.dim() in (2, 3) and codes.shape[-1] == packed_words(x.shape[-1] // dim, bits),
                 lambda: f"codes {tuple(codes.shape)} do not hold {x.shape[-1] // dim} {bits}-bit codes per row")
    torch._check(codebook.dim() == codes.dim() and (codes.dim() == 2 or codebook.shape[0] == codes.shape[0]),
                 lambda: f"codebook {tuple(codebook.shape)} does not match codes {tuple(codes.shape)}: one table per "
                         "code stream")
    return x.new_empty((*x.shape[:-1], codes.shape[-2]))


def _codebook_setup_context(ctx, inputs, keyword_only_inputs, output) -> None:
    x, codes, codebook, scales, perm, bias = inputs
    ctx.save_for_backward(codes, codebook, scales, perm)
    ctx.kw = keyword_only_inputs
    ctx.in_features = x.shape[-1]
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _codebook_backward(ctx, grad: torch.Tensor):
    """``∂L/∂x = ∂L/∂y · W`` with ``W`` decoded as quantkit.formats.codebook does, and ``∂L/∂bias``."""
    codes, codebook, scales, perm = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        dim, bits = ctx.kw["dim"], ctx.kw["bits"]
        rest = {"scales": scales} | ({"perm": perm} if perm is not None else {})
        if codes.dim() == 2:
            W = VQFormat._decode(unpack_bits(codes, bits, ctx.in_features // dim), {"codebook": codebook, **rest})
        else:  # additive tables
            split = torch.stack([unpack_bits(c, bits, ctx.in_features // dim) for c in codes])
            W = AQFormat._decode(split, {"codebooks": codebook, **rest})  # [out, in] fp32
        grad_x = grad @ W.to(grad.dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, grad_bias


codebook_matmul_triton.register_autograd(_codebook_backward, setup_context=_codebook_setup_context)


def codebook_supports(x: torch.Tensor, codes: torch.Tensor, *, dim: int, bits: int) -> bool:
    """The dispatch predicate of ``quantkit-vq`` and ``quantkit-aq``: CUDA tensors, a dtype, vector dimension and
    code width the kernels handle, and a non-empty batch."""
    return (
        x.is_cuda
        and codes.is_cuda
        and x.dtype in _DTYPES
        and codes.dtype == torch.int32
        and 2 <= dim <= 8
        and 2 <= bits <= 16
        and x.shape[-1] % dim == 0
        and x.numel() > 0
    )


def _codebook_supports(x: torch.Tensor, module) -> bool:
    q = module.scheme.quantizer
    return codebook_supports(x, module.tensors["codes"], dim=q.dim, bits=q.bits)


def _codebook_linear(x: torch.Tensor, module, *, bias: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    # The input rotation runs first (its own launch on CUDA): the GEMV gathers x by codes, not in Hadamard blocks.
    if rotation is not None:
        x = rotation.apply(x)
    t, q = module.tensors, module.scheme.quantizer
    return codebook_matmul_triton(x, t["codes"], t["codebook"], t["scales"], t.get("perm"), bias, dim=q.dim,
                                  bits=q.bits)


def _aq_supports(x: torch.Tensor, module) -> bool:
    """``quantkit-aq`` with any number of tables: the lookup-table kernels sum one codeword per table (with one
    table they compile to the vq kernels)."""
    q = module.scheme.quantizer
    return codebook_supports(x, module.tensors["codes"], dim=q.dim, bits=q.bits)


def _aq_linear(x: torch.Tensor, module, *, bias: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    if rotation is not None:
        x = rotation.apply(x)
    t, q = module.tensors, module.scheme.quantizer
    return codebook_matmul_triton(x, t["codes"], t["codebooks"], t["scales"], t.get("perm"), bias, dim=q.dim,
                                  bits=q.bits)


def register_triton_kernels() -> None:
    """The dispatch table's Triton entries (quantkit.kernels.dispatch calls this once, when Triton is installed):
    the dequant-matmul of ``quantkit-uniform``, the lookup-table matmul of ``quantkit-vq`` and ``quantkit-aq`` (any
    number of tables), the Hadamard transforms, for CUDA tensors (the transforms only where no gradient is needed:
    they have no backward)."""
    from quantkit.kernels import dispatch
    from quantkit.kernels.triton_hadamard import triton_fwht, triton_rotate

    dispatch.register_kernel("triton-uniform", "quantkit-uniform", _uniform_supports, _uniform_linear)
    dispatch.register_kernel("triton-codebook", "quantkit-vq", _codebook_supports, _codebook_linear)
    dispatch.register_kernel("triton-codebook-aq", "quantkit-aq", _aq_supports, _aq_linear)  # any number of tables
    dispatch.register_hadamard_kernel("triton-rotate", fused=True, impl=triton_rotate,
                                      supports=lambda x, layout: x.is_cuda and layout.small == 1
                                      and not _needs_grad(x))
    dispatch.register_hadamard_kernel("triton-fwht", fused=False, impl=triton_fwht,
                                      supports=lambda x, layout: x.is_cuda and not _needs_grad(x))
