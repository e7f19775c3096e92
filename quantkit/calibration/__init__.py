"""Calibration: the layer walk over a model's decoder layers, the statistics collectors it attaches, and the
steps it runs on each layer (quantize today; measure candidates and calibrate a KV cache next)."""

from __future__ import annotations

from quantkit.calibration.collectors import Collector, register_collector
from quantkit.calibration.steps import LayerContext, LayerStep

__all__ = ["Collector", "LayerContext", "LayerStep", "register_collector"]
