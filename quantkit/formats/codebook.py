"""The vector-codebook format ``quantkit-vq`` (the additive ``quantkit-aq`` is below): codebook indices
bit-packed at ``log2(entries)`` bits, the fp16 codebook, one fp16 scale per row, and the act-order
permutation (quantkit.codebooks.vq).

Tensors of a quantized linear ``{module}``:

- ``codes`` int32 [out, ceil(in / dim · bits / 32)]: each row's indices as a little-endian bit stream
  (``packing.pack_bits``), vector ``j`` covering stored columns ``[j·dim, (j+1)·dim)``
- ``codebook`` fp16 [entries, dim]
- ``scales`` fp16 [out, 1]: the weight is ``scale · codebook[code]``
- ``perm`` int16 (int32 if in ≥ 2¹⁵) [in], with act-order: stored column ``j`` is original column ``perm[j]``

plus the rotation signs every format stores and the bias.
"""

from __future__ import annotations

import torch

from quantkit.codebooks.aq import AQSpec
from quantkit.codebooks.vq import VQSpec
from quantkit.config.spec import FieldError
from quantkit.formats import Format, TensorSpecs, register_format
from quantkit.formats.packing import pack_bits, packed_words, unpack_bits
from quantkit.formats.uniform import perm_dtype
from quantkit.quantizers import QuantResult

__all__ = ["AQFormat", "VQFormat"]


@register_format
class VQFormat(Format):
    name = "quantkit-vq"
    version = 1
    stores = (VQSpec,)

    def check_scheme(self, scheme) -> None:
        super().check_scheme(scheme)
        if scheme.method.static_groups:
            raise FieldError("method.static_groups", "a codebook has no groups to fit statically", True)

    def trainable(self, scheme) -> tuple[str, ...]:
        return ("codebook", "scales")

    def tensor_specs(self, scheme, in_features: int, out_features: int) -> TensorSpecs:
        q = scheme.quantizer
        specs: TensorSpecs = {
            "codes": ((out_features, packed_words(in_features // q.dim, q.bits)), torch.int32),
            "codebook": ((q.entries, q.dim), torch.float16),
            "scales": ((out_features, 1), torch.float16),
        }
        if scheme.method.act_order:
            specs["perm"] = ((in_features,), perm_dtype(in_features))
        return specs

    def pack(self, result: QuantResult, scheme) -> dict[str, torch.Tensor]:
        q = scheme.quantizer
        out = {"codes": pack_bits(result.codes, q.bits), "codebook": result.params["codebook"].to(torch.float16),
               "scales": result.params["scales"].to(torch.float16)}
        if scheme.method.act_order:
            out["perm"] = result.perm.to(perm_dtype(result.perm.numel()))
        for name in ("codebook", "scales"):  # fitted as fp16 values: storing them loses nothing
            assert torch.equal(out[name].float(), result.params[name].float()), f"{name} not fp16-exact"
        return {k: v.contiguous() for k, v in out.items()}

    def unpack(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> QuantResult:
        codes = self._codes(tensors, scheme, in_features)
        perm = tensors["perm"].long() if "perm" in tensors else None
        return QuantResult(codes=codes, W_hat=self._decode(codes, tensors), perm=perm,
                           params={"codebook": tensors["codebook"].float(), "scales": tensors["scales"].float()})

    def dequantize(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> torch.Tensor:
        return self._decode(self._codes(tensors, scheme, in_features), tensors)

    @staticmethod
    def _codes(tensors: dict[str, torch.Tensor], scheme, in_features: int) -> torch.Tensor:
        q = scheme.quantizer
        return unpack_bits(tensors["codes"], q.bits, in_features // q.dim)

    @staticmethod
    def _decode(codes: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight [out, in] in original column order from the codes [out, in / dim]."""
        W = tensors["codebook"].float()[codes].flatten(1) * tensors["scales"].float()
        if "perm" in tensors:
            W = torch.empty_like(W).index_copy_(1, tensors["perm"].long(), W)
        return W


@register_format
class AQFormat(Format):
    """The additive-codebook format ``quantkit-aq`` (quantkit.codebooks.aq), ``M = codebooks`` tables:

    - ``codes`` int32 [M, out, ceil(in / dim · bits / 32)]: table ``m``'s indices, each row a little-endian bit
      stream (``packing.pack_bits``) as in ``quantkit-vq``
    - ``codebooks`` fp16 [M, entries, dim]
    - ``scales`` fp16 [out, 1]: the weight is ``scale · Σ_m codebooks[m, codes[m]]``
    - ``perm`` with act-order, as in ``quantkit-vq``
    """

    name = "quantkit-aq"
    version = 1
    stores = (AQSpec,)

    def check_scheme(self, scheme) -> None:
        super().check_scheme(scheme)
        if scheme.method.static_groups:
            raise FieldError("method.static_groups", "a codebook has no groups to fit statically", True)

    def trainable(self, scheme) -> tuple[str, ...]:
        return ("codebooks", "scales")

    def tensor_specs(self, scheme, in_features: int, out_features: int) -> TensorSpecs:
        q = scheme.quantizer
        specs: TensorSpecs = {
            "codes": ((q.codebooks, out_features, packed_words(in_features // q.dim, q.bits)), torch.int32),
            "codebooks": ((q.codebooks, q.entries, q.dim), torch.float16),
            "scales": ((out_features, 1), torch.float16),
        }
        if scheme.method.act_order:
            specs["perm"] = ((in_features,), perm_dtype(in_features))
        return specs

    def pack(self, result: QuantResult, scheme) -> dict[str, torch.Tensor]:
        q = scheme.quantizer
        split = (result.codes.long()[None] // q.entries ** torch.arange(q.codebooks)[:, None, None]) % q.entries
        out = {"codes": torch.stack([pack_bits(c, q.bits) for c in split]),
               "codebooks": result.params["codebooks"].to(torch.float16),
               "scales": result.params["scales"].to(torch.float16)}
        if scheme.method.act_order:
            out["perm"] = result.perm.to(perm_dtype(result.perm.numel()))
        for name in ("codebooks", "scales"):  # fitted as fp16 values: storing them loses nothing
            assert torch.equal(out[name].float(), result.params[name].float()), f"{name} not fp16-exact"
        return {k: v.contiguous() for k, v in out.items()}

    def unpack(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> QuantResult:
        q = scheme.quantizer
        split = self._codes(tensors, scheme, in_features)
        codes = (split * q.entries ** torch.arange(q.codebooks)[:, None, None]).sum(0)
        perm = tensors["perm"].long() if "perm" in tensors else None
        return QuantResult(codes=codes, W_hat=self._decode(split, tensors), perm=perm,
                           params={"codebooks": tensors["codebooks"].float(), "scales": tensors["scales"].float()})

    def dequantize(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> torch.Tensor:
        return self._decode(self._codes(tensors, scheme, in_features), tensors)

    @staticmethod
    def _codes(tensors: dict[str, torch.Tensor], scheme, in_features: int) -> torch.Tensor:
        """Each table's indices [M, out, in / dim]."""
        q = scheme.quantizer
        return torch.stack([unpack_bits(c, q.bits, in_features // q.dim) for c in tensors["codes"]])

    @staticmethod
    def _decode(codes: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weight [out, in] in original column order from the tables' indices [M, out, in / dim]."""
        C = tensors["codebooks"].float()
        W = sum(C[m][codes[m]] for m in range(C.shape[0])).flatten(1) * tensors["scales"].float()
        if "perm" in tensors:
            W = torch.empty_like(W).index_copy_(1, tensors["perm"].long(), W)
        return W
