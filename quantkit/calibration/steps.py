"""Layer steps: what the walk does with each decoder layer once its calibration statistics are in.

A step declares the statistics it needs (``needs``: collector name -> local linear names), then ``run`` gets them
and may replace modules in the layer, add tensors to the checkpoint (``ctx.tensors``) and return a JSON record
for the layer, which lands in ``quantkit_report.json`` under ``steps.{name}.{layer}``. A step that wants the keys
and values the layer's attention caches, as every step left the layer, says so (``wants_kv``): the walk's final
pass over the layer (the one that makes the next layer's inputs) then records them (:class:`KVRecorder`) and
hands them to ``after_pass``, which may add tensors and completes the record. The walk persists tensors and
records with each finished layer, so a resumed run calls ``restore`` instead of ``run`` for layers done before.
Adding a step is adding a file: a :class:`LayerStep` subclass passed to
``quantkit.pipeline.quantize(..., steps=[...])``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.errors import QuantkitError

__all__ = ["KVRecorder", "LayerContext", "LayerStep"]


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

    def wants_kv(self, ctx: LayerContext) -> bool:
        """Whether :meth:`after_pass` is to get the keys and values this layer caches over the calibration set in
        the walk's final pass (made for the last layer too when a step asks)."""
        return False

    def after_pass(self, ctx: LayerContext, record: dict[str, Any], keys: torch.Tensor, values: torch.Tensor,
                   positions: torch.Tensor) -> dict[str, Any]:
        """After the walk's final pass over the layer as every step left it, when :meth:`wants_kv`: ``keys`` and
        ``values`` float32 [KV heads, tokens, head_dim] as the attention caches them (keys post-RoPE where the
        model applies RoPE before caching), and each token's position (int64 [tokens]). May add tensors to
        ``ctx.tensors``; returns the layer's record (``record``: what ``run`` returned). Runs before the layer's
        progress is saved."""
        return record

    def restore(self, ctx: LayerContext, record: dict[str, Any]) -> None:
        """Rebuild a layer finished in an earlier run from ``ctx.tensors`` and its record (only when the walk
        keeps the model in memory)."""


class KVRecorder:
    """Stands in for a cache in one pass of the calibration set through a decoder layer: keeps what the attention
    caches (on the CPU, float32), returns it unchanged, so nothing is cached and the layer's outputs are those of a
    pass without a cache."""

    def __init__(self) -> None:
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._positions: list[torch.Tensor] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        for out, t in ((self._keys, key_states), (self._values, value_states)):
            B, H, T, D = t.shape
            out.append(t.detach().float().cpu().permute(1, 0, 2, 3).reshape(H, B * T, D))
        from quantkit.kvcache.rope import forward_positions

        B, T = key_states.shape[0], key_states.shape[-2]
        p = forward_positions(kwargs, B, T)
        if p is None:
            p = torch.arange(T).expand(B, T)  # each calibration sequence from position 0
        self._positions.append(p.detach().cpu().reshape(B * T))
        return key_states, value_states

    def result(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values [H, N·T, D] over the pass, and each token's position [N·T] (``prefix`` names the
        layer in the error)."""
        if not self._keys:
            raise QuantkitError(f"{prefix}: its attention cached nothing on the calibration set; its keys and "
                                "values cannot be observed")
        return torch.cat(self._keys, 1), torch.cat(self._values, 1), torch.cat(self._positions)
