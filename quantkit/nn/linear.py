"""``QuantizedLinear``: a linear layer whose weight stays packed; the forward goes through the kernel dispatch.

With a Hadamard rotation (quantkit.rotations) the stored weight is ``S W Rᵀ``: the forward rotates the input by
``R`` (the dispatch's kernel may do that inside the dequant-matmul) and the output by ``Sᵀ`` after it, then adds
the bias.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.formats import UniformFormat
from quantkit.kernels.dispatch import uniform_matmul
from quantkit.kernels.reference import dequantize_uniform
from quantkit.rotations import HadamardRotation
from quantkit.scheme import LayerScheme

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding the packed format's tensors as buffers (they are not trainable)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: LayerScheme,
        *,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        specs = UniformFormat.tensor_specs(scheme, in_features, out_features)
        # Absent ones are None (symmetric or level grid, no act-order, no rotation).
        for name in ("qweight", "scales", "zeros", "levels", "perm", "rot_in_signs", "rot_out_signs"):
            shape_dtype = specs.get(name)
            empty = torch.empty(shape_dtype[0], dtype=shape_dtype[1], device=device) if shape_dtype else None
            self.register_buffer(name, empty)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_packed(
        cls, tensors: dict[str, torch.Tensor], scheme: LayerScheme, in_features: int, bias: torch.Tensor | None = None
    ) -> QuantizedLinear:
        out_features = tensors["qweight"].shape[0]
        m = cls(in_features, out_features, scheme, bias=bias is not None, device="meta")
        for name in UniformFormat.tensor_specs(scheme, in_features, out_features):
            setattr(m, name, tensors[name].clone())
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @property
    def rotations(self) -> tuple[HadamardRotation | None, HadamardRotation | None]:
        """The input-side and output-side rotations fused into the stored weight (None where there is none)."""
        r_in = HadamardRotation(self.rot_in_signs, "input") if self.rot_in_signs is not None else None
        r_out = HadamardRotation(self.rot_out_signs, "output") if self.rot_out_signs is not None else None
        return r_in, r_out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] in the original basis (for inspection and tests; the forward never builds it)."""
        W = dequantize_uniform(
            self.qweight,
            self.scales,
            self.zeros,
            self.perm,
            bits=self.scheme.bits,
            group_size=self.scheme.group_size,
            in_features=self.in_features,
            levels=self.levels,
        )
        for rot in self.rotations:
            if rot is not None:
                W = rot.unfuse(W)
        return W.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r_in, r_out = self.rotations
        y = uniform_matmul(  # applies r_in to x (a kernel may do it inside the matmul)
            x,
            self.qweight,
            self.scales,
            self.zeros,
            self.perm,
            self.bias if r_out is None else None,
            bits=self.scheme.bits,
            group_size=self.scheme.group_size,
            levels=self.levels,
            rotation=r_in,
        )
        if r_out is not None:
            y = r_out.online(y)
            if self.bias is not None:
                y = y + self.bias
        return y

    def extra_repr(self) -> str:
        s = self.scheme
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"method={s.method}, bits={s.bits}, group_size={s.group_size}, symmetric={s.symmetric}, "
            f"act_order={s.act_order}, grid={s.grid}, rotation={s.rotation}{'+output' if s.rotate_output else ''}"
        )
