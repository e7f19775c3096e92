"""CPU path for the codebook formats (``quantkit-vq``, ``quantkit-aq``): the dense weight decoded once, kept.

The formats' reference forward unpacks the bit-packed codes, gathers the codewords, scales them and undoes the act-
order permutation at every call: on SmolLM2's 1536 x 576 projections ~14 ms a call on one core (9 ms unpacking, 5 ms
decoding, measured with another job on the machine), whatever the number of tokens. Beside a 2048-token window's
GEMMs that is little (the 148-window perplexity took 16 min 5 s with this kernel against 16 min 24 s for a same-
shaped folder without it); SmolLM2's 210 linears add seconds to every forward however short, as lm-eval's multiple-
choice requests are. ``cpu-codebook`` decodes the weight once, with the format's own ``dequantize`` cast to the
activations' dtype exactly as the reference casts it, keeps it in the module's ``kernel_cache`` and multiplies with
``F.linear``, so its output is the reference's bit for bit. The cache is rebuilt when one of the stored tensors is
replaced, edited in place or moved (the same signature as the uniform CPU kernels, ``quantkit.kernels.cpu``).

The trade: a decoded copy of each weight stays in memory in the activations' dtype (bf16: the size of the bf16
model; fp32: twice that), on top of the packed tensors. ``QUANTKIT_CPU_KERNELS=0`` turns it off, and every call
takes the reference again (packed memory only, slower). A lookup-table GEMV that reads the codes at every call
is the CUDA kernels' job (quantkit.kernels.triton_codebook); PyTorch has no CPU kernel for it.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quantkit.kernels.cpu import ENV_VAR, _signature

__all__ = ["FORMATS", "dense_weight", "linear", "register_cpu_codebook_kernels", "supports"]

FORMATS = ("quantkit-vq", "quantkit-aq")
_CACHE_KEY = "cpu-codebook"


def supports(x: torch.Tensor, module) -> bool:
    """A plain CPU floating-point input for a codebook module on CPU, the kernels on, outside ``torch.compile``."""
    return (
        os.environ.get(ENV_VAR, "1") != "0"
        and type(x) is torch.Tensor  # not a FakeTensor or another subclass
        and x.device.type == "cpu"
        and x.is_floating_point()
        and x.numel() > 0
        and module.codes.device.type == "cpu"
        and not torch.compiler.is_compiling()
    )


def dense_weight(module, dtype: torch.dtype) -> torch.Tensor:
    """The format's dequantized weight [out, in] (rotations still fused) in ``dtype``, decoded once per dtype and
    kept until a stored tensor changes."""
    sig = (_signature(module), dtype)
    cached = module.kernel_cache.get(_CACHE_KEY)
    if cached is None or cached[0] != sig:
        with torch.no_grad():
            W = module.format.dequantize(module.tensors, module.scheme, module.in_features).to(dtype)
        module.kernel_cache[_CACHE_KEY] = cached = (sig, W)
    return cached[1]


def linear(x: torch.Tensor, module, *, bias: torch.Tensor | None = None, rotation=None) -> torch.Tensor:
    """``(R x) @ W.T (+ bias)``: the reference's arithmetic (``Format.linear``) with the decoded weight kept."""
    if rotation is not None:
        x = rotation.apply(x)
    return F.linear(x, dense_weight(module, x.dtype), bias)


def register_cpu_codebook_kernels() -> None:
    from quantkit.kernels import dispatch

    for name in FORMATS:
        dispatch.register_kernel("cpu-codebook", name, supports, linear)
