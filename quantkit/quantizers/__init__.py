"""Quantizers: what rounding snaps weights onto (scalar grids today; codebooks next), behind one protocol that the
rounding methods (quantkit.algos) consume.

A quantizer is built from its spec (a registered :class:`~quantkit.config.spec.Spec` subclass, named in recipes
by ``quantizer.name``), fitted to one weight (``prepare``), then asked to round blocks of ``codesz`` consecutive
stored columns (``quantize``). The OBS loop (quantkit.algos.gptq) feeds each block's error forward, so a scalar
grid (``codesz = 1``) and a vector codebook (``codesz = d``) share the loop; round-to-nearest calls ``quantize``
on whole parameter groups. Adding a quantizer is adding a file: a spec class registered with
``@register_quantizer(name)`` whose ``build()`` returns an object of this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from quantkit.registry import QUANTIZERS

__all__ = ["QuantResult", "Quantizer", "Window", "register_quantizer"]

# ``window(k)``: the current (error-updated) weights of stored columns [col, col + k) as [rows, k], for fitting
# parameters to the columns a call starts.
Window = Callable[[int], torch.Tensor]


class Quantizer(Protocol):
    codesz: int  # stored columns per code (1: scalar)
    group_size: int  # columns that share parameters; -1: a whole row. Round-to-nearest rounds one group per call.
    code_dtype: torch.dtype
    shared_params: tuple[str, ...]  # params that are one tensor for the whole weight (not per row)
    # Optional: ``static_groups = True`` means the parameters were fitted in original column order, so with
    # act-order the loop stores the codes unpermuted and no permutation (GPTQ's static groups).

    def prepare(self, W: torch.Tensor, H: torch.Tensor | None, perm: torch.Tensor | None) -> None:
        """Fit what does not depend on the loop: ``W`` [out, in] in original column order, ``H`` [in, in] or
        None, ``perm`` the act-order permutation the loop will process columns in (stored column j is original
        column perm[j]), or None."""

    def quantize(self, x: torch.Tensor, col: int, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``x`` [rows, k] (k a multiple of ``codesz``), stored columns [col, col + k): ``(x_hat [rows, k],
        codes [rows, k / codesz])``."""

    def decode(self, codes: torch.Tensor, col: int) -> torch.Tensor:
        """Inverse of :meth:`quantize` for codes starting at stored column ``col``."""

    def params(self) -> dict[str, torch.Tensor]:
        """The fitted parameters the format stores (scales, zeros, level tables, codebooks), after the last call."""


@dataclass
class QuantResult:
    """One quantized weight: codes in stored column order and the quantizer's parameters."""

    codes: torch.Tensor  # [out, in / codesz]
    W_hat: torch.Tensor  # [out, in] the dequantized weight, original column order
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. scales, zeros [out, ngroups]
    perm: torch.Tensor | None = None  # [in] int64: stored column j holds original column perm[j]
    loss: float | None = None  # the method's own error estimate (GPTQ: sum of OBS losses)


def register_quantizer(name: str):
    """Class decorator for a quantizer's spec class (a frozen ``Spec`` dataclass with a ``name`` field, a
    ``build(**options) -> Quantizer`` method and a ``default_format`` class attribute)."""
    return QUANTIZERS.register(name)


from quantkit.quantizers import dense as _dense  # noqa: E402,F401  (registers fp16)
from quantkit.quantizers import scalar as _scalar  # noqa: E402,F401  (registers the scalar grids)
