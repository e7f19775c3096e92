"""The scalar-grid format ``quantkit-uniform``: bit-packed codes, fp16 scales, zeros (asymmetric uniform grid) or a
level table (non-uniform grids), and the act-order permutation when columns are stored in processing order.

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

plus the rotation signs every format stores (quantkit.formats) and the bias. Version 2 added levels and rotations;
version 1 checkpoints are version 2 checkpoints without them.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats import Format, TensorSpecs, register_format
from quantkit.formats.packing import pack_codes, packed_words, unpack_codes
from quantkit.quantizers import QuantResult
from quantkit.quantizers.groups import group_size_of, num_groups
from quantkit.quantizers.scalar import ScalarSpec

__all__ = ["UniformFormat", "dequantize_uniform", "uniform_matmul_ref"]


def perm_dtype(in_features: int) -> torch.dtype:
    return torch.int16 if in_features < 2**15 else torch.int32


def _stores_zeros(q: ScalarSpec) -> bool:
    return q.name == "uniform" and not q.symmetric


def _stores_perm(scheme) -> bool:
    """Act-order with dynamic groups stores columns in processing order plus the permutation."""
    return scheme.method.act_order and not scheme.method.static_groups


@register_format
class UniformFormat(Format):
    name = "quantkit-uniform"
    version = 2
    stores = (ScalarSpec,)

    def trainable(self, scheme) -> tuple[str, ...]:
        """The per-group scales. Zeros stay: the format stores them integer valued (the kernels and the
        compressed-tensors export rely on it); a level table is shared by every layer of a grid and stays too."""
        return ("scales",)

    def tensor_specs(self, scheme, in_features: int, out_features: int) -> TensorSpecs:
        q = scheme.quantizer
        ng = num_groups(q.group_size, in_features)
        specs: TensorSpecs = {
            "qweight": ((out_features, packed_words(in_features, q.bits)), torch.int32),
            "scales": ((out_features, ng), torch.float16),
        }
        if _stores_zeros(q):
            specs["zeros"] = ((out_features, ng), torch.float16)
        if q.name != "uniform":
            specs["levels"] = ((2**q.bits,), torch.float16)
        if _stores_perm(scheme):
            specs["perm"] = ((in_features,), perm_dtype(in_features))
        return specs

    def pack(self, result: QuantResult, scheme) -> dict[str, torch.Tensor]:
        q = scheme.quantizer
        if not torch.isfinite(result.params["scales"]).all():  # fp16 overflow: would decode to inf and NaN
            raise QuantkitError("its scales are not finite (a group's range overflows float16); refusing to quantize")
        out = {"qweight": pack_codes(result.codes, q.bits), "scales": result.params["scales"].to(torch.float16)}
        if _stores_zeros(q):
            out["zeros"] = result.params["zeros"].to(torch.float16)
        if q.name != "uniform":
            out["levels"] = result.params["levels"].to(torch.float16)
        if _stores_perm(scheme):
            if result.perm is None:
                raise ValueError("scheme stores a permutation but the result has none")
            out["perm"] = result.perm.to(perm_dtype(result.perm.numel()))
        # fp16 storage must be exact: the rounding method already computed with fp16-representable values.
        assert torch.equal(out["scales"].float(), result.params["scales"].float()), "scales are not fp16-exact"
        expected = self.tensor_specs(scheme, result.codes.shape[1], result.codes.shape[0])
        if set(out) != set(expected):
            raise ValueError(f"packed tensors {sorted(out)} do not match the scheme's {sorted(expected)}")
        return {k: v.contiguous() for k, v in out.items()}

    def unpack(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> QuantResult:
        q = scheme.quantizer
        codes = unpack_codes(tensors["qweight"], q.bits, in_features)
        scales = tensors["scales"].float()
        zeros = tensors["zeros"].float() if "zeros" in tensors else torch.zeros_like(scales)
        if q.name == "uniform" and q.symmetric:
            zeros = torch.full_like(scales, 2 ** (q.bits - 1))
        params = {"scales": scales, "zeros": zeros}
        if "levels" in tensors:
            params["levels"] = tensors["levels"].float()
        perm = tensors["perm"].long() if "perm" in tensors else None
        return QuantResult(codes=codes, W_hat=self.dequantize(tensors, scheme, in_features), params=params,
                           perm=perm)

    def dequantize(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> torch.Tensor:
        q = scheme.quantizer
        return dequantize_uniform(tensors["qweight"], tensors["scales"], tensors.get("zeros"), tensors.get("perm"),
                                  bits=q.bits, group_size=q.group_size, in_features=in_features,
                                  levels=tensors.get("levels"))

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], scheme,
               bias: torch.Tensor | None) -> torch.Tensor:
        q = scheme.quantizer
        return uniform_matmul_ref(x, tensors["qweight"], tensors["scales"], tensors.get("zeros"),
                                  tensors.get("perm"), bias, bits=q.bits, group_size=q.group_size,
                                  levels=tensors.get("levels"))


def dequantize_uniform(
    qweight: torch.Tensor,  # [out, words] int32
    scales: torch.Tensor,  # [out, ngroups] fp16
    zeros: torch.Tensor | None,  # [out, ngroups] fp16, None for symmetric
    perm: torch.Tensor | None,  # [in] int32, stored column j is original column perm[j]
    *,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    levels: torch.Tensor | None = None,  # [2**bits] fp16: a non-uniform grid (zeros are then None)
) -> torch.Tensor:
    """The dense weight [out, in] in original column order, computed in fp32 and cast to ``dtype``."""
    out, ngroups = scales.shape
    g = group_size_of(group_size, in_features)
    pad = ngroups * g - in_features  # the last group is short when in_features is not a multiple of g
    # Work group by group, [out, ngroups, g], so a scale (and zero) broadcasts over its group: no per-weight copies.
    codes = unpack_codes(qweight, bits, in_features, torch.int64 if levels is not None else torch.float32)
    c = torch.nn.functional.pad(codes, (0, pad)).view(out, ngroups, g)
    s = scales.float().unsqueeze(-1)
    if levels is not None:
        W = s * levels.float()[c]
    elif zeros is None:
        W = s * (c - float(2 ** (bits - 1)))
    else:
        W = s * (c - zeros.float().unsqueeze(-1))
    W = W.view(out, ngroups * g)[:, :in_features].contiguous()
    if perm is not None:
        W = torch.empty_like(W).index_copy_(1, perm.long(), W)
    return W.to(dtype)


def uniform_matmul_ref(
    x: torch.Tensor,  # [..., in]
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    bits: int,
    group_size: int,
    levels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)``: the reference the fused kernels are tested against."""
    # Act-order: permute the activation to stored column order (as the kernels do), not the weight to original
    # order; x[..., perm] @ W_stored.T == x @ W.T, and the activation is the smaller tensor.
    W = dequantize_uniform(
        qweight, scales, zeros, None, bits=bits, group_size=group_size, in_features=x.shape[-1], dtype=x.dtype,
        levels=levels,
    )
    if perm is not None:
        x = x.index_select(-1, perm.long())
    return torch.nn.functional.linear(x, W, bias)
