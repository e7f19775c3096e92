"""Layer steps: what the walk does with each decoder layer once its calibration statistics are in.

A step declares the statistics it needs (``needs``: collector name -> local linear names), then ``run`` gets them
and may replace modules in the layer, add tensors to the checkpoint (``ctx.tensors``) and return a JSON record
for the layer, which lands in ``quantkit_report.json`` under ``steps.{name}.{layer}``. The walk persists tensors
and records with each finished layer, so a resumed run calls ``restore`` instead of ``run`` for layers done
before. Adding a step is adding a file: a :class:`LayerStep` subclass passed to
``quantkit.pipeline.quantize(..., steps=[...])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["LayerContext", "LayerStep"]


@dataclass
class LayerContext:
    index: int
    prefix: str  # e.g. "model.layers.3"
    layer: nn.Module  # materialized, on ``device``
    model: nn.Module  # the whole model (skeleton); modules are swapped in place
    device: torch.device
    calibrated: bool  # calibration activations flow through the walk (statistics can be collected)
    calib: Any = None  # the walk's quantkit.calibration.capture.Calibration (this layer's inputs), or None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # full name -> tensor, for the checkpoint

    def local(self, name: str) -> str:
        """``model.layers.3.mlp.up_proj`` -> ``mlp.up_proj``."""
        return name[len(self.prefix) + 1 :]


class LayerStep:
    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False  # the run must calibrate even if the recipe is data-free

    def fingerprint(self) -> Any:
        """JSON data that decides this step's output: a run with other settings does not resume this one's."""
        return {}

    def needs(self, ctx: LayerContext) -> dict[str, set[str]]:
        """The statistics to collect for this layer: collector name -> local names of linears."""
        return {}

    def run(self, ctx: LayerContext, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Process the layer; ``stats[collector][linear]``. Returns the layer's JSON record."""
        raise NotImplementedError

    def restore(self, ctx: LayerContext, record: dict[str, Any]) -> None:
        """Rebuild a layer finished in an earlier run from ``ctx.tensors`` and its record (only when the walk
        keeps the model in memory)."""
