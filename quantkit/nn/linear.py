"""``QuantizedLinear``: a linear layer whose weight stays packed; the forward goes through the kernel dispatch."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.formats import UniformFormat
from quantkit.kernels.dispatch import uniform_matmul
from quantkit.kernels.reference import dequantize_uniform
from quantkit.scheme import LayerScheme

__all__ = ["QuantizedLinear"]


class QuantizedLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding the uniform format's tensors as buffers (they are not trainable)."""

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
        for name in ("qweight", "scales", "zeros", "perm"):  # absent ones are None (symmetric, no act-order)
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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight [out, in] (for inspection and tests; the forward does not keep it)."""
        return dequantize_uniform(
            self.qweight,
            self.scales,
            self.zeros,
            self.perm,
            bits=self.scheme.bits,
            group_size=self.scheme.group_size,
            in_features=self.in_features,
            dtype=dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return uniform_matmul(
            x,
            self.qweight,
            self.scales,
            self.zeros,
            self.perm,
            self.bias,
            bits=self.scheme.bits,
            group_size=self.scheme.group_size,
        )

    def extra_repr(self) -> str:
        s = self.scheme
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"method={s.method}, bits={s.bits}, group_size={s.group_size}, symmetric={s.symmetric}, "
            f"act_order={s.act_order}"
        )
