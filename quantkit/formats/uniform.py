"""The scalar-grid format: bit-packed codes, fp16 scales, zeros (asymmetric uniform grid) or a level table
(non-uniform grids), the act-order permutation when columns are stored in processing order, and the random
signs of the Hadamard rotations fused into the weight.

Tensors of a quantized linear ``{module}``, stored under ``{module}.{field}``:

- ``qweight`` int32 [out, ceil(in * bits / 32)]: each row's codes as a bit stream (see ``packing``)
- ``scales`` fp16 [out, ngroups]; groups are contiguous runs of ``group_size`` stored columns, the last one
  shorter when ``in`` is not a multiple of ``group_size``
- ``zeros`` fp16 [out, ngroups], integer valued; only for the asymmetric uniform grid (symmetric: the zero is
  ``2**(bits-1)``); the weight is ``scale * (code - zero)``
- ``levels`` fp16 [2**bits], only for non-uniform grids (``gaussian``, ``nf4``, ``fp4``): the weight is
  ``scale * levels[code]``
- ``perm`` [in], only with act-order and dynamic groups: stored column ``j`` is original column ``perm[j]``;
  int16 when ``in < 2**15`` (it costs ``16 / out`` bits per weight), else int32
- ``rot_in_signs`` int8 [in] (and ``rot_out_signs`` int8 [out]), with a Hadamard rotation: the diagonal of the
  random signs ``D`` of ``R = H D / √b`` (quantkit.rotations). The stored weight is ``S W Rᵀ``; the forward
  rotates the input by ``R`` and the output by ``Sᵀ``.
- ``bias`` in the model's dtype, when the linear has one (in the original, unrotated basis)

Version 2 added levels and rotations; version 1 checkpoints are version 2 checkpoints without them.
"""

from __future__ import annotations

import torch

from quantkit.algos import QuantResult
from quantkit.algos.groups import num_groups
from quantkit.formats.packing import pack_codes, packed_words
from quantkit.grids import make_grid
from quantkit.scheme import LayerScheme

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "UniformFormat"]

FORMAT_NAME = "quantkit-uniform"
FORMAT_VERSION = 2


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
        if scheme.stores_zeros:
            specs["zeros"] = ((out_features, ng), torch.float16)
        if scheme.stores_levels:
            specs["levels"] = ((2**scheme.bits,), torch.float16)
        if scheme.stores_perm:
            specs["perm"] = ((in_features,), perm_dtype(in_features))
        if scheme.rotation != "none":
            specs["rot_in_signs"] = ((in_features,), torch.int8)
            if scheme.rotate_output:
                specs["rot_out_signs"] = ((out_features,), torch.int8)
        return specs

    @staticmethod
    def pack(result: QuantResult, scheme: LayerScheme, *, rotations: dict[str, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
        """The stored tensors of ``result``; ``rotations`` maps ``rot_in_signs`` / ``rot_out_signs`` to signs."""
        out = {
            "qweight": pack_codes(result.codes, scheme.bits),
            "scales": result.scales.to(torch.float16),
        }
        if scheme.stores_zeros:
            out["zeros"] = result.zeros.to(torch.float16)
        if scheme.stores_levels:
            out["levels"] = make_grid(scheme.grid, scheme.bits).table.to(torch.float16)
        for name, signs in (rotations or {}).items():
            out[name] = signs.to(torch.int8)
        if scheme.stores_perm:
            if result.perm is None:
                raise ValueError("scheme stores a permutation but the result has none")
            out["perm"] = result.perm.to(perm_dtype(result.perm.numel()))
        # fp16 storage must be exact: the rounding method already computed with fp16-representable values.
        assert torch.equal(out["scales"].float(), result.scales.float()), "scales are not fp16-representable"
        expected = UniformFormat.tensor_specs(scheme, result.codes.shape[1], result.codes.shape[0])
        if set(out) != set(expected):
            raise ValueError(f"packed tensors {sorted(out)} do not match the scheme's {sorted(expected)}")
        return {k: v.contiguous() for k, v in out.items()}
