"""The full-precision "quantizer" ``fp16``: each weight rounded to the nearest float16, one code per weight and no
parameters. It lets a recipe (and the bit allocator, quantkit.allocate) keep a linear at 16 bits while the
checkpoint still counts its bits like every other quantized linear's (format ``quantkit-dense``)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from quantkit.config.spec import Spec
from quantkit.quantizers import Window, register_quantizer

__all__ = ["DenseQuantizer", "DenseSpec"]


class DenseQuantizer:
    codesz = 1
    group_size = -1
    code_dtype = torch.float16
    shared_params: tuple[str, ...] = ()

    def prepare(self, W: torch.Tensor, H: torch.Tensor | None, perm: torch.Tensor | None) -> None:
        pass

    def quantize(self, x: torch.Tensor, col: int, window: Window) -> tuple[torch.Tensor, torch.Tensor]:
        codes = x.to(torch.float16)
        return codes.float(), codes

    def decode(self, codes: torch.Tensor, col: int) -> torch.Tensor:
        return codes.float()

    def params(self) -> dict[str, torch.Tensor]:
        return {}


@register_quantizer("fp16")
@dataclasses.dataclass(frozen=True)
class DenseSpec(Spec):
    """``quantizer: {name: fp16}`` (flat: ``grid: fp16``); no fields of its own."""

    part = "quantizer"
    default_format: ClassVar[str] = "quantkit-dense"
    name: str = "fp16"

    def build(self, *, static_groups: bool = False) -> DenseQuantizer:
        return DenseQuantizer()
