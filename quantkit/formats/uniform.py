"""The uniform integer format: bit-packed codes, fp16 scales (and zeros when asymmetric), the act-order
permutation when columns are stored in processing order.

Tensors of a quantized linear ``{module}``, stored under ``{module}.{field}``:

- ``qweight`` int32 [out, ceil(in * bits / 32)]: each row's codes as a bit stream (see ``packing``)
- ``scales`` fp16 [out, ngroups]; groups are contiguous runs of ``group_size`` stored columns, the last one
  shorter when ``in`` is not a multiple of ``group_size``
- ``zeros`` fp16 [out, ngroups], integer valued; absent for symmetric grids (the zero is ``2**(bits-1)``)
- ``perm`` [in], only with act-order and dynamic groups: stored column ``j`` is original column ``perm[j]``;
  int16 when ``in < 2**15`` (it costs ``16 / out`` bits per weight), else int32
- ``bias`` in the model's dtype, when the linear has one
"""

from __future__ import annotations

import torch

from quantkit.algos import QuantResult
from quantkit.algos.groups import num_groups
from quantkit.formats.packing import pack_codes, packed_words
from quantkit.scheme import LayerScheme

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "UniformFormat"]

FORMAT_NAME = "quantkit-uniform"
FORMAT_VERSION = 1


def perm_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features < 2**15 else torch.int32


class UniformFormat:
    name = FORMAT_NAME
    version = FORMAT_VERSION

    @staticmethod
    def tensor_specs(
        scheme: LayerScheme, in_features: int, out_features: int
    ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the stored tensors (bias excluded), so empty modules can be built before loading."""
        ng = num_groups(scheme.group_size, in_features)
        specs = {
            "qweight": ((out_features, packed_words(in_features, scheme.bits)), torch.int32),
            "scales": ((out_features, ng), torch.float16),
        }
        if not scheme.symmetric:
            specs["zeros"] = ((out_features, ng), torch.float16)
        if scheme.stores_perm:
            specs["perm"] = ((in_features,), perm_dtype(in_features))
        return specs

    @staticmethod
    def pack(result: QuantResult, scheme: LayerScheme) -> dict[str, torch.Tensor]:
        out = {
            "qweight": pack_codes(result.codes, scheme.bits),
            "scales": result.scales.to(torch.float16),
        }
        if not scheme.symmetric:
            out["zeros"] = result.zeros.to(torch.float16)
        if scheme.stores_perm:
            if result.perm is None:
                raise ValueError("scheme stores a permutation but the result has none")
            out["perm"] = result.perm.to(perm_dtype(result.perm.numel()))
        # fp16 storage must be exact: the rounding method already computed with fp16-representable values.
        assert torch.equal(out["scales"].float(), result.scales.float()), "scales are not fp16-representable"
        return {k: v.contiguous() for k, v in out.items()}
