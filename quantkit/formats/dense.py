"""The format ``quantkit-dense``: the weight itself in float16 (quantizer ``fp16``, quantkit.quantizers.dense).

Tensors of a linear ``{module}``: ``dense`` fp16 [out, in], plus the rotation signs every format stores and the
bias. Its bits are counted like any format's (16 per weight), so a recipe that keeps some linears in full precision
(the bit allocator's fp16 candidate) reports its bits per weight all-in.
"""

from __future__ import annotations

import torch

from quantkit.config.spec import FieldError
from quantkit.formats import Format, TensorSpecs, register_format
from quantkit.quantizers import QuantResult
from quantkit.quantizers.dense import DenseSpec

__all__ = ["DenseFormat"]


@register_format
class DenseFormat(Format):
    name = "quantkit-dense"
    version = 1
    stores = (DenseSpec,)

    def check_scheme(self, scheme) -> None:
        super().check_scheme(scheme)
        for f in ("act_order", "static_groups"):
            if getattr(scheme.method, f):
                raise FieldError(f"method.{f}", "a dense fp16 weight has no column order or groups", True)

    def tensor_specs(self, scheme, in_features: int, out_features: int) -> TensorSpecs:
        return {"dense": ((out_features, in_features), torch.float16)}

    def pack(self, result: QuantResult, scheme) -> dict[str, torch.Tensor]:
        return {"dense": result.codes.to(torch.float16).contiguous()}

    def unpack(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> QuantResult:
        return QuantResult(codes=tensors["dense"], W_hat=tensors["dense"].float())

    def dequantize(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> torch.Tensor:
        return tensors["dense"].float()
