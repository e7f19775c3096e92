"""Packed storage formats, registered by the name each quantized module records in ``quantization_config``.

A :class:`Format` owns what a quantized linear stores: the tensors with their shapes and dtypes
(``tensor_specs``, so a loader can allocate empty modules before the weights arrive), ``pack`` (a rounding
method's :class:`~quantkit.quantizers.QuantResult` to tensors), ``unpack`` (their inverse), ``dequantize`` (the
PyTorch reference) and ``stored_bits``, the one count of bits per weight that the pipeline's report, ``quantkit
eval`` and ``quantkit report`` all use. Adding a format is adding a file: a ``Format`` subclass registered with
``@register_format``; ``QuantizedLinear`` and the loader need no change, and the kernel dispatch falls back to the
format's reference until a kernel registers for it (quantkit.kernels.dispatch).

The random signs of a Hadamard rotation are stored beside every format's tensors (``rot_in_signs`` int8 [in],
``rot_out_signs`` int8 [out]): a rotation composes with any format (quantkit.rotations).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from quantkit.config.spec import FieldError
from quantkit.errors import QuantkitError
from quantkit.quantizers import QuantResult
from quantkit.registry import FORMATS

__all__ = ["FORMATS", "Format", "TensorSpecs", "get_format", "register_format", "rotation_specs"]

TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype)


def rotation_specs(scheme, in_features: int, out_features: int) -> TensorSpecs:
    """The stored signs of the scheme's rotations (none without one)."""
    if not scheme.rotation.active:
        return {}
    specs: TensorSpecs = {"rot_in_signs": ((in_features,), torch.int8)}
    if scheme.rotation.output:
        specs["rot_out_signs"] = ((out_features,), torch.int8)
    return specs


class Format:
    """Base class of the storage formats. Subclasses set ``name`` and ``version`` and implement ``tensor_specs``,
    ``pack``, ``unpack`` and ``dequantize``; ``linear`` (the reference forward) and ``stored_bits`` follow."""

    name: str = ""
    version: int = 1
    min_version: int = 1  # the oldest version this code still reads
    stores: ClassVar[tuple[type, ...]] = ()  # the quantizer spec classes it stores (empty: any)

    def check_scheme(self, scheme) -> None:
        """Raise a ``RecipeError`` naming the field if this format cannot store ``scheme``: a quantizer that is
        not one of ``stores``. Subclasses add their own conditions after calling this."""
        if self.stores and not isinstance(scheme.quantizer, self.stores):
            names = ", ".join(sorted(c.__name__ for c in self.stores))
            raise FieldError("format", f"{self.name!r} stores {names}, not quantizer {scheme.quantizer.name!r}",
                             self.name)

    def check_layer(self, scheme, in_features: int, out_features: int) -> None:
        """Raise a ``RecipeError`` naming the field if a linear of this shape cannot be quantized and stored under
        ``scheme``; the pipeline asks for every linear before any work. By default the quantizer spec's own
        ``check_layer(in_features, out_features)``, when it has one."""
        check = getattr(scheme.quantizer, "check_layer", None)
        if check is not None:
            check(in_features, out_features)

    def tensor_specs(self, scheme, in_features: int, out_features: int) -> TensorSpecs:
        raise NotImplementedError

    def pack(self, result: QuantResult, scheme) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unpack(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> QuantResult:
        """Codes, parameters and permutation of stored ``tensors`` (``W_hat`` is the dequantized weight)."""
        raise NotImplementedError

    def dequantize(self, tensors: dict[str, torch.Tensor], scheme, in_features: int) -> torch.Tensor:
        """The dense weight [out, in] as stored (rotated basis, original column order), fp32. Differentiable with
        respect to the ``trainable`` tensors when they are given as fp32 tensors that require grad."""
        raise NotImplementedError

    def trainable(self, scheme) -> tuple[str, ...]:
        """The stored float tensors that fine-tuning may change (quantkit.finetune): codebooks and scales, never
        codes. ``dequantize`` is differentiable with respect to them. By default none."""
        return ()

    def linear(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], scheme,
               bias: torch.Tensor | None) -> torch.Tensor:
        """The reference forward ``x @ W.T (+ bias)`` in ``x``'s dtype: dequantize, then an ordinary matmul."""
        W = self.dequantize(tensors, scheme, x.shape[-1]).to(x.dtype)
        return torch.nn.functional.linear(x, W, bias)

    def layer_specs(self, scheme, in_features: int, out_features: int) -> TensorSpecs:
        """Everything a quantized linear stores besides its bias: the format's tensors and the rotation signs."""
        return {**self.tensor_specs(scheme, in_features, out_features),
                **rotation_specs(scheme, in_features, out_features)}

    def stored_bits(self, scheme, in_features: int, out_features: int,
                    bias_dtype: torch.dtype | None = None) -> int:
        """Every stored bit of one quantized linear (DESIGN.md, bits per weight): its tensors, the rotation signs
        and the bias, if it has one. The count comes from the specs the loader allocates, so it is the file's."""
        return sum(self.stored_bits_by_tensor(scheme, in_features, out_features, bias_dtype).values())

    def stored_bits_by_tensor(self, scheme, in_features: int, out_features: int,
                              bias_dtype: torch.dtype | None = None) -> dict[str, int]:
        """``stored_bits`` split by tensor name (``codes``, ``scales``, ``rot_in_signs``, ``bias``, ...)."""
        specs = dict(self.layer_specs(scheme, in_features, out_features))
        if bias_dtype is not None:
            specs["bias"] = ((out_features,), bias_dtype)
        return {k: math.prod(shape) * _bits(dtype) for k, (shape, dtype) in specs.items()}

    def check_version(self, version: Any) -> None:
        if not isinstance(version, int) or not self.min_version <= version <= self.version:
            raise QuantkitError(f"format {self.name!r} version {version!r} is not one this quantkit reads "
                                f"({self.min_version}–{self.version}); upgrade quantkit")


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator: register one instance of a ``Format`` subclass under its ``name``."""
    FORMATS.add(cls.name, cls())
    return cls


def get_format(name: str) -> Format:
    return FORMATS.get(name)


from quantkit.formats import codebook as _codebook  # noqa: E402,F401  (registers "quantkit-vq", "quantkit-aq")
from quantkit.formats import dense as _dense  # noqa: E402,F401  (registers "quantkit-dense")
from quantkit.formats import uniform as _uniform  # noqa: E402,F401  (registers "quantkit-uniform")
