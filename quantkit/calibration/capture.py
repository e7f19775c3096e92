"""What the model feeds its decoder layers: the calibration batch's hidden states and keyword arguments (masks,
position embeddings), captured at the first layer, and running a layer over them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError

__all__ = ["CHUNK_TOKENS", "Calibration", "capture_inputs", "run_layer"]

# Sequences per forward chunk: bounds activation memory (attention and MLP intermediates) per layer call.
CHUNK_TOKENS = 8192


@dataclass
class Calibration:
    hidden: list[torch.Tensor]  # per chunk [b, seqlen, hidden]: the current layer's inputs
    kwargs: list[dict[str, Any]] = field(default_factory=list)  # per chunk: what the model passes each layer


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for layer 0 to record what the model feeds its decoder layers, then stops the forward."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)  # e.g. `attention_type`, read by the model's loop

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise QuantkitError("decoder layer called with positional arguments beyond hidden_states; unsupported")
        self.captured.append((hidden_states, kwargs))
        raise _Stop


def capture_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, device: torch.device) -> Calibration:
    per_chunk = max(1, CHUNK_TOKENS // ids.shape[1])
    catcher = _Catcher(layers[0])
    layers[0] = catcher
    try:
        with torch.no_grad():
            for chunk in ids.split(per_chunk):
                try:
                    model(input_ids=chunk.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        layers[0] = catcher.layer
    return Calibration(hidden=[h for h, _ in catcher.captured], kwargs=[kw for _, kw in catcher.captured])


def run_layer(layer: nn.Module, calib: Calibration, *, keep_outputs: bool, after_chunk=None) -> None:
    """One pass of the calibration set through ``layer``; ``keep_outputs``: its outputs become the next inputs."""
    with torch.no_grad():
        for i, (h, kw) in enumerate(zip(calib.hidden, calib.kwargs, strict=True)):
            out = layer(h, **kw)
            if keep_outputs:
                calib.hidden[i] = out[0] if isinstance(out, tuple) else out
            if after_chunk is not None:
                after_chunk()
